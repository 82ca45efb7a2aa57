"""`Reranker`: a loaded model plus its token budget; the one scoring code path every executor uses.

The inline path, each spawned device worker and each Ray actor build one `Reranker` and feed it
columns of queries and passages; it encodes, batches (length-sorted, token budget, OOM back-off) and
returns float32 scores in the order given. Knows nothing of files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

from rerank_cli.errors import InputError
from rerank_cli.memory.batching import TokenBudget, score_window

WINDOW = 4096


class Reranker:
    """Score (query, passage) pairs with a cross-encoder or an LLM reranker.

    >>> r = Reranker("BAAI/bge-reranker-v2-m3")          # doctest: +SKIP
    >>> r.score([("what is rust?", "Rust is a language"), ("what is rust?", "Iron oxide")])  # +SKIP
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
        batch_tokens: int | None = None,
        batch_size: int = 256,
        trust_remote_code: bool = False,
        device_map: dict | str | None = None,
        log: Callable[[str], None] | None = None,
    ):
        from rerank_cli.memory.budget import initial_budget
        from rerank_cli.model.load import load_scorer

        self.model_name = model
        self.device = device or default_device()
        self.log = log or (lambda msg: None)
        self.scorer = load_scorer(
            model, self.device, kind=kind, dtype=dtype, template=template, max_length=max_length,
            instruction=instruction, normalize=normalize, trust_remote_code=trust_remote_code,
            device_map=device_map, log=self.log,
        )
        self.max_length = max_length
        tokens, why = initial_budget(self.scorer, model, self.device, max_length, batch_tokens)
        self.budget_reason = why
        self.budget = TokenBudget(tokens, batch_size, self.device, self.log)

    @classmethod
    def from_config(cls, cfg, device: str, log: Callable[[str], None] | None = None,
                    device_map: dict | str | None = None) -> Reranker:
        return cls(
            cfg.model, device, kind=cfg.kind, dtype=cfg.dtype, template=cfg.template, max_length=cfg.max_length,
            instruction=cfg.instruction, normalize=cfg.normalize, batch_tokens=cfg.batch_tokens,
            batch_size=cfg.batch_size, trust_remote_code=cfg.trust_remote_code, device_map=device_map, log=log,
        )

    @property
    def precision(self):
        return self.scorer.precision

    @property
    def kind(self) -> str:
        return self.scorer.kind

    @property
    def stats(self):
        self.scorer.stats.backoffs = self.budget.backoffs
        return self.scorer.stats

    def score(self, pairs: Iterable[tuple[str, str]], instructions: Sequence[str | None] | None = None) -> list[float]:
        """Scores for `pairs`, in order (raw logits unless the reranker was built with normalize=True)."""
        pairs = list(pairs)
        for i, pair in enumerate(pairs, 1):
            if len(pair) != 2 or not all(isinstance(x, str) for x in pair):
                raise InputError("pairs", f"pair {i} is not a (query, passage) pair of strings: {pair!r:.80}")
        queries = [q for q, _ in pairs]
        passages = [p for _, p in pairs]
        out = [
            self.score_columns(queries[i:i + WINDOW], passages[i:i + WINDOW],
                               instructions[i:i + WINDOW] if instructions else None, first_row=i + 1)
            for i in range(0, len(pairs), WINDOW)
        ]
        return np.concatenate(out).tolist() if out else []

    def score_columns(self, queries: Sequence[str], passages: Sequence[str],
                      instructions: Sequence[str | None] | None = None,
                      on_batch: Callable[[int], None] | None = None, first_row: int = 1) -> np.ndarray:
        """float32 scores for one window of pairs, in the order given."""
        if len(queries) == 0:
            return np.empty(0, dtype=np.float32)
        encoded = self.scorer.encode(queries, passages, instructions)
        return score_window(self.scorer, encoded, self.budget, on_batch, first_row)


def default_device() -> str:
    """The first GPU if there is one, else the CPU."""
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"
