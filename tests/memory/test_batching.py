"""Token-budget batching and out-of-memory back-off: every row once, in order, and only OOM caught."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from rerank_cli.errors import PairTooLargeError
from rerank_cli.memory import batching
from rerank_cli.memory.batching import GROW_AFTER, HEADROOM, TokenBudget, score_window
from rerank_cli.model.templates import Encoded


class FakeScorer:
    """Scores a row by its own ids (so a row's score never depends on its batch); OOM over `limit`."""

    def __init__(self, limit: int | None = None, error: Exception | None = None):
        self.limit, self.error = limit, error
        self.batches: list[list[int]] = []
        self.scored: list[int] = []

    def forward(self, batch):
        padded = len(batch) * max(len(e.ids) for e in batch)
        self.batches.append([len(e.ids) for e in batch])
        if self.error is not None:
            raise self.error
        if self.limit is not None and padded > self.limit:
            raise torch.OutOfMemoryError(f"{padded} > {self.limit}")
        self.scored += [e.ids[0] for e in batch]
        return np.array([e.ids[0] + 0.5 * len(e.ids) for e in batch], dtype=np.float32)


def pairs(lengths):
    """Row i has id i first, then filler up to its length."""
    return [Encoded([i] + [7] * (n - 1)) for i, n in enumerate(lengths)]


LENGTHS = [30, 5, 80, 12, 64, 64, 3, 50, 41, 77, 9, 20, 33, 18, 70, 2, 61, 25, 44, 15]


def expected(lengths):
    return np.array([i + 0.5 * n for i, n in enumerate(lengths)], dtype=np.float32)


def test_backoff_scores_every_row_once_in_input_order():
    said = []
    scorer = FakeScorer(limit=300)
    budget = TokenBudget(4000, max_rows=256, device="cuda:1", log=said.append)
    got = score_window(scorer, pairs(LENGTHS), budget)
    np.testing.assert_array_equal(got, expected(LENGTHS))
    assert sorted(scorer.scored) == list(range(len(LENGTHS)))  # each row scored exactly once
    assert budget.backoffs >= 1
    assert said == ["cuda:1: out of memory at 1600 tokens; backing off to 800"]  # once per device


def test_same_scores_as_an_unconstrained_run():
    free = score_window(FakeScorer(), pairs(LENGTHS), TokenBudget(100_000, 256))
    tight = score_window(FakeScorer(limit=200), pairs(LENGTHS), TokenBudget(100_000, 256))
    np.testing.assert_array_equal(free, tight)


def test_non_oom_runtime_error_is_not_swallowed():
    budget = TokenBudget(4000, 256)
    with pytest.raises(RuntimeError, match="device-side assert"):
        score_window(FakeScorer(error=RuntimeError("CUDA error: device-side assert triggered")),
                     pairs(LENGTHS), budget)
    assert budget.backoffs == 0


def test_lone_pair_over_the_limit_names_its_row():
    lengths = [10, 10, 90, 10]
    with pytest.raises(PairTooLargeError) as err:
        score_window(FakeScorer(limit=50), pairs(lengths), TokenBudget(4000, 256), first_row=101)
    message = str(err.value)
    assert "row 103 (90 tokens)" in message  # 1-based input row of the third pair of this window
    assert "--max-length" in message and "--dtype" in message


def test_memory_is_freed_after_leaving_the_except_block(monkeypatch):
    seen = []
    monkeypatch.setattr(batching, "free_memory", lambda device: seen.append(sys.exc_info()[0]))
    score_window(FakeScorer(limit=300), pairs(LENGTHS), TokenBudget(4000, 256))
    assert seen and all(exc is None for exc in seen)  # the OOM's traceback (holding tensors) is gone


@pytest.mark.timeout(20)
def test_backoff_always_shrinks_the_batch():
    # Short rows under a tiny limit: a floor on the budget used to re-plan the same failing batch forever.
    lengths = [5] * 40
    got = score_window(FakeScorer(limit=9), pairs(lengths), TokenBudget(64, 256))
    np.testing.assert_array_equal(got, expected(lengths))


def test_budget_grows_back_gradually_with_headroom():
    budget = TokenBudget(4096, 256)
    budget.on_oom(4096)
    assert budget.tokens == 2048 and budget.backoffs == 1
    for _ in range(GROW_AFTER - 1):
        budget.on_success()
    assert budget.tokens == 2048  # not before a run of good batches
    budget.on_success()
    assert budget.tokens == int(2048 * 1.25) + 1
    for _ in range(GROW_AFTER * 40):
        budget.on_success()
    assert budget.tokens == int(4096 * HEADROOM)  # back near the limit, never to it
    budget.on_oom(3000)
    assert budget.tokens == 1500 and budget.failed_at == 3000  # a smaller failure lowers the ceiling
    for _ in range(GROW_AFTER * 40):
        budget.on_success()
    assert budget.tokens == int(3000 * HEADROOM)


def test_budget_never_grows_without_a_failure():
    budget = TokenBudget(1024, 256)
    for _ in range(GROW_AFTER * 5):
        budget.on_success()
    assert budget.tokens == 1024


def test_real_scorer_raises_the_real_oom_and_other_errors_pass(monkeypatch, ce_model):
    from rerank_cli.model.load import load_scorer

    monkeypatch.setenv("RERANK_FAULT_OOM_TOKENS", "100")
    scorer = load_scorer(ce_model, "cpu")
    batch = scorer.encode(["a question"] * 4, ["some passage words " * 10] * 4)
    with pytest.raises(torch.OutOfMemoryError):
        scorer.forward(batch)
    assert issubclass(torch.OutOfMemoryError, RuntimeError)  # why catching RuntimeError would be wrong

    def broken(model, inputs):
        raise RuntimeError("not an out-of-memory")

    scorer.fault_oom_tokens = None
    monkeypatch.setattr(scorer, "_scores", broken)
    with pytest.raises(RuntimeError, match="not an out-of-memory"):
        score_window(scorer, batch[:1], TokenBudget(64, 256))


def test_a_batch_out_of_length_order_is_cut_by_its_longest_row():
    budget = TokenBudget(100, 256)
    assert budget.take([10, 10, 30, 10], 0) == 3  # 3 x 30 fits, 4 x 30 does not
    assert budget.take([10] * 12, 0) == 10
    assert budget.take([200, 10], 0) == 1  # a row alone is always a batch


def test_shared_prefix_batches_back_off_on_oom_with_every_row_once(monkeypatch, llm_model):
    """The budget counts a shared prefix in every row: the OOM fault (rows x longest row, as the budget
    counts) fires on shared batches too, and the back-off keeps every row and every score."""
    from rerank_cli.model.load import load_scorer

    queries = [f"question {q} about ka ri to an el" for q in range(4) for _ in range(8)]
    passages = [" ".join(["mo su ne la"] * (1 + i % 7)) for i in range(len(queries))]
    plain = load_scorer(llm_model, "cpu", template="qwen3", share_prefix=False)
    expected_scores = score_window(plain, plain.encode(queries, passages), TokenBudget(100_000, 256))
    monkeypatch.setenv("RERANK_FAULT_OOM_TOKENS", "600")
    scorer = load_scorer(llm_model, "cpu", template="qwen3")
    budget = TokenBudget(100_000, 256)
    got = score_window(scorer, scorer.encode(queries, passages), budget)
    np.testing.assert_allclose(got, expected_scores, atol=1e-4, rtol=0)
    assert budget.backoffs >= 1 and scorer.stats.pairs == len(queries)  # each row scored once
    assert scorer.stats.prefix_saved > 0 and scorer.stats.padded_tokens <= 600 * scorer.stats.batches
