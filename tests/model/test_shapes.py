"""`tiny.build_shaped`: random weights of real rerankers' shapes, with the real parameter counts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rerank_cli.memory.estimate import parameter_count, shape_of
from rerank_cli.model.tiny import SHAPES, _shaped_config, build_shaped

TOKENS = SimpleNamespace(pad_token_id=1, cls_token_id=0, sep_token_id=2, bos_token_id=1, eos_token_id=0)


@pytest.mark.parametrize("name,kind,millions,non_embedding", [
    ("bge-reranker-v2-m3", "cross-encoder", 568, 303),  # XLM-RoBERTa large, 8,194 positions
    ("qwen3-reranker-0.6b", "llm", 596, 440),  # Qwen3-0.6B: "0.6B, 0.44B non-embedding"
])
def test_the_shapes_have_the_real_models_sizes(name, kind, millions, non_embedding):
    _, config = _shaped_config(SHAPES[name], TOKENS, 0.05)
    shape = shape_of(config, kind)
    total = parameter_count(shape)
    embeddings = (shape.vocab + shape.positions + shape.token_types) * shape.hidden
    assert round(total / 1e6) == millions and round((total - embeddings) / 1e6) == non_embedding


def test_a_shaped_model_loads_with_the_parameters_its_config_gives(tmp_path):
    from transformers import AutoModelForCausalLM

    path = build_shaped(tmp_path / "m", dict(SHAPES["qwen3-reranker-0.6b"], layers=1, vocab=1024, hidden=64,
                                            heads=4, kv_heads=2, head_dim=16, intermediate=128), tokenizer_vocab=1000)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert str(model.dtype) == "torch.bfloat16" and model.config.vocab_size == 1024
    assert sum(p.numel() for p in model.parameters()) == parameter_count(shape_of(model.config, "llm"))
