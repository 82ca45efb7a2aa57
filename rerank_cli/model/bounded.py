"""Tokenize only as much of a text as a pair can use: a 20 MB passage costs what its first tokens cost.

`encode_bounded(tok, texts, needs)` returns, for each text, an encoding (no special tokens) whose
first `need` ids are exactly the first `need` ids of tokenizing the whole text (all of them when the
text has fewer), so `len(ids) > k` tells, for any `k < need`, whether the whole text has more than
`k` tokens: whether keeping `k` cuts it.

How: a text short enough (up to twice the first cut) is tokenized whole, as before. A longer one is
tokenized from two prefixes, `text[:c]` and `text[:2c]`; where a prefix ends, the last word (or
whitespace run, or character that a normalizer would combine with the next) may come out
differently from the whole text's, but tokens well before the end do not depend on what follows.
The two prefixes end in different places, so where their ids agree for `need + AGREE` tokens, those
ids are the whole text's. Where they do not (too few tokens, or a text that is one long run, such as
a word past WordPiece's 100 characters that becomes one [UNK] only when whole), the prefixes double,
up to the whole text: the ids are exact in every case, and the work is bounded by what is needed
wherever the text allows it.
"""

from __future__ import annotations

from collections.abc import Sequence

CHARS_PER_TOKEN = 8  # first cut: generous for prose (about 4 characters a token), doubled when short
MIN_CHARS = 1024
AGREE = 32  # tokens past `need` on which the two prefixes must agree


def first_cut(need: int) -> int:
    """Characters of the first prefix for a text of which `need` tokens are wanted."""
    return need * CHARS_PER_TOKEN + MIN_CHARS


def encode_bounded(tok, texts: Sequence[str], needs: Sequence[int], first_chars: Sequence[int] | None = None) -> list:
    """Encodings exact in their first `needs[i]` ids (see the module docstring); `first_chars`
    overrides the first prefix's length (tests use it to put the cut anywhere)."""
    out: list = [None] * len(texts)
    cuts = {}
    whole = []
    for i, text in enumerate(texts):
        c = first_chars[i] if first_chars is not None else first_cut(needs[i])
        if len(text) <= 2 * c:
            whole.append(i)
        else:
            cuts[i] = c
    for i, enc in zip(whole, _encode(tok, [texts[i] for i in whole])):
        out[i] = enc
    if cuts:
        shorter = dict(zip(cuts, _encode(tok, [texts[i][:c] for i, c in cuts.items()])))
        _settle(tok, texts, needs, cuts, shorter, out)
    return out


def _settle(tok, texts, needs, cuts: dict[int, int], shorter: dict, out: list) -> None:
    """Double each prefix until two successive prefixes agree on the wanted ids, or the text is whole."""
    while cuts:
        longer_cut = {i: 2 * c for i, c in cuts.items()}
        order = list(longer_cut)
        longer = dict(zip(order, _encode(tok, [texts[i][:longer_cut[i]] for i in order])))
        for i in order:
            if longer_cut[i] >= len(texts[i]):
                out[i] = longer[i]  # the whole text
            elif _agree(shorter[i].ids, longer[i].ids, needs[i] + AGREE):
                out[i] = shorter[i]
            else:
                continue
            del cuts[i]
        shorter = {i: longer[i] for i in cuts}
        cuts = {i: longer_cut[i] for i in cuts}


def _agree(a: list[int], b: list[int], n: int) -> bool:
    return len(a) >= n and len(b) >= n and a[:n] == b[:n]


def _encode(tok, texts: list[str]) -> list:
    return tok.encode_batch(texts, add_special_tokens=False) if texts else []
