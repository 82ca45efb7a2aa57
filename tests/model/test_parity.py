"""The lean scoring path equals a plain, unbatched full forward pass of the same model.

References here are written independently of rerank_cli.model.templates: they use the tokenizer's own
`__call__` and the full model output (all-vocabulary logits), one pair at a time, no padding.
Each runs on the BERT and Qwen2 tiny models and on the XLM-RoBERTa and Gemma ones (the families of
bge-reranker-v2-m3 and bge-reranker-v2-gemma). FlagEmbedding's own code is compared in
benchmarks/parity.py (it needs transformers<5, so it runs in its own venv).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rerank_cli import Reranker
from rerank_cli.model.templates import BGE_PROMPT, QWEN3_INSTRUCTION, QWEN3_PREFIX, QWEN3_SUFFIX
from rerank_cli.model.tiny import make_pairs


@pytest.fixture(scope="module")
def pairs():
    cols = make_pairs(40, seed=11, long_every=5)
    return list(zip(cols["query"], cols["passage"]))


def _hf(path, cls):
    import transformers
    from transformers import AutoTokenizer

    model = getattr(transformers, cls).from_pretrained(path, dtype=torch.float32).eval()
    return AutoTokenizer.from_pretrained(path), model


@pytest.mark.parametrize("which", ["ce_model", "xlmr_model"])
def test_cross_encoder_matches_full_forward(request, which, pairs):
    ce_model = request.getfixturevalue(which)
    tok, model = _hf(ce_model, "AutoModelForSequenceClassification")
    short = [(q, p) for q, p in pairs if len(tok(q, add_special_tokens=False)["input_ids"]) <= 384]
    with torch.inference_mode():
        ref = [model(**tok(q, p, truncation="only_second", max_length=512, return_tensors="pt")).logits[0, 0].item()
               for q, p in short]
    ours = Reranker(ce_model, "cpu", dtype="fp32", batch_tokens=4096).score(short)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_cross_encoder_caps_query_at_three_quarters(ce_model):
    r = Reranker(ce_model, "cpu", dtype="fp32", max_length=64)
    enc = r.scorer.encode(["ka " * 200], ["ri " * 200])[0]
    sep = r.scorer.tokenizer.sep_token_id
    assert len(enc.ids) == 64
    assert enc.ids.index(sep) == 1 + 48  # [CLS] + 3/4 of 64 query tokens, then [SEP]
    assert enc.type_ids[:50] == [0] * 50 and set(enc.type_ids[50:]) == {1}


def _bge_reference_ids(tok, q, p, max_length=512):
    qmax = max_length * 3 // 4
    qi = tok(f"A: {q}", add_special_tokens=False, truncation=True, max_length=qmax)["input_ids"]
    pi = tok(f"B: {p}", add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
    sep = tok("\n", add_special_tokens=False)["input_ids"]
    prompt = tok(BGE_PROMPT, add_special_tokens=False)["input_ids"]
    bos = [tok.bos_token_id] if tok.bos_token_id not in (None, tok.pad_token_id) else []
    first, second = bos + qi, sep + pi
    over = len(first) + len(second) - (max_length + len(sep) + len(prompt))
    if over > 0 and len(second) > over:
        second = second[:-over]
    return first + second + sep + prompt


@pytest.mark.parametrize("which", ["llm_model", "gemma_model"])
def test_bge_llm_matches_full_forward(request, which, pairs):
    llm_model = request.getfixturevalue(which)
    tok, model = _hf(llm_model, "AutoModelForCausalLM")
    yes = tok("Yes", add_special_tokens=False)["input_ids"][0]
    with torch.inference_mode():
        ref = [model(torch.tensor([_bge_reference_ids(tok, q, p)])).logits[0, -1, yes].item() for q, p in pairs]
    ours = Reranker(llm_model, "cpu", dtype="fp32", batch_tokens=3000).score(pairs)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_qwen3_llm_matches_model_card_recipe(llm_model, pairs):
    tok, model = _hf(llm_model, "AutoModelForCausalLM")
    prefix = tok(QWEN3_PREFIX, add_special_tokens=False)["input_ids"]
    suffix = tok(QWEN3_SUFFIX, add_special_tokens=False)["input_ids"]
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    ref = []
    with torch.inference_mode():
        for q, p in pairs:
            text = f"<Instruct>: {QWEN3_INSTRUCTION}\n<Query>: {q}\n<Document>: {p}"
            body = tok(text, add_special_tokens=False, truncation="longest_first",
                       max_length=512 - len(prefix) - len(suffix))["input_ids"]
            logits = model(torch.tensor([prefix + body + suffix])).logits[0, -1]
            ref.append(torch.log_softmax(logits[[no, yes]], dim=0)[1].exp().item())
    ours = Reranker(llm_model, "cpu", dtype="fp32", template="qwen3", normalize=True).score(pairs)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_scores_do_not_depend_on_batching(llm_model, ce_model, pairs):
    for path in (ce_model, llm_model):
        big = Reranker(path, "cpu", dtype="fp32", batch_tokens=100_000).score(pairs)
        one = Reranker(path, "cpu", dtype="fp32", batch_size=1).score(pairs)
        np.testing.assert_allclose(big, one, atol=1e-5, rtol=0)


def test_lean_head_never_computes_vocabulary_logits(llm_model, pairs, monkeypatch):
    r = Reranker(llm_model, "cpu", dtype="fp32")
    head = r.scorer.model.get_output_embeddings()
    monkeypatch.setattr(head, "forward", lambda *a, **k: pytest.fail("full lm_head was called"))
    assert len(r.score(pairs[:5])) == 5


def test_normalize_is_sigmoid_of_raw(ce_model, pairs):
    raw = np.array(Reranker(ce_model, "cpu").score(pairs[:8]))
    norm = np.array(Reranker(ce_model, "cpu", normalize=True).score(pairs[:8]))
    np.testing.assert_allclose(norm, 1 / (1 + np.exp(-raw)), atol=1e-6)
