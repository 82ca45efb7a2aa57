"""Estimate a reranker's memory from its config alone: no weights, no device, no torch.

Weights: the parameter count worked out from the config (embeddings; layers x (attention with its
grouped key/value heads, MLP, norms); the classifier or lm_head) times the bytes of the dtype.
Activations: the peak bytes per padded token of one forward pass in inference mode, at a padded
width W. In transformers' `sdpa` attention the layer-by-layer peak is linear in the hidden size h
and the MLP width I; what grows with W is the padding mask (a bool [B, 1, W, W] for the whole pass,
turned into the compute dtype inside attention), and with `eager` attention the [B, heads, W, W]
scores and probabilities. The coefficients below were read off traces of BERT and Qwen2 forward
passes (transformers 5, torch CPU allocator) and are checked against measured peaks in the tests.
For LLM rerankers the head is the lean one: the last position's hidden state times one or two
lm_head rows, never a [B, W, vocabulary] logits tensor (what that would cost is reported beside).
"""

from __future__ import annotations

from dataclasses import dataclass

from rerank_cli.errors import ModelError

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
INPUT_BYTES = 24  # int64 input ids, attention mask and token types / positions, per token
CUDA_RESERVE = 1 << 30  # CUDA context, cuBLAS workspaces: in use but not in max_memory_allocated
DECODER_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"}
FOUR_NORM_TYPES = {"gemma2", "gemma3_text"}  # pre- and post-norms around attention and MLP


@dataclass(frozen=True)
class Shape:
    """The numbers of a transformer that decide its memory."""

    family: str  # encoder (BERT-like) | decoder (LLaMA-like: gated MLP, rotary, GQA)
    kind: str  # cross-encoder | llm
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    positions: int = 0  # learned absolute position embeddings (encoders)
    token_types: int = 0
    labels: int = 1
    tied: bool = False
    qkv_bias: bool = True
    o_bias: bool = True
    norms_per_layer: int = 2
    qk_norm: bool = False
    eager: bool = False


def _get(config, *names: str, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def shape_of(config, kind: str) -> Shape:
    """Read a `Shape` from a transformers config (composite configs: their text model)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", "") or ""
    h, layers = _get(text, "hidden_size", "d_model", "dim"), _get(text, "num_hidden_layers", "n_layers")
    heads = _get(text, "num_attention_heads", "n_heads")
    if not (h and layers and heads):
        raise ModelError(f"cannot estimate memory for model type {model_type!r}: its config has no "
                         "hidden_size / num_hidden_layers / num_attention_heads")
    decoder = kind == "llm" or model_type in DECODER_TYPES or hasattr(text, "num_key_value_heads")
    bias = bool(getattr(text, "attention_bias", False))
    return Shape(
        family="decoder" if decoder else "encoder", kind=kind, vocab=_get(text, "vocab_size", default=0),
        hidden=h, layers=layers, heads=heads, kv_heads=_get(text, "num_key_value_heads", default=heads),
        head_dim=_get(text, "head_dim", default=h // heads), intermediate=_get(text, "intermediate_size",
                                                                                "ffn_dim", default=4 * h),
        positions=0 if decoder else _get(text, "max_position_embeddings", default=0),
        token_types=0 if decoder else _get(text, "type_vocab_size", default=0),
        labels=_get(config, "num_labels", default=1), tied=bool(_get(config, "tie_word_embeddings", default=False)),
        qkv_bias=(model_type == "qwen2" or bias) if decoder else True, o_bias=bias if decoder else True,
        norms_per_layer=4 if model_type in FOUR_NORM_TYPES else 2, qk_norm=model_type == "qwen3",
        eager=getattr(config, "_attn_implementation", None) == "eager",
    )


def parameter_count(s: Shape) -> int:
    """Parameters of the model as loaded (the whole lm_head for LLMs: the weights are all loaded)."""
    h, q, kv = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim
    attention = h * q + 2 * h * kv + q * h + s.qkv_bias * (q + 2 * kv) + s.o_bias * h
    if s.family == "encoder":
        mlp = 2 * h * s.intermediate + s.intermediate + h
        norms = 2 * 2 * h  # LayerNorm weight and bias, after attention and after the MLP
        embeddings = (s.vocab + s.positions + s.token_types) * h + 2 * h
        head = h * h + h + h * s.labels + s.labels  # pooler (or dense) and classifier
    else:
        mlp = 3 * h * s.intermediate
        norms = s.norms_per_layer * h + s.qk_norm * 2 * s.head_dim
        embeddings = s.vocab * h
        head = h + (s.vocab * h * (not s.tied) if s.kind == "llm" else h * s.labels)  # final norm + head
    return embeddings + s.layers * (attention + mlp + norms) + head


def weights_bytes(s: Shape, dtype: str) -> int:
    return parameter_count(s) * DTYPE_BYTES[dtype]


def activation_bytes_per_token(s: Shape, width: int, dtype: str) -> float:
    """Peak bytes per padded token of one forward pass over padded batches `width` tokens wide."""
    e, h, i = DTYPE_BYTES[dtype], s.hidden, s.intermediate
    scores = (e + 4) * s.heads * width if s.eager else 0  # eager: scores, fp32 softmax
    if s.family == "encoder":
        body = max(e * (6 * h + i), e * (3 * h + 2 * i), e * (6.5 * h + width) + scores)
    else:
        rope = 2 * s.head_dim  # cos and sin
        body = max(e * (6 * h + 2 * i + rope), e * (4 * h + 3 * i + rope), e * (8.5 * h + rope + width) + scores)
    return body + width + INPUT_BYTES  # + the bool padding mask, kept for the whole pass


def full_vocab_logits_bytes_per_token(s: Shape, dtype: str) -> int:
    """What [B, W, vocabulary] logits would add per token (FlagLLMReranker's head); 0 for encoders."""
    return DTYPE_BYTES[dtype] * s.vocab if s.kind == "llm" else 0


@dataclass(frozen=True)
class Estimate:
    weights_bytes: int
    activation_bytes_per_token: float
    max_batch_size: int
    max_batch_tokens: int
    peak_memory_bytes: int
    full_vocab_logits_bytes_per_token: int


def peak_bytes(s: Shape, rows: int, width: int, dtype: str) -> int:
    """Weights plus the activation peak of one padded batch of `rows` x `width` tokens."""
    return int(weights_bytes(s, dtype) + rows * width * activation_bytes_per_token(s, width, dtype))


def estimate(s: Shape, dtype: str, width: int, memory_bytes: int, headroom: float, reserve: int = 0) -> Estimate:
    """The largest batch of `width`-token rows whose peak stays under (1 - headroom) x memory - reserve."""
    weights = weights_bytes(s, dtype)
    per_token = activation_bytes_per_token(s, width, dtype)
    usable = (1 - headroom) * memory_bytes - reserve - weights
    rows = max(0, int(usable // (per_token * width)))
    return Estimate(weights, per_token, rows, rows * width, peak_bytes(s, rows, width, dtype),
                    full_vocab_logits_bytes_per_token(s, dtype))
