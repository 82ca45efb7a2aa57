"""Where the windows of a long passage start, and how their scores become the pair's score.

Arithmetic only: the templates (`templates.py`) say how many passage tokens one pair has room for
(the window's width) and build each window's token ids; this module says where windows start, how
many passage tokens must be read to cut them, and aggregates window scores. No tokenizer, no torch.

A passage of `n` tokens and a window width `w` (the room the template leaves after the query):

- `n <= w`: one window, the whole passage;
- else windows start at `k * stride` for k = 0, 1, ... while the window would end before the
  passage's end, and one last window ends exactly at the passage's end (starts at `n - w`):
  `1 + ceil((n - w) / stride)` windows in all, every one `w` tokens wide;
- at most `max_windows`: the first `max_windows` of those are kept, the rest of the passage is cut.

Truncation is the special case `max_windows = 1`: window 0 alone, the passage's first `w` tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WindowPolicy:
    """How a passage longer than its room is cut: `max_windows` 1 is plain truncation."""

    max_windows: int = 1
    stride: int | None = None  # tokens between window starts; None: half the window's width

    def stride_for(self, width: int) -> int:
        """The stride for windows `width` tokens wide: as asked (never past the width, so no token is
        skipped), else half the width; at least 1."""
        asked = self.stride if self.stride is not None else width // 2
        return max(1, min(asked, width))

    def starts(self, n: int, width: int) -> tuple[list[int], bool]:
        """The start of each window over `n` passage tokens, and whether `max_windows` cut the tail."""
        if n <= width:
            return [0], False
        stride = self.stride_for(width)
        total = 1 + -(-(n - width) // stride)
        kept = min(total, self.max_windows)
        return [min(k * stride, n - width) for k in range(kept)], total > kept

    def need(self, width: int) -> int:
        """Passage tokens to read to cut windows of `width` exactly: the last window the cap allows
        ends at `(max_windows - 1) * stride + width`, and one token more tells whether there is more."""
        return (self.max_windows - 1) * self.stride_for(width) + width + 1


TRUNCATE = WindowPolicy()


def aggregate(scores: np.ndarray, counts: Sequence[int], how: str) -> np.ndarray:
    """One float32 score per pair from its windows' scores (consecutive, `counts[i]` for pair i)."""
    counts = np.asarray(counts, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float32)
    if len(counts) == 0:
        return np.empty(0, dtype=np.float32)
    if len(scores) == len(counts):  # one window each: the scores themselves, bit for bit
        return scores.copy()
    firsts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    if how == "max":
        out = np.maximum.reduceat(scores, firsts)
    elif how == "first":
        out = scores[firsts]
    elif how == "sum":
        out = np.add.reduceat(scores.astype(np.float64), firsts)
    elif how == "mean":
        out = np.add.reduceat(scores.astype(np.float64), firsts) / counts
    else:
        raise ValueError(f"unknown aggregate {how!r}")
    return np.asarray(out, dtype=np.float32)
