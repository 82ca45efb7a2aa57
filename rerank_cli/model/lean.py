"""Skip the work a score never reads: the final layer, computed for the one position the head uses.

A cross-encoder's classification head reads the first ([CLS]) position of the last layer; an LLM
reranker's score reads the last position. Every other position's output of the final layer is thrown
away, yet a stock forward pass computes it: a sixth of the work of a six-layer model, more than half
of it in the feed-forward block. `prune_last_layer` rewires the final layer of the families below so
it computes only what the score reads, and leaves any other model as it is (the full forward pass is
always correct, only slower). Tests check every family against an unpruned forward pass.

- BERT family (BERT, RoBERTa, XLM-RoBERTa, ELECTRA, CamemBERT): the last layer becomes a
  `FirstTokenLayer`: keys and values from every position, the query, attention output and
  feed-forward block for position 0 only. Its output has one position, which is all the
  classification heads of these families read (`hidden[:, 0]`).
- Llama, Mistral, Qwen2, Qwen3: the last layer becomes a `LastTokenDecoderLayer`: keys and values
  from every position, the query (with its rotary embedding), attention output and MLP for the last
  position only.
- Gemma 1-3 (softcapping, scaled queries, sliding windows: their attention stays stock): the norm in
  front of the last MLP takes only the last position, so the MLP runs on one row per pair. The
  layer's residual add then broadcasts that row over the sequence: only the last position of the
  layer's output is meaningful, and it is the only one the lean LLM head reads.
"""

from __future__ import annotations

import torch
from torch import nn

BERT_FAMILY = {"bert", "roberta", "xlm-roberta", "electra", "camembert"}
DECODER_FAMILY = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"}
LAST_QUERY_FAMILY = {"llama", "mistral", "qwen2", "qwen3"}  # plain rotary attention: query trimmed too


def prune_last_layer(model, kind: str) -> bool:
    """Rewire `model`'s final layer in place for a one-position score; False if its family is not known."""
    config = model.config
    if kind == "cross-encoder" and _bert_like(model, config):
        layers = model.base_model.encoder.layer
        layers[-1] = FirstTokenLayer(layers[-1], returns_tuple=_layers_return_tuples())
        return True
    if kind == "llm" and getattr(config, "model_type", None) in DECODER_FAMILY:
        layers = _decoder_layers(model)
        last = layers[-1]
        if config.model_type in LAST_QUERY_FAMILY and _plain_attention(last.self_attn):
            layers[-1] = LastTokenDecoderLayer(last)
        else:
            gemma2 = hasattr(last, "pre_feedforward_layernorm")
            name = "pre_feedforward_layernorm" if gemma2 else "post_attention_layernorm"
            setattr(last, name, LastPosition(getattr(last, name)))
        return True
    return False


def _plain_attention(attn) -> bool:
    return all(hasattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling"))


def _bert_like(model, config) -> bool:
    if getattr(config, "model_type", None) not in BERT_FAMILY or getattr(config, "is_decoder", False):
        return False
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        return False  # relative position scores are computed inside attention; keep the stock layer
    encoder = getattr(model.base_model, "encoder", None)
    layer = encoder.layer[-1] if encoder is not None and len(getattr(encoder, "layer", ())) else None
    return layer is not None and all(
        hasattr(layer, path[0]) and hasattr(getattr(layer, path[0]), path[1])
        for path in (("attention", "self"), ("attention", "output"), ("intermediate", "dense"), ("output", "dense"))
    )


def _layers_return_tuples() -> bool:
    """transformers 4 encoder layers return (hidden, ...); transformers 5 returns the tensor."""
    import transformers

    return int(transformers.__version__.split(".")[0]) < 5


def _decoder_layers(model):
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    return body.layers


class _LayerWrapper(nn.Module):
    """Stands in for `layer`; attributes the model reads off its layers (`attention_type`, ...) are its."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "layer":
                raise
            return getattr(self.layer, name)


class FirstTokenLayer(_LayerWrapper):
    """A BERT-family encoder layer that outputs position 0 only (keys and values still see every token)."""

    def __init__(self, layer: nn.Module, returns_tuple: bool):
        super().__init__(layer)
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        layer = self.layer
        attn = layer.attention.self
        batch, length, _ = hidden_states.shape
        heads = attn.num_attention_heads
        size = attn.attention_head_size

        def split(x, n):
            return x.view(batch, n, heads, size).transpose(1, 2)

        first = hidden_states[:, :1]
        query = split(attn.query(first), 1)
        key = split(attn.key(hidden_states), length)
        value = split(attn.value(hidden_states), length)
        context = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=_query_row_mask(attention_mask, 0, query.dtype)
        )
        context = context.transpose(1, 2).reshape(batch, 1, heads * size)
        attended = layer.attention.output(context, first)
        out = layer.output(layer.intermediate(attended), attended)
        return (out,) if self.returns_tuple else out


def _query_row_mask(mask, position: int, dtype):
    """The mask row for one query position (0 or -1), in a form scaled_dot_product_attention takes."""
    if mask is None:
        return None
    if mask.dim() == 2:  # [batch, keys] of 1/0 (flash-attention style): True where a key may be attended
        return mask[:, None, None, :].bool()
    row = mask.narrow(2, position % mask.shape[2], 1)  # of [batch, 1, queries or 1, keys]: bool or additive float
    return row if row.dtype == torch.bool else row.to(dtype)


class LastPosition(nn.Module):
    """Wraps the norm in front of a decoder layer's MLP so the MLP sees the last position only."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, hidden_states):
        return self.norm(hidden_states[:, -1:])


class LastTokenDecoderLayer(_LayerWrapper):
    """A Llama-style decoder layer (Llama, Mistral, Qwen2, Qwen3) that outputs the last position only.

    Keys and values come from every position (after a cached prefix's, when a cache is passed: the
    layer stores its keys and values there as the stock one does); the query, attention output, o_proj
    and the MLP are computed for the last position, with the layer's own modules and its rotary
    embedding. If a call brings what this does not handle (no precomputed rotary embedding, a mask
    of another form), the stock layer runs instead.
    """

    def forward(self, hidden_states, attention_mask=None, *args, position_embeddings=None, **kwargs):
        mask_ok = attention_mask is None or (torch.is_tensor(attention_mask) and attention_mask.dim() == 4)
        if position_embeddings is None or not mask_ok or args:
            return self.layer(hidden_states, attention_mask, *args, position_embeddings=position_embeddings, **kwargs)
        layer, attn = self.layer, self.layer.self_attn
        batch, length, _ = hidden_states.shape
        normed = layer.input_layernorm(hidden_states)
        query = attn.q_proj(normed[:, -1:]).view(batch, 1, -1, attn.head_dim)
        key = attn.k_proj(normed).view(batch, length, -1, attn.head_dim)
        value = attn.v_proj(normed).view(batch, length, -1, attn.head_dim).transpose(1, 2)
        if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm before the rotary embedding
            query, key = attn.q_norm(query), attn.k_norm(key)
        cos, sin = position_embeddings
        query = _rotate(query.transpose(1, 2), cos[:, -1:], sin[:, -1:])
        key = _rotate(key.transpose(1, 2), cos, sin)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:  # a shared prefix (prefix.py): its keys and values come first
            key, value = cache.update(key, value, attn.layer_idx)
        groups = query.shape[1] // key.shape[1]
        if groups > 1:
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        mask = _query_row_mask(attention_mask, -1, query.dtype)
        context = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                                                   scale=attn.scaling)
        # The last position's two residual adds and the norm between them run in fp32 (one row a pair;
        # no-ops in an fp32 model): in bf16 each would round the state the score is read from.
        hidden = hidden_states[:, -1:].float() + attn.o_proj(context.transpose(1, 2).reshape(batch, 1, -1)).float()
        normed = layer.post_attention_layernorm(hidden).to(hidden_states.dtype)
        return hidden + layer.mlp(normed).float()


def _rotate(x, cos, sin):
    """The rotary embedding as Llama-style models apply it: x * cos + rotate_half(x) * sin."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
