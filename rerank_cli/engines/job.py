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

from rerank_cli.config import MAX_WINDOWS, RunConfig
from rerank_cli.errors import ConfigError
from rerank_cli.io.readers import Chunk, Columns, read_chunks
from rerank_cli.io.writers import RejectsFile, open_writer
from rerank_cli.progress import Reporter
from rerank_cli.rank.ranking import check_ranking_columns, open_ranked_output, wants_ranking

WINDOWS_COL = "windows"  # the column window mode adds: how many windows each pair was scored in
# What every engine adds up from its scorers' stats for the summary (workers and actors send these).
COUNTERS = ("backoffs", "fp32_reruns", "truncated", "queries_cut", "passages_cut", "capped", "split",
            "split_windows", "prefix_saved", "real_tokens")


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
    truncated: int = 0  # pairs whose query or passage lost tokens (in window mode: what windows did not cover)
    queries_cut: int = 0
    passages_cut: int = 0
    capped: int = 0  # window mode: passages whose windows reached --max-windows
    split: int = 0  # window mode: passages scored in more than one window
    split_windows: int = 0
    prefix_saved: int = 0  # LLM rerankers: tokens not computed because a shared prefix was, once
    real_tokens: int = 0  # the model inputs' tokens
    max_length: int = 512
    long_passages: str = "truncate"
    max_windows: int = MAX_WINDOWS

    @classmethod
    def for_run(cls, cfg: RunConfig, **fields: Any) -> Summary:
        """A summary that knows the settings its line quotes (max length, long-passage mode)."""
        return cls(max_length=cfg.max_length, long_passages=cfg.long_passages,
                   max_windows=cfg.max_windows or MAX_WINDOWS, **fields)

    def add_counts(self, counts: dict[str, int]) -> None:
        for name in COUNTERS:
            setattr(self, name, getattr(self, name) + int(counts.get(name, 0)))

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
            else:
                text += " (not kept: pass --rejects PATH to keep them)"
        if self.backoffs:
            text += f"; {self.backoffs} out-of-memory back-offs"
        if self.fp32_reruns:
            text += f"; {self.fp32_reruns} batches re-run in fp32"
        if self.prefix_saved:
            share = self.prefix_saved / self.real_tokens if self.real_tokens else 0.0
            text += f"; shared prefixes saved {self.prefix_saved:,} tokens ({share:.0%} of {self.real_tokens:,})"
        return text + self.truncation_text()

    def truncation_text(self) -> str:
        """What was cut or split, never silent: "; 1,204 pairs truncated at 512 tokens (...)"."""
        if self.long_passages != "window":
            if not self.truncated:
                return ""
            why = "--long-passages window scores them whole"
            if self.queries_cut:
                why = f"{self.queries_cut:,} with the query cut; --long-passages window scores long passages whole"
            return f"; {_many(self.truncated, 'pair')} truncated at {self.max_length} tokens ({why})"
        text = f"; {_many(self.split, 'long passage')} scored in {self.split_windows:,} windows" if self.split else ""
        if self.truncated:
            parts = []
            if self.capped:
                parts.append(f"{_many(self.capped, 'passage')} past --max-windows {self.max_windows}")
            if self.queries_cut:
                parts.append(f"{self.queries_cut:,} with the query cut")
            text += f"; {_many(self.truncated, 'pair')} still truncated at {self.max_length} tokens"
            text += f" ({', '.join(parts)})" if parts else ""
        return text


def _many(n: int, noun: str) -> str:
    """"1 pair", "1,204 pairs"."""
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def open_output(cfg: RunConfig):
    """The sink every executor writes scored batches to, in input order (ranking may wrap it)."""
    if wants_ranking(cfg):
        return open_ranked_output(cfg)
    return open_writer(cfg.output, cfg.output_format, overwrite=cfg.overwrite)


def columns_of(cfg: RunConfig) -> Columns:
    return Columns(cfg.query_col, cfg.passage_col, cfg.instruction_col, cfg.score_col)


def open_chunks(cfg: RunConfig):
    """The input's chunks; the first is read now, so bad input fails before the model loads."""
    chunks = read_chunks(cfg.input, columns_of(cfg), fmt=cfg.input_format, window=cfg.sort_window,
                         skip_bad=cfg.on_bad_row == "skip")
    first = next(chunks, None)
    if first is not None:
        check_ranking_columns(cfg, first.batch.schema)
        check_added_columns(cfg, first.batch.schema)
    return itertools.chain([first], chunks) if first is not None else iter(())


def pair_columns(chunk: Chunk, columns: Columns):
    batch = chunk.batch
    q = batch.column(columns.query).to_pylist()
    p = batch.column(columns.passage).to_pylist()
    inst = batch.column(columns.instruction).to_pylist() if columns.instruction else None
    return q, p, inst


def added_columns(cfg: RunConfig, scored, mask=None) -> list[tuple[pa.Field, pa.Array]]:
    """The columns scoring appends: the float32 score, and in window mode the int32 window count.

    With a `mask` (Ray: rows left unscored), the values go to the True rows and the rest are null."""
    cols = [(pa.field(cfg.score_col, pa.float32()), _placed(scored.scores, mask, pa.float32()))]
    if cfg.long_passages == "window":
        cols.append((pa.field(WINDOWS_COL, pa.int32()), _placed(scored.windows, mask, pa.int32())))
    return cols


def empty_output(cfg: RunConfig, schema: pa.Schema) -> pa.RecordBatch:
    """No rows, with the input's columns and the ones scoring adds: what an input of no pairs (a
    header-only CSV, a zero-row Parquet file) writes, so that the output still has its schema."""
    fields = list(schema) + [pa.field(cfg.score_col, pa.float32())]
    if cfg.long_passages == "window":
        fields.append(pa.field(WINDOWS_COL, pa.int32()))
    return pa.RecordBatch.from_pylist([], schema=pa.schema(fields))


def added_names(cfg: RunConfig) -> list[str]:
    return [cfg.score_col] + ([WINDOWS_COL] if cfg.long_passages == "window" else [])


def _placed(values, mask, type_: pa.DataType) -> pa.Array:
    if mask is None:
        return pa.array(values, type=type_)
    it = iter(values.tolist())
    return pa.array([next(it) if ok else None for ok in mask], type=type_)


def with_scores(batch, scored, cfg: RunConfig):
    """`batch` (a RecordBatch or Table) with the scoring columns appended."""
    for f, column in added_columns(cfg, scored):
        batch = batch.append_column(f, column)
    return batch


def check_added_columns(cfg: RunConfig, schema: pa.Schema) -> None:
    """Window mode adds a `windows` column: an input column of that name is an error, like the score's."""
    if cfg.long_passages == "window" and WINDOWS_COL in schema.names:
        raise ConfigError(f"{cfg.input} already has a column {WINDOWS_COL!r}, which --long-passages window "
                          "adds; rename that column")


def input_rows(cfg: RunConfig) -> int | None:
    """Row count when the format tells it cheaply (Parquet metadata), for the progress bar."""
    if cfg.input == "-" or not cfg.input.endswith((".parquet", ".pq")) or not os.path.isfile(cfg.input):
        return None
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(cfg.input).metadata.num_rows
    except Exception:
        return None


def rejects_path(cfg: RunConfig) -> str | None:
    """Where skipped rows go: --rejects, else OUTPUT.rejects.jsonl; None for stdout output without
    --rejects (the summary line then says they were not kept)."""
    return cfg.rejects or (f"{cfg.output}.rejects.jsonl" if cfg.output != "-" else None)


def written_paths(cfg: RunConfig) -> list[tuple[str, str]]:
    """Every file a scoring run writes, as (role, path), for `io.paths.check_paths`."""
    paths = [("output", cfg.output)]
    if cfg.on_bad_row == "skip" and rejects_path(cfg):
        paths.append(("rejects file", rejects_path(cfg)))
    return paths


class RejectSink:
    """Rejected rows, written like an output (`io.writers.RejectsFile`): created on the first one, put in
    place when the run succeeds, removed if it fails."""

    def __init__(self, cfg: RunConfig):
        self.path = rejects_path(cfg)
        self.source, self.overwrite = cfg.input, cfg.overwrite
        self.count = 0
        self._file: RejectsFile | None = None

    def add(self, rejects: list) -> None:
        if not rejects:
            return
        self.count += len(rejects)
        if self.path:
            if self._file is None:
                self._file = RejectsFile(self.path, self.source, overwrite=self.overwrite)
            self._file.add(rejects)

    def __enter__(self) -> RejectSink:
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if self._file is None:
            return
        if exc_type is None:
            self._file.commit()
        else:
            self._file.discard()


def describe_choices(reporter: Reporter, device: str, reranker) -> None:
    reporter.info(choices_line(device, reranker))


def choices_line(device: str, reranker) -> str:
    """The precision and batch-size decisions for a device, with their reasons."""
    p = reranker.precision
    return (f"{device}: {reranker.kind} in {p.name} ({p.reason}); "
            f"batches of up to {reranker.budget.tokens} padded tokens ({reranker.budget_reason})")


def counts_of(stats) -> dict[str, int]:
    """The summary's counters from a Reranker's stats."""
    return {name: getattr(stats, name) for name in COUNTERS}


def finish(summary: Summary, stats, rejects: RejectSink, started: float) -> Summary:
    summary.pairs = stats.pairs
    summary.add_counts(counts_of(stats))
    summary.rejected = rejects.count
    summary.rejects_path = rejects.path if rejects.count else None
    summary.seconds = time.perf_counter() - started
    return summary
