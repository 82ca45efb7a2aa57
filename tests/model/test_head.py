"""The fp32 scoring head: bf16 scores stop tying, and fp32 scores do not change at all."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

from rerank_cli import Reranker
from rerank_cli.model.head import LeanHead, fp32_head

WORDS = "ka ri to an el mo su ne la vi or de ta pe lu fi sa go ru bi na co te mi".split()


def _pairs(n: int = 160, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    return [(text(rng.randint(2, 6)), text(rng.randint(3, 40))) for _ in range(n)]


def tied(scores) -> int:
    _, counts = np.unique(np.asarray(scores), return_counts=True)
    return int(counts[counts > 1].sum())


def _bf16_head(reranker: Reranker) -> None:
    """Put the head back in bf16, as it was before head.py: what the ties test must tell apart."""
    scorer = reranker.scorer
    for module in scorer.model.modules():
        module._forward_pre_hooks.clear()
    scorer.model.to(torch.bfloat16)
    if hasattr(scorer, "head"):
        rows = scorer.model.get_output_embeddings().weight[scorer.template.head_ids]
        scorer.head = lambda hidden: scorer.template.combine((hidden.to(rows.dtype) @ rows.T).float())


@pytest.mark.parametrize("which", ["ce", "llm-bge", "llm-qwen3"])
def test_bf16_scores_tie_no_more_than_fp32_and_rank_alike(which, ce_model, llm_model):
    model, template = (ce_model, None) if which == "ce" else (llm_model, which[4:])
    pairs = _pairs()
    fp32 = Reranker(model, "cpu", dtype="fp32", template=template).score(pairs)
    bf16 = Reranker(model, "cpu", dtype="bf16", template=template)
    assert tied(bf16.score(pairs)) <= tied(fp32) + 2
    if which != "ce":
        assert bf16.scorer.head.fold  # one fp32 row (for bge, the "Yes" row itself)
    _bf16_head(bf16)
    assert tied(bf16.score(pairs)) > tied(fp32) + 2  # the same scores with a bf16 head do tie


def test_fp32_head_changes_nothing_in_fp32(ce_model):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(ce_model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(ce_model)
    batch = tok([q for q, _ in _pairs(8)], [p for _, p in _pairs(8)], padding=True, return_tensors="pt")
    headed = copy.deepcopy(model)
    fp32_head(headed, "cross-encoder")
    with torch.inference_mode():
        assert torch.equal(headed(**batch).logits, model(**batch).logits)


def test_llm_head_in_fp32_is_the_old_product_bit_for_bit(llm_model):
    r = Reranker(llm_model, "cpu", dtype="fp32", template="qwen3")
    head = r.scorer.head
    assert not head.fold  # fp32 runs compute what they computed before
    hidden = torch.randn(5, r.scorer.model.config.hidden_size)
    rows = r.scorer.model.get_output_embeddings().weight[head.ids]
    before = r.scorer.template.combine((hidden @ rows.T).float())
    assert torch.equal(head(hidden), before)
    folded = LeanHead(r.scorer.model, r.scorer.template, fold=True)
    torch.testing.assert_close(folded(hidden), before, atol=1e-5, rtol=0)
