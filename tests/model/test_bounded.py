"""Bounded tokenization: the ids kept are exactly those of tokenizing the whole text.

On the three tokenizers tiny.py builds (BERT WordPiece, XLM-R Unigram with Metaspace, byte-level
BPE with Qwen2's split), over prose, text without whitespace, multi-byte UTF-8 (CJK, emoji, combining
accents), whitespace runs and punctuation, with the first cut moved across every character of words
and whitespace runs. And a huge passage is never tokenized whole.
"""

from __future__ import annotations

import random

import pytest

from rerank_cli import Reranker
from rerank_cli.model import bounded
from rerank_cli.model.bounded import encode_bounded
from rerank_cli.model.templates import backend
from rerank_cli.model.tiny import lexicon, make_pairs

TOKENIZERS = ["ce_model", "xlmr_model", "llm_model"]


def _tok(request, which):
    from transformers import AutoTokenizer

    return backend(AutoTokenizer.from_pretrained(request.getfixturevalue(which)))


def _texts() -> dict[str, str]:
    rng = random.Random(7)
    words = lexicon(600, seed=1)
    prose = " ".join(make_pairs(30, seed=2)["passage"])
    glued = "".join(rng.choice(words) for _ in range(400))  # letters only: one "word"
    cjk = "".join(chr(rng.randint(0x4E00, 0x4FFF)) for _ in range(600))
    # emoji with a skin tone, a flag, a ZWJ sequence, combining accents, compatibility characters
    odd = ["😀", "👍🏽", "🇫🇷", "👩\u200d💻", "e\u0301t\u00e9", "naïve", "Ωμέγα", "ß", "ﬁ", "①"]
    emoji = " ".join(rng.choice(odd) + rng.choice(words) for _ in range(300))
    spaces = "".join(rng.choice(words) + rng.choice([" ", "  ", "   \t ", "\n\n", " \n ", "\u00a0", "     "])
                     for _ in range(400))
    punct = "".join(rng.choice(words) + rng.choice([",", "...", "!?", " (", ") ", "--", "'s ", ":", " 12"])
                    for _ in range(400))
    return {"prose": prose, "glued": glued, "cjk": cjk, "emoji": emoji, "spaces": spaces, "punct": punct,
            "mixed": prose[:2000] + cjk[:300] + glued[:1500] + spaces[:2000]}


TEXTS = _texts()


@pytest.mark.parametrize("which", TOKENIZERS)
@pytest.mark.parametrize("name", sorted(TEXTS))
def test_ids_kept_are_the_whole_texts_ids_wherever_the_cut_falls(request, which, name):
    tok = _tok(request, which)
    text = TEXTS[name]
    whole = tok.encode(text, add_special_tokens=False).ids
    for need in (1, 17, 60, len(whole) // 2, len(whole), len(whole) + 5):
        for first in range(40, 40 + 61, 3):  # cuts across several words, runs and multi-byte characters
            got = encode_bounded(tok, [text], [need], first_chars=[first])[0].ids
            assert got[:need] == whole[:need], (name, need, first)
            k = need - 1  # keeping k tokens cuts the text exactly when the whole text has more
            assert (len(got) > k) == (len(whole) > k), (name, need, first)


@pytest.mark.parametrize("which", TOKENIZERS)
def test_default_cuts_are_exact_on_every_text(request, which):
    tok = _tok(request, which)
    texts = [t * 6 for t in TEXTS.values()]  # long enough for the default first cut of a short need
    needs = [20, 100, 513, 5, 64, 300, 1000]
    got = encode_bounded(tok, texts, needs)
    for text, need, enc in zip(texts, needs, got):
        whole = tok.encode(text, add_special_tokens=False).ids
        assert enc.ids[:need] == whole[:need]
        assert (len(enc.ids) > need - 1) == (len(whole) > need - 1)


def test_a_huge_passage_is_read_only_as_far_as_needed(ce_model, llm_model, monkeypatch):
    seen: list[int] = []
    real = bounded._encode

    def spy(tok, texts):
        seen.extend(len(t) for t in texts)
        return real(tok, texts)

    monkeypatch.setattr(bounded, "_encode", spy)
    passage = " ".join(make_pairs(40, seed=4)["passage"]) * 60  # about 1.5 MB
    for path, kwargs in ((ce_model, {}), (llm_model, {}), (llm_model, {"template": "qwen3"}),
                         (ce_model, {"long_passages": "window", "max_windows": 4})):
        seen.clear()
        r = Reranker(path, "cpu", **kwargs)
        pair = ("what is ka", passage)
        windows = r.score_chunk([pair[0]], [pair[1]]).windows
        assert max(seen) < 100_000, (kwargs, max(seen))  # never the whole 1.5 MB
        assert r.stats.truncated == 1 and r.stats.passages_cut == 1
        if kwargs.get("long_passages"):
            assert windows.tolist() == [4] and r.stats.capped == 1


def test_bounded_passage_scores_equal_whole_tokenization(ce_model, monkeypatch):
    passages = [" ".join(make_pairs(40, seed=4)["passage"]) * 4, TEXTS["glued"] * 20, TEXTS["spaces"] * 10]
    pairs = [("what is ka", p) for p in passages]
    bounded_scores = Reranker(ce_model, "cpu", dtype="fp32").score(pairs)
    monkeypatch.setattr(bounded, "first_cut", lambda need: 10**9)  # everything tokenized whole, as before
    whole_scores = Reranker(ce_model, "cpu", dtype="fp32").score(pairs)
    assert bounded_scores == whole_scores
