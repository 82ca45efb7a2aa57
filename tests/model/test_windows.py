"""Window mode (`long_passages="window"`): each window is its own pair, window 0 is the truncated pair.

References are written independently of rerank_cli.model.templates, as in test_parity.py: for the
cross-encoders, the tokenizer's own `__call__` cuts the windows (its overflowing windows with a
stride, and left-side truncation for the last window, which ends at the passage's end); for the
LLM templates, token lists from `__call__` on the prompt's parts; scores are full forward passes of
one pair, no padding. Window starts are found by walking the passage (`walk`), not by the formula in
rerank_cli.model.windows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rerank_cli import Reranker
from rerank_cli.errors import ConfigError
from rerank_cli.model.templates import BGE_PROMPT, QWEN3_INSTRUCTION, QWEN3_PREFIX, QWEN3_SUFFIX
from rerank_cli.model.tiny import make_pairs
from rerank_cli.model.windows import WindowPolicy, aggregate

ML = 64  # short pairs, so that most passages need several windows
MAX_WINDOWS = 5
QWEN3_ML = 400  # the tiny tokenizer spends about a token per character on the English of the prompt


def walk(n: int, width: int, stride: int, cap: int) -> tuple[list[int], bool]:
    """Window starts by walking the passage: step by `stride` until a window reaches the end, then
    end the last one exactly at the end; keep the first `cap`."""
    starts, pos = [], 0
    while pos + width < n:
        starts.append(pos)
        pos += stride
    starts.append(max(0, n - width))
    return starts[:cap], len(starts) > cap


@pytest.fixture(scope="module")
def pairs():
    cols = make_pairs(16, seed=5, long_every=4)  # rows 3, 7, ... run past 500 words
    return [(q, p) for q, p in zip(cols["query"], cols["passage"]) if len(q.split()) < 14]


def _hf(path, cls):
    import transformers
    from transformers import AutoTokenizer

    model = getattr(transformers, cls).from_pretrained(path, dtype=torch.float32).eval()
    return AutoTokenizer.from_pretrained(path), model


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# --- the arithmetic ---------------------------------------------------------------------------


@pytest.mark.parametrize("n, width, stride, cap", [
    (10, 4, 2, 99), (11, 4, 2, 99), (4, 4, 2, 99), (1, 4, 2, 99), (0, 4, 2, 99), (5, 4, 1, 99),
    (100, 10, 3, 99), (100, 10, 3, 4), (100, 10, 10, 99), (100, 10, 7, 1), (11, 10, 5, 99),
])
def test_starts_match_a_walk_over_the_passage(n, width, stride, cap):
    assert WindowPolicy(cap, stride).starts(n, width) == walk(n, width, stride, cap)


def test_starts_on_hand_checked_lengths():
    policy = WindowPolicy(max_windows=99)  # stride: half the width
    assert policy.starts(10, 4) == ([0, 2, 4, 6], False)  # the last window, [6, 10), ends at the end
    assert policy.starts(11, 4) == ([0, 2, 4, 6, 7], False)
    assert policy.starts(5, 4) == ([0, 1], False)
    assert WindowPolicy(3).starts(11, 4) == ([0, 2, 4], True)  # the cap cuts [8, 11)
    assert WindowPolicy(99, stride=50).starts(11, 4) == ([0, 4, 7], False)  # stride capped at the width
    assert WindowPolicy(3).need(4) == 2 * 2 + 4 + 1  # the third window ends at 8; one more token tells
    assert WindowPolicy().need(4) == 5  # truncation: the room, and one token to tell whether it is cut


def test_aggregates():
    scores, counts = np.array([1, 3, 2, 5, -1, 0], dtype=np.float32), [3, 1, 2]
    assert aggregate(scores, counts, "max").tolist() == [3, 5, 0]
    assert aggregate(scores, counts, "first").tolist() == [1, 5, -1]
    assert aggregate(scores, counts, "sum").tolist() == [6, 5, -1]
    assert aggregate(scores, counts, "mean").tolist() == [2, 5, -0.5]
    assert aggregate(scores, counts, "max").dtype == np.float32


# --- cross-encoders -----------------------------------------------------------------------------


def _ce_reference_windows(tok, q, p, width, stride, cap) -> list[dict]:
    """The tokenizer's own windows: `only_second` overflow with a stride (windows 0, s, 2s, ...) and,
    for the last one, left-side truncation (the passage's last `width` tokens)."""
    n = len(_ids(tok, p))
    starts, capped = walk(n, width, stride, cap)
    over = tok(q, p, truncation="only_second", max_length=ML, stride=width - stride, return_overflowing_tokens=True)
    keys = [k for k in over if k in ("input_ids", "token_type_ids")]
    rows = [{k: over[k][i] for k in keys} for i in range(len(over["input_ids"]))]
    if capped or len(starts) == 1:
        return rows[:len(starts)]
    tok.truncation_side = "left"
    try:
        last = tok(q, p, truncation="only_second", max_length=ML)
    finally:
        tok.truncation_side = "right"
    return rows[:len(starts) - 1] + [{k: last[k] for k in keys}]


@pytest.mark.parametrize("which", ["ce_model", "xlmr_model"])
def test_cross_encoder_windows_are_their_own_pairs(request, which, pairs):
    path = request.getfixturevalue(which)
    tok, model = _hf(path, "AutoModelForSequenceClassification")
    windowed = Reranker(path, "cpu", dtype="fp32", max_length=ML, long_passages="window", max_windows=MAX_WINDOWS)
    truncated = Reranker(path, "cpu", dtype="fp32", max_length=ML)
    got = windowed.window_scores(pairs)
    plain = truncated.score(pairs)
    specials = tok.num_special_tokens_to_add(pair=True)
    several = 0
    for (q, p), scores, score in zip(pairs, got, plain):
        assert len(_ids(tok, q)) <= ML * 3 // 4  # the query is whole, so the tokenizer's call is the reference
        width = ML - len(_ids(tok, q)) - specials
        refs = _ce_reference_windows(tok, q, p, width, width // 2, MAX_WINDOWS)
        with torch.inference_mode():
            ref = [model(**{k: torch.tensor([v]) for k, v in r.items()}).logits[0, 0].item() for r in refs]
        np.testing.assert_allclose(scores, ref, atol=1e-5, rtol=0)  # every window is its own pair
        assert scores[0] == pytest.approx(score, abs=1e-5)  # window 0 is the truncated pair
        several += len(scores) > 1
    assert several >= 4
    agg = windowed.score(pairs)
    assert all(m >= s - 1e-5 for m, s in zip(agg, plain))  # max >= first
    assert any(m > s + 1e-3 for m, s in zip(agg, plain))


def test_window_zero_is_the_truncated_encoding_exactly(ce_model, llm_model, pairs):
    for path, template, length in ((ce_model, None, ML), (llm_model, "bge", ML), (llm_model, "qwen3", QWEN3_ML)):
        plain = Reranker(path, "cpu", max_length=length, template=template).scorer.template
        windowed = Reranker(path, "cpu", max_length=length, template=template, long_passages="window")
        queries, passages = [q for q, _ in pairs], [p for _, p in pairs]
        got = windowed.scorer.template.pairs(queries, passages, None, windowed.policy)
        assert [w.windows[0] for w in got] == plain.encode(queries, passages)
        assert any(len(w.windows) > 1 for w in got), (template, [len(w.windows) for w in got], windowed.policy)


def test_first_aggregate_is_the_truncated_score(ce_model, pairs):
    first = Reranker(ce_model, "cpu", dtype="fp32", max_length=ML, long_passages="window", aggregate="first")
    plain = Reranker(ce_model, "cpu", dtype="fp32", max_length=ML)
    np.testing.assert_allclose(first.score(pairs), plain.score(pairs), atol=1e-5, rtol=0)


def test_normalize_applies_per_window_then_aggregates(ce_model, pairs):
    raw = Reranker(ce_model, "cpu", dtype="fp32", max_length=ML, long_passages="window", aggregate="mean")
    norm = Reranker(ce_model, "cpu", dtype="fp32", max_length=ML, long_passages="window", aggregate="mean",
                    normalize=True)
    per_window = raw.window_scores(pairs)
    expected = [float(np.mean(1 / (1 + np.exp(-np.array(w))))) for w in per_window]
    np.testing.assert_allclose(norm.score(pairs), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("which", ["ce_model", "xlmr_model"])
def test_cross_encoder_window_counts_on_hand_checked_lengths(request, which):
    # "ka" is one token, and so is each "ka" of "ka ka ka ...": the passage of n words has n tokens.
    # Room: 64 - 1 (query) - the pair's special tokens (3 for BERT, 4 for XLM-R).
    path = request.getfixturevalue(which)
    room = ML - 1 - (3 if which == "ce_model" else 4)
    half = room // 2
    cases = {room: 1, room + 1: 2, room + half: 2, room + half + 1: 3, room + 3 * half: 4, 3 * room + 1: 5}
    r = Reranker(path, "cpu", max_length=ML, long_passages="window", max_windows=5)
    pairs = [("ka", " ".join(["ka"] * n)) for n in cases]
    got = r.score_chunk([q for q, _ in pairs], [p for _, p in pairs])
    assert got.windows.tolist() == list(cases.values())
    stats = r.stats
    assert (stats.pairs, stats.split, stats.capped, stats.truncated) == (6, 5, 1, 1)  # 3r + 1 needs 6 > 5
    assert stats.windows == sum(cases.values())
    strided = Reranker(path, "cpu", max_length=ML, long_passages="window", window_stride=room - 1)
    assert strided.score_chunk(["ka"], [" ".join(["ka"] * (2 * room))]).windows.tolist() == [3]  # 0, r-1, r


def test_truncation_is_counted_in_both_modes(ce_model):
    # Room 60 for a 1-token query; a query of 60 tokens is cut to 48 (3/4 of 64), leaving room 13.
    pairs = [("ka", " ".join(["ka"] * 60)), ("ka", " ".join(["ka"] * 61)), ("ka", "ri"),
             (" ".join(["ka"] * 60), "ri to"), (" ".join(["ka"] * 60), " ".join(["ri"] * 14))]
    queries, passages = [q for q, _ in pairs], [p for _, p in pairs]
    plain = Reranker(ce_model, "cpu", max_length=ML)
    plain.score_chunk(queries, passages)
    s = plain.stats
    assert (s.pairs, s.truncated, s.queries_cut, s.passages_cut, s.windows) == (5, 3, 2, 2, 5)
    windowed = Reranker(ce_model, "cpu", max_length=ML, long_passages="window")
    assert windowed.score_chunk(queries, passages).windows.tolist() == [1, 2, 1, 1, 2]
    s = windowed.stats
    assert (s.truncated, s.queries_cut, s.passages_cut, s.capped, s.split, s.split_windows) == (2, 2, 0, 0, 2, 4)


# --- LLM templates ------------------------------------------------------------------------------


def _bge_reference_windows(tok, q, p, cap=MAX_WINDOWS):
    bos = [tok.bos_token_id] if tok.bos_token_id not in (None, tok.pad_token_id) else []
    first = bos + _ids(tok, f"A: {q}")[:ML * 3 // 4]
    sep, prompt = _ids(tok, "\n"), _ids(tok, BGE_PROMPT)
    body, label = _ids(tok, f"B: {p}"), _ids(tok, "B:")
    assert body[:len(label)] == label
    room = min(ML, ML + len(prompt) - len(first))  # FlagLLMReranker's budget, see test_parity
    width = room - len(label)
    passage = body[len(label):]
    starts, _ = walk(len(passage), width, width // 2, cap)
    return [first + sep + label + passage[s:s + width] + sep + prompt for s in starts]


@pytest.mark.parametrize("which", ["llm_model", "gemma_model"])
def test_bge_windows_are_their_own_pairs(request, which, pairs):
    path = request.getfixturevalue(which)
    tok, model = _hf(path, "AutoModelForCausalLM")
    yes = _ids(tok, "Yes")[0]
    got = Reranker(path, "cpu", dtype="fp32", max_length=ML, long_passages="window",
                   max_windows=MAX_WINDOWS).window_scores(pairs)
    plain = Reranker(path, "cpu", dtype="fp32", max_length=ML).score(pairs)
    for (q, p), scores, score in zip(pairs, got, plain):
        with torch.inference_mode():
            ref = [model(torch.tensor([ids])).logits[0, -1, yes].item() for ids in _bge_reference_windows(tok, q, p)]
        np.testing.assert_allclose(scores, ref, atol=1e-4, rtol=0)
        assert scores[0] == pytest.approx(score, abs=1e-4)
        assert max(scores) >= score - 1e-4
    assert sum(len(s) > 1 for s in got) >= 4




def _qwen3_reference_windows(tok, q, p, cap=MAX_WINDOWS):
    prefix, suffix = _ids(tok, QWEN3_PREFIX), _ids(tok, QWEN3_SUFFIX)
    head_text = f"<Instruct>: {QWEN3_INSTRUCTION}\n<Query>: {q}\n<Document>:"
    body, head = _ids(tok, f"{head_text} {p}"), _ids(tok, head_text)
    assert body[:len(head)] == head  # the passage's first token carries the space before it
    width = QWEN3_ML - len(prefix) - len(suffix) - len(head)
    assert width > 8
    passage = body[len(head):]
    starts, _ = walk(len(passage), width, width // 2, cap)
    return [prefix + head + passage[s:s + width] + suffix for s in starts]


def test_qwen3_windows_are_their_own_pairs(llm_model, pairs):
    tok, model = _hf(llm_model, "AutoModelForCausalLM")
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    got = Reranker(llm_model, "cpu", dtype="fp32", template="qwen3", normalize=True, max_length=QWEN3_ML,
                   long_passages="window", max_windows=MAX_WINDOWS).window_scores(pairs)
    plain = Reranker(llm_model, "cpu", dtype="fp32", template="qwen3", normalize=True,
                     max_length=QWEN3_ML).score(pairs)
    for (q, p), scores, score in zip(pairs, got, plain):
        ref = []
        with torch.inference_mode():
            for ids in _qwen3_reference_windows(tok, q, p):
                logits = model(torch.tensor([ids])).logits[0, -1]
                ref.append(torch.log_softmax(logits[[no, yes]], dim=0)[1].exp().item())
        np.testing.assert_allclose(scores, ref, atol=1e-5, rtol=0)
        assert scores[0] == pytest.approx(score, abs=1e-5)
    assert sum(len(s) > 1 for s in got) >= 4


def test_llm_window_counts_and_truncation_on_hand_checked_lengths(llm_model):
    # byte-level BPE: "ka" then " ka" each one token, so "ka ka ... ka" (n words) is n tokens.
    tok, _ = _hf(llm_model, "AutoModelForCausalLM")
    assert len(_ids(tok, " ".join(["ka"] * 9))) == 9
    # bge: bos + "A: ka" is 4 tokens, well under the prompt's length, so the room is max_length
    # (64) tokens of "B: ka ka ...", whose label "B:" takes 2: each window holds 62 passage tokens.
    room = ML - 2
    r = Reranker(llm_model, "cpu", max_length=ML, long_passages="window", max_windows=3)
    lengths = [room, room + 1, room + room // 2, room + room // 2 + 1, 10 * room]
    got = r.score_chunk(["ka"] * len(lengths), [" ".join(["ka"] * n) for n in lengths])
    assert got.windows.tolist() == [1, 2, 2, 3, 3]
    assert (r.stats.truncated, r.stats.capped, r.stats.split, r.stats.split_windows) == (1, 1, 4, 10)
    # qwen3: the room is the body's budget minus the head "<Instruct>: ...\n<Query>: ka\n<Document>:".
    head = _ids(tok, f"<Instruct>: {QWEN3_INSTRUCTION}\n<Query>: ka\n<Document>:")
    room = QWEN3_ML - len(_ids(tok, QWEN3_PREFIX)) - len(_ids(tok, QWEN3_SUFFIX)) - len(head)
    r = Reranker(llm_model, "cpu", template="qwen3", max_length=QWEN3_ML, long_passages="window")
    lengths = [room, room + 1, room + room // 2 + 1]
    got = r.score_chunk(["ka"] * 3, [" ".join(["ka"] * n) for n in lengths])
    assert got.windows.tolist() == [1, 2, 3]
    plain = Reranker(llm_model, "cpu", template="qwen3", max_length=QWEN3_ML)
    plain.score_chunk(["ka"] * 3, [" ".join(["ka"] * n) for n in lengths])
    assert (plain.stats.truncated, plain.stats.queries_cut) == (2, 0)


def test_qwen3_query_that_fills_the_body_is_one_window_counted_as_cut(llm_model):
    r = Reranker(llm_model, "cpu", template="qwen3", max_length=QWEN3_ML, long_passages="window")
    got = r.score_chunk([" ".join(["ka"] * 400)], [" ".join(["ri"] * 400)])
    assert got.windows.tolist() == [1]
    assert (r.stats.truncated, r.stats.queries_cut) == (1, 1)


# --- the Python API's settings ------------------------------------------------------------------


def test_window_settings_are_checked_all_at_once(ce_model):
    with pytest.raises(ConfigError) as err:
        Reranker(ce_model, "cpu", long_passages="windows", aggregate="median", window_stride=0, max_windows=0)
    text = str(err.value)
    for part in ("--long-passages must be one of truncate, window", "--aggregate must be one of max, first, mean, sum",
                 "--window-stride must be a whole number of at least 1", "--max-windows must be a whole number"):
        assert part in text
    with pytest.raises(ConfigError, match="--aggregate works with --long-passages window"):
        Reranker(ce_model, "cpu", aggregate="mean")


def test_a_window_too_large_for_memory_names_its_pairs_row(llm_model, monkeypatch):
    # Every batch "runs out of memory" (RERANK_FAULT_OOM_TOKENS), so the longest window fails alone: it
    # belongs to row 2 (its long instruction makes its windows the longest), the 6th window in the chunk.
    from rerank_cli.errors import PairTooLargeError

    monkeypatch.setenv("RERANK_FAULT_OOM_TOKENS", "1")
    r = Reranker(llm_model, "cpu", max_length=ML, long_passages="window")
    passage = " ".join(["ka"] * 200)
    with pytest.raises(PairTooLargeError, match=r"^row 2 \("):
        r.score_chunk(["ka", "ka"], [passage, passage], ["short", "a much longer instruction " * 3])
    assert len(r.scorer.template.pairs(["ka"], [passage], None, r.policy)[0].windows) > 4
