"""`Reranker`: a loaded model plus its token budget; the one scoring code path every executor uses.

The inline path, each spawned device worker and each Ray actor build one `Reranker` and feed it
columns of queries and passages; it encodes, batches (length-sorted, token budget, OOM back-off) and
returns float32 scores in the order given. With `long_passages="window"` the template gives a long
passage several windows; they are flattened into the same batches as every other pair (so memory
depends on one window, not on the passage), and each pair's score is the aggregate of its windows'.
It counts what was cut or split, for the run summary. Knows nothing of files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from rerank_cli.config import MAX_WINDOWS, window_problems
from rerank_cli.errors import ConfigError, InputError
from rerank_cli.memory.batching import TokenBudget, score_window
from rerank_cli.model.windows import TRUNCATE, WindowPolicy, aggregate

WINDOW = 4096
PAIR_COUNTS = ("pairs", "truncated", "queries_cut", "passages_cut", "capped", "split", "split_windows")


@dataclass(frozen=True)
class Scored:
    """A chunk's scores (float32, in input order) and how many windows each pair was scored in."""

    scores: np.ndarray
    windows: np.ndarray


class Reranker:
    """Score (query, passage) pairs with a cross-encoder or an LLM reranker.

    >>> r = Reranker("BAAI/bge-reranker-v2-m3")          # doctest: +SKIP
    >>> r.score([("what is rust?", "Rust is a language"), ("what is rust?", "Iron oxide")])  # +SKIP
    >>> r = Reranker("BAAI/bge-reranker-v2-m3", long_passages="window", aggregate="max")  # +SKIP
    """

    def __init__(
        self,
        model: str,
        device: str | None = None,
        *,
        kind: str = "auto",
        dtype: str = "auto",
        template: str | None = None,
        max_length: int = 512,
        instruction: str | None = None,
        normalize: bool = False,
        long_passages: str = "truncate",
        window_stride: int | None = None,
        aggregate: str | None = None,
        max_windows: int | None = None,
        batch_tokens: int | None = None,
        batch_size: int = 256,
        trust_remote_code: bool = False,
        device_map: dict | str | None = None,
        share_prefix: bool = True,
        log: Callable[[str], None] | None = None,
    ):
        from rerank_cli.memory.budget import initial_budget
        from rerank_cli.model.load import load_scorer

        problems = window_problems(long_passages, window_stride, aggregate, max_windows)
        if problems:
            raise ConfigError("; ".join(problems))
        self.long_passages = long_passages
        self.aggregate = aggregate or "max"
        self.policy = TRUNCATE if long_passages == "truncate" else \
            WindowPolicy(max_windows or MAX_WINDOWS, window_stride)
        self.model_name = model
        self.device = device or default_device()
        self.log = log or (lambda msg: None)
        self.scorer = load_scorer(
            model, self.device, kind=kind, dtype=dtype, template=template, max_length=max_length,
            instruction=instruction, normalize=normalize, trust_remote_code=trust_remote_code,
            device_map=device_map, share_prefix=share_prefix, log=self.log,
        )
        self.max_length = max_length
        tokens, why = initial_budget(self.scorer, model, self.device, max_length, batch_tokens)
        self.budget_reason = why
        self.budget = TokenBudget(tokens, batch_size, self.device, self.log)
        self._counts = {name: 0 for name in PAIR_COUNTS}

    @classmethod
    def from_config(cls, cfg, device: str, log: Callable[[str], None] | None = None,
                    device_map: dict | str | None = None) -> Reranker:
        return cls(
            cfg.model, device, kind=cfg.kind, dtype=cfg.dtype, template=cfg.template, max_length=cfg.max_length,
            instruction=cfg.instruction, normalize=cfg.normalize, long_passages=cfg.long_passages,
            window_stride=cfg.window_stride, aggregate=cfg.aggregate, max_windows=cfg.max_windows,
            batch_tokens=cfg.batch_tokens, batch_size=cfg.batch_size, trust_remote_code=cfg.trust_remote_code,
            device_map=device_map, share_prefix=cfg.share_prefix, log=log,
        )

    @property
    def precision(self):
        return self.scorer.precision

    @property
    def kind(self) -> str:
        return self.scorer.kind

    @property
    def stats(self):
        """The scorer's counters, the budget's back-offs, and the pairs: `pairs` counts input pairs,
        `windows` the model inputs they became, and the rest what was cut or split."""
        scorer = self.scorer.stats
        return dataclasses.replace(scorer, backoffs=self.budget.backoffs, windows=scorer.pairs, **self._counts)

    def score(self, pairs: Iterable[tuple[str, str]], instructions: Sequence[str | None] | None = None) -> list[float]:
        """Scores for `pairs`, in order (raw logits unless the reranker was built with normalize=True;
        in window mode, each the aggregate of its windows' scores)."""
        queries, passages = _columns(pairs)
        out = [
            self.score_columns(queries[i:i + WINDOW], passages[i:i + WINDOW],
                               instructions[i:i + WINDOW] if instructions else None, first_row=i + 1)
            for i in range(0, len(queries), WINDOW)
        ]
        return np.concatenate(out).tolist() if out else []

    def window_scores(self, pairs: Iterable[tuple[str, str]],
                      instructions: Sequence[str | None] | None = None) -> list[list[float]]:
        """Each pair's window scores, window 0 (the truncated pair) first, before aggregation."""
        queries, passages = _columns(pairs)
        out: list[list[float]] = []
        for lo, group in self._groups(queries, passages, instructions):
            scores, counts = self._score_group(group, None, lo + 1)
            out += [part.tolist() for part in np.split(scores, np.cumsum(counts)[:-1])] if group else []
        return out

    def score_columns(self, queries: Sequence[str], passages: Sequence[str],
                      instructions: Sequence[str | None] | None = None,
                      on_batch: Callable[[int], None] | None = None, first_row: int = 1) -> np.ndarray:
        """float32 scores for one window of pairs, in the order given."""
        return self.score_chunk(queries, passages, instructions, on_batch, first_row).scores

    def score_chunk(self, queries: Sequence[str], passages: Sequence[str],
                    instructions: Sequence[str | None] | None = None,
                    on_batch: Callable[[int], None] | None = None, first_row: int = 1) -> Scored:
        """Scores and window counts for one chunk of pairs, in the order given."""
        scores, windows = [], []
        for lo, group in self._groups(queries, passages, instructions):
            window_scores, counts = self._score_group(group, on_batch, first_row + lo)
            scores.append(aggregate(window_scores, counts, self.aggregate))
            windows.append(counts)
        if not scores:
            return Scored(np.empty(0, dtype=np.float32), np.empty(0, dtype=np.int32))
        return Scored(np.concatenate(scores), np.concatenate(windows))

    def _groups(self, queries, passages, instructions) -> Iterator[tuple[int, list]]:
        """(offset, the pairs' windows) for slices of the chunk, each slice's windows about a chunk's
        worth (at least WINDOW): truncation is one slice, the whole chunk, as before windows existed."""
        n = len(queries)
        cap = max(n, WINDOW)
        step = max(1, cap // self.policy.max_windows)
        group: list = []
        lo = held = 0
        for start in range(0, n, step):
            stop = start + step
            part = self.scorer.template.pairs(queries[start:stop], passages[start:stop],
                                              instructions[start:stop] if instructions else None, self.policy)
            group += part
            held += sum(len(p.windows) for p in part)
            if held >= cap:
                yield lo, group
                lo, group, held = min(n, stop), [], 0
        if group:
            yield lo, group

    def _score_group(self, group: list, on_batch, first_row: int) -> tuple[np.ndarray, np.ndarray]:
        """The window scores of a group of pairs (flat, pair by pair) and each pair's window count."""
        counts = np.fromiter((len(p.windows) for p in group), dtype=np.int32, count=len(group))
        flat = [w for p in group for w in p.windows]
        owners = np.repeat(np.arange(len(group)), counts) if len(flat) != len(group) else None
        progress = _PairProgress(on_batch, len(group), len(flat)) if on_batch and owners is not None else on_batch
        scores = score_window(self.scorer, flat, self.budget, progress, first_row, owners)
        self._count(group, counts)
        return scores, counts

    def _count(self, group: list, counts: np.ndarray) -> None:
        c = self._counts
        c["pairs"] += len(group)
        for p, n in zip(group, counts.tolist()):
            c["truncated"] += p.truncated
            c["queries_cut"] += p.query_cut
            c["passages_cut"] += p.passage_cut
            c["capped"] += p.capped
            if n > 1:
                c["split"] += 1
                c["split_windows"] += n


class _PairProgress:
    """Progress in pairs while windows are scored: after each batch, the share of the group's pairs
    that the windows scored so far stand for (all of them once the group is done)."""

    def __init__(self, on_batch: Callable[[int], None], pairs: int, windows: int):
        self.on_batch, self.pairs, self.windows = on_batch, pairs, windows
        self.scored = self.reported = 0

    def __call__(self, rows: int) -> None:
        self.scored += rows
        now = self.scored * self.pairs // self.windows
        self.on_batch(now - self.reported)
        self.reported = now


def _columns(pairs: Iterable[tuple[str, str]]) -> tuple[list[str], list[str]]:
    pairs = list(pairs)
    for i, pair in enumerate(pairs, 1):
        if len(pair) != 2 or not all(isinstance(x, str) for x in pair):
            raise InputError("pairs", f"pair {i} is not a (query, passage) pair of strings: {pair!r:.80}")
    return [q for q, _ in pairs], [p for _, p in pairs]


def default_device() -> str:
    """The first GPU if there is one, else the CPU."""
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"
