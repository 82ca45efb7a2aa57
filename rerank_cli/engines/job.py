"""What every engine shares: the input's chunks, the output sink, the rejects file and the `Summary`.

The inline, local (many devices) and Ray engines all read with `open_chunks` (the first chunk is read
at once, so bad input fails before the slow model load), write through `open_output` (ranking may
wrap the writer), collect bad rows in a `RejectSink` and end with a `Summary`. No engine imports
another; each imports this module.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from rerank_cli.config import RunConfig
from rerank_cli.errors import ConfigError
from rerank_cli.io.readers import Chunk, Columns, read_chunks
from rerank_cli.io.writers import open_writer, write_rejects
from rerank_cli.progress import Reporter
from rerank_cli.rank.ranking import check_ranking_columns, open_ranked_output, wants_ranking


@dataclass
class Summary:
    """What a run did, for the last line on stderr and for API callers."""

    pairs: int = 0
    rejected: int = 0
    seconds: float = 0.0
    devices: list[str] = field(default_factory=list)
    dtype: str = ""
    backoffs: int = 0
    fp32_reruns: int = 0
    rejects_path: str | None = None
    output: str = "-"
    per_device: dict[str, Any] = field(default_factory=dict)

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        text = (f"scored {self.pairs} pairs in {self.seconds:.2f} s ({self.pairs_per_s:.1f} pairs/s) "
                f"on {','.join(self.devices)}, {self.dtype}")
        if self.rejected:
            text += f"; {self.rejected} bad rows skipped"
            if self.rejects_path:
                text += f" (see {self.rejects_path})"
        if self.backoffs:
            text += f"; {self.backoffs} out-of-memory back-offs"
        if self.fp32_reruns:
            text += f"; {self.fp32_reruns} batches re-run in fp32"
        return text


def open_output(cfg: RunConfig):
    """The sink every executor writes scored batches to, in input order (ranking may wrap it)."""
    if wants_ranking(cfg):
        return open_ranked_output(cfg)
    return open_writer(cfg.output, cfg.output_format)


def columns_of(cfg: RunConfig) -> Columns:
    return Columns(cfg.query_col, cfg.passage_col, cfg.instruction_col, cfg.score_col)


def open_chunks(cfg: RunConfig):
    """The input's chunks; the first is read now, so bad input fails before the model loads."""
    chunks = read_chunks(cfg.input, columns_of(cfg), fmt=cfg.input_format, window=cfg.sort_window,
                         skip_bad=cfg.on_bad_row == "skip")
    first = next(chunks, None)
    if first is not None:
        check_ranking_columns(cfg, first.batch.schema)
    return itertools.chain([first], chunks) if first is not None else iter(())


def pair_columns(chunk: Chunk, columns: Columns):
    batch = chunk.batch
    q = batch.column(columns.query).to_pylist()
    p = batch.column(columns.passage).to_pylist()
    inst = batch.column(columns.instruction).to_pylist() if columns.instruction else None
    return q, p, inst


def with_scores(batch: pa.RecordBatch, scores, name: str) -> pa.RecordBatch:
    return batch.append_column(pa.field(name, pa.float32()), pa.array(scores, type=pa.float32()))


def input_rows(cfg: RunConfig) -> int | None:
    """Row count when the format tells it cheaply (Parquet metadata), for the progress bar."""
    if cfg.input == "-" or not cfg.input.endswith((".parquet", ".pq")) or not os.path.isfile(cfg.input):
        return None
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(cfg.input).metadata.num_rows
    except Exception:
        return None


class RejectSink:
    """Rejected rows, appended to a JSONL file opened on first use and removed if the run fails."""

    def __init__(self, cfg: RunConfig):
        self.path = cfg.rejects or (f"{cfg.output}.rejects.jsonl" if cfg.output != "-" else None)
        self.source = cfg.input
        self.count = 0
        if self.path and os.path.exists(self.path) and not cfg.overwrite:
            raise ConfigError(f"{self.path}: rejects file already exists; pass --overwrite or --rejects PATH")
        self._created = False

    def add(self, rejects: list) -> None:
        if not rejects:
            return
        self.count += len(rejects)
        if self.path:
            if not self._created and os.path.exists(self.path):
                os.unlink(self.path)
            self._created = True
            write_rejects(self.path, rejects, self.source)

    def __enter__(self) -> RejectSink:
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is not None and self._created and self.path and os.path.exists(self.path):
            os.unlink(self.path)


def describe_choices(reporter: Reporter, device: str, reranker) -> None:
    reporter.info(choices_line(device, reranker))


def choices_line(device: str, reranker) -> str:
    """The precision and batch-size decisions for a device, with their reasons."""
    p = reranker.precision
    return (f"{device}: {reranker.kind} in {p.name} ({p.reason}); "
            f"batches of up to {reranker.budget.tokens} padded tokens ({reranker.budget_reason})")


def finish(summary: Summary, stats, rejects: RejectSink, started: float) -> Summary:
    summary.pairs = stats.pairs
    summary.backoffs = stats.backoffs
    summary.fp32_reruns = stats.fp32_reruns
    summary.rejected = rejects.count
    summary.rejects_path = rejects.path if rejects.count else None
    summary.seconds = time.perf_counter() - started
    return summary
