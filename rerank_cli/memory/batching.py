"""Length-sorted, token-budget batches with out-of-memory back-off.

`score_window` takes one window of encoded pairs, scores them longest first (or in the order the
scorer's `plan` gives: a causal LM's pairs grouped by shared prefix, `model/prefix.py`) in batches
whose padded size (rows x longest row, a shared prefix counted in every row: its keys and values
are) stays under the current `TokenBudget`, and returns the scores in the window's original order.
On out-of-memory (and only that: `torch.OutOfMemoryError`, never another RuntimeError) it leaves
the `except` block so the failed batch's tensors can die, empties the cache, halves the budget and
re-plans from the same pair: no pair is lost, repeated or reordered. After a
run of good batches the budget grows back, staying 15% under the smallest size that failed.
Where the first budget comes from is `budget.py`'s job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from rerank_cli.errors import PairTooLargeError

GROW_AFTER = 8  # good batches in a row before the budget grows again
GROW_FACTOR = 1.25
HEADROOM = 0.85  # grow back to at most this fraction of the smallest padded size that ran out of memory
MIN_TOKENS = 16  # floor for a budget given by the user or the cache (back-off may go lower)


class TokenBudget:
    """The padded-token budget for one device, with memory of what failed."""

    def __init__(self, tokens: int, max_rows: int, device: str = "cpu",
                 log: Callable[[str], None] | None = None):
        self.tokens = max(MIN_TOKENS, int(tokens))
        self.max_rows = max_rows
        self.device = device
        self.log = log or (lambda msg: None)
        self.failed_at: int | None = None  # smallest padded size that ran out of memory
        self.streak = 0
        self.backoffs = 0
        self._said = False

    def take(self, lengths: Sequence[int], start: int) -> int:
        """How many pairs from `start` form the next batch (at least 1): rows x the longest of them fit."""
        stop, width = min(len(lengths), start + self.max_rows), 1
        for end in range(start, stop):
            width = max(width, lengths[end])
            if (end - start + 1) * width > self.tokens:
                return max(1, end - start)
        return stop - start

    def on_oom(self, padded: int) -> None:
        """A batch of `padded` tokens ran out of memory: halve below it, so the retry is smaller."""
        self.failed_at = padded if self.failed_at is None else min(self.failed_at, padded)
        new = max(1, min(self.tokens, padded) // 2)
        if not self._said:
            self.log(f"{self.device}: out of memory at {padded} tokens; backing off to {new}")
            self._said = True
        self.tokens = new
        self.streak = 0
        self.backoffs += 1

    def on_success(self) -> None:
        """After GROW_AFTER good batches in a row, grow by GROW_FACTOR up to the headroom cap."""
        self.streak += 1
        if self.failed_at is None or self.streak < GROW_AFTER:
            return
        self.streak = 0
        cap = int(self.failed_at * HEADROOM)
        if self.tokens < cap:
            self.tokens = min(cap, int(self.tokens * GROW_FACTOR) + 1)


def oom_error_types() -> tuple[type[BaseException], ...]:
    """torch's out-of-memory exception (CUDA's is the same class); never plain RuntimeError."""
    import torch

    return (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)


def free_memory(device: str) -> None:
    """Drop unreachable tensors and give cached blocks back (call outside any `except` block)."""
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def try_forward(scorer, batch: list) -> np.ndarray | None:
    """The batch's scores, or None if it ran out of memory (other errors propagate)."""
    try:
        return scorer.forward(batch)
    except oom_error_types():
        return None  # the exception and its traceback (holding the batch's tensors) die here


def score_window(scorer, encoded: Sequence, budget: TokenBudget,
                 on_batch: Callable[[int], None] | None = None, first_row: int = 1,
                 owners: Sequence[int] | None = None) -> np.ndarray:
    """Scores for `encoded`, in its order. Raises PairTooLargeError if one pair cannot fit alone.

    `first_row` is the 1-based input row of `encoded[0]`, for that error message; with `owners`, item i
    comes from row `first_row + owners[i]` (the windows of one passage share their pair's row).
    """
    n = len(encoded)
    planned = scorer.plan(encoded, budget.tokens) if hasattr(scorer, "plan") else None
    order, encoded = planned or (sorted(range(n), key=lambda i: -len(encoded[i].ids)), encoded)
    lengths = [len(encoded[i].ids) for i in order]
    scores = np.empty(n, dtype=np.float32)
    start = 0
    while start < n:
        rows = budget.take(lengths, start)
        idx = order[start:start + rows]
        out = try_forward(scorer, [encoded[i] for i in idx])
        if out is None:
            free_memory(budget.device)
            if rows == 1:
                row = first_row + (int(owners[idx[0]]) if owners is not None else idx[0])
                raise PairTooLargeError(too_large_message(scorer, budget.device, row, lengths[start]))
            budget.on_oom(rows * max(lengths[start:start + rows]))
            continue
        scores[idx] = out
        budget.on_success()
        start += rows
        if on_batch:
            on_batch(rows)
    return scores


def too_large_message(scorer, device: str, row: int, tokens: int) -> str:
    dtype = getattr(getattr(scorer, "precision", None), "name", None)
    fix = "lower --max-length or use --dtype bf16 (fp16 on GPUs without bf16)" if dtype in (None, "fp32") \
        else "lower --max-length"
    return f"row {row} ({tokens} tokens) does not fit in memory on {device} even alone; {fix}"
