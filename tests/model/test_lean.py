"""The trimmed final layer gives the same scores as the stock model, family by family.

Each test builds a tiny random model of one architecture, runs the stock forward pass on a padded
batch, then trims a deep copy with `prune_last_layer` and compares what the score reads: the
classification logits (cross-encoders) or the last position's final hidden state (LLM rerankers).
"""

from __future__ import annotations

import copy

import pytest
import torch

from rerank_cli.model.lean import FirstTokenLayer, LastPosition, LastTokenDecoderLayer, prune_last_layer

SMALL = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64)


def _batch(lengths, width, left_pad):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (len(lengths), width), generator=gen)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        span = slice(width - n, width) if left_pad else slice(0, n)
        mask[i, span] = 1
    ids = ids.masked_fill(mask == 0, 1)
    return ids, mask


def _cross_encoder(model_type, attn):
    import transformers

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **SMALL, num_labels=1, pad_token_id=1,
                                               type_vocab_size=1)
    config._attn_implementation = attn
    try:
        return transformers.AutoModelForSequenceClassification.from_config(config).eval()
    except ValueError as exc:  # transformers 4 has no sdpa ELECTRA
        pytest.skip(str(exc)[:80])


@pytest.mark.parametrize("model_type", ["bert", "roberta", "xlm-roberta", "electra", "camembert"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cross_encoder_first_token_layer_matches_stock(model_type, attn):
    model = _cross_encoder(model_type, attn)
    ids, mask = _batch([9, 23, 17, 23], 23, left_pad=False)
    with torch.inference_mode():
        stock = model(input_ids=ids, attention_mask=mask).logits
        lean = copy.deepcopy(model)
        assert prune_last_layer(lean, "cross-encoder")
        assert isinstance(lean.base_model.encoder.layer[-1], FirstTokenLayer)
        trimmed = lean(input_ids=ids, attention_mask=mask).logits
        unpadded = lean(input_ids=ids[1:2], attention_mask=mask[1:2]).logits  # no padding: the mask may be None
    torch.testing.assert_close(trimmed, stock, atol=1e-6, rtol=0)
    torch.testing.assert_close(unpadded, stock[1:2], atol=1e-6, rtol=0)


DECODERS = {
    "llama": {},
    "mistral": {"sliding_window": 8},  # shorter than the batch: the window is in the mask
    "qwen2": {},
    "qwen3": {"head_dim": 8},
    "gemma": {"head_dim": 8},
    "gemma2": {"head_dim": 8, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
    "gemma3_text": {"head_dim": 8},
}


@pytest.mark.parametrize("model_type", sorted(DECODERS))
def test_decoder_last_position_matches_stock(model_type):
    import transformers

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **SMALL, num_key_value_heads=2, pad_token_id=1,
                                               **DECODERS[model_type])
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids, mask = _batch([30, 12, 21], 30, left_pad=True)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def last_hidden(m, rows=slice(None)):
        out = m.get_decoder()(input_ids=ids[rows], attention_mask=mask[rows], position_ids=positions[rows],
                              use_cache=False)
        return out.last_hidden_state[:, -1]

    with torch.inference_mode():
        stock = last_hidden(model)
        lean = copy.deepcopy(model)
        assert prune_last_layer(lean, "llm")
        last = lean.get_decoder().layers[-1]
        if model_type.startswith("gemma"):
            assert any(isinstance(m, LastPosition) for m in last.children())
        else:
            assert isinstance(last, LastTokenDecoderLayer)
        torch.testing.assert_close(last_hidden(lean), stock, atol=1e-5, rtol=0)
        torch.testing.assert_close(last_hidden(lean, slice(0, 1)), stock[:1], atol=1e-5, rtol=0)  # no padding


def test_last_token_layer_leaves_masks_it_does_not_know_to_the_stock_layer():
    calls = []

    class Stock(torch.nn.Module):
        self_attn = None

        def forward(self, hidden, mask=None, **kwargs):
            calls.append(kwargs)
            return hidden

    hidden, flash_mask = torch.ones(2, 5, 8), torch.ones(2, 5)  # flash-attention style [batch, keys] mask
    out = LastTokenDecoderLayer(Stock())(hidden, flash_mask, position_embeddings=(torch.ones(2, 5, 4),) * 2)
    assert out is hidden and len(calls) == 1


def test_unknown_families_keep_their_stock_layers():
    import transformers

    config = transformers.AutoConfig.for_model("distilbert", vocab_size=120, dim=32, n_layers=2, n_heads=4,
                                               hidden_dim=64, num_labels=1)
    model = transformers.AutoModelForSequenceClassification.from_config(config)
    before = [type(m) for m in model.modules()]
    assert not prune_last_layer(model, "cross-encoder")
    assert [type(m) for m in model.modules()] == before
