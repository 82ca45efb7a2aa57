"""What a reader yields: `Chunk`s of validated rows, the `Reject`s met on the way, and the `Columns`
that say which input columns hold the pair. Shared by the row-wise and columnar readers."""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa


@dataclass(frozen=True)
class Columns:
    """Which input columns hold the pair, and which column the score will take.

    `query`/`passage` None: no text column is required (reading an already scored file to rank or
    evaluate it). `score` None: no score column will be added, so an existing one is welcome.
    """

    query: str | None = "query"
    passage: str | None = "passage"
    instruction: str | None = None
    score: str | None = "score"

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(c for c in (self.query, self.passage, self.instruction) if c)

    @classmethod
    def scored(cls) -> Columns:
        """Any table: nothing required, nothing added (the caller checks the columns it needs)."""
        return cls(query=None, passage=None, score=None)


@dataclass
class Reject:
    """A row skipped under `--on-bad-row skip`, kept for the rejects file."""

    where: str  # "line 12" or "row 12"
    error: str
    raw: str


@dataclass
class Chunk:
    """Up to `window` valid rows (all input columns) and the rows rejected on the way."""

    batch: pa.RecordBatch
    rejects: list[Reject] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return self.batch.num_rows
