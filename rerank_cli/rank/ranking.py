"""Rank scored rows per query: keep the top K of each group, add a 1-based `rank`, write TREC runs.

Owns the ranking rules, used by `rerank score --top-k`, `rerank rank` and `rerank eval`:
- Groups: the `--group-col` column; by default `qid` when the table has one, else the query text.
  Groups need not be contiguous in the input.
- Order: score descending; ties go to the row that came first in the input (deterministic whatever
  the batching, the number of devices or the executor, since every executor writes in input order).
  A NaN score ranks below every number; a missing (null) score is an error.
- Memory: one bounded min-heap of K rows per group, so memory grows with groups x K, not with the
  file. Without a K (a TREC run or `rerank rank` without `--top-k`) every row is ranked and kept;
  for TREC output only the query id, document id and score of each row are kept.
- Output: group by group, in the order each group first appears in the input, rank ascending within
  a group. An existing `rank` column (e.g. a first-stage rank) is replaced by the new one; ranking by
  it, grouping by it or taking document ids from it is refused (`RankSpec.from_config`).

It does not read files or score anything: `RankingWriter` wraps the output writer (`engines.job.open_output`)
and collects while the executors write, then emits the ranked rows when it closes, through the wrapped
atomic writer, so a failed run still leaves no output file.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from rerank_cli.errors import ConfigError, InputError, OutputError
from rerank_cli.io.formats import WRITE_FORMATS, detect_format, display_name
from rerank_cli.io.schema import widen
from rerank_cli.io.writers import Writer, check_output_path, open_writer, register_writer

RANK_COL = "rank"
TREC = "trec"
OUT_BATCH_ROWS = 4096


@dataclass(frozen=True)
class RankSpec:
    """What to rank by and what to keep; `group` None means `qid` if present, else `query`."""

    k: int | None = None
    score: str = "score"
    group: str | None = None
    query: str = "query"
    doc: str | None = None  # a document id column that must exist (TREC output, eval), or None
    trec: bool = False  # keep only the query id, document id and score of each row: a run's fields
    source: str = "-"  # the file the rows come from, for error messages

    @classmethod
    def from_config(cls, cfg) -> RankSpec:
        trec = output_format(cfg) == TREC
        clash = [f"--{name.replace('_', '-')}" for name in ("score_col", "group_col", "doc_col")
                 if getattr(cfg, name) == RANK_COL and (name != "doc_col" or trec)]
        if clash:
            raise ConfigError(f"{' and '.join(clash)} {RANK_COL!r} clashes with the {RANK_COL!r} column the ranking "
                              "writes, which would replace it; use a column of another name")
        return cls(k=cfg.top_k, score=cfg.score_col, group=cfg.group_col, query=cfg.query_col or "query",
                   doc=cfg.doc_col if trec else None, trec=trec, source=cfg.input)

    def group_column(self, names: list[str]) -> str:
        """The group column of a table with these column names (the default rule lives here)."""
        if self.group:
            return self.group
        return "qid" if "qid" in names else self.query

    def check(self, names: list[str], *, has_score: bool = True) -> None:
        """Fail early, naming the fix, when a column the ranking needs is missing."""
        where = display_name(self.source)
        group = self.group_column(names)
        if group not in names:
            hint = "name it with --group-col" if self.group else "pass --group-col (default: qid, else the query)"
            raise InputError(where, f"no column {group!r} to group by (columns: {', '.join(names)}); {hint}")
        if self.doc and self.doc not in names:
            raise InputError(where, f"no column {self.doc!r} for the document id "
                                    f"(columns: {', '.join(names)}); name it with --doc-col")
        if has_score and self.score not in names:
            raise InputError(where, f"no score column {self.score!r} (columns: {', '.join(names)}); "
                                    "name it with --score-col")


def output_format(cfg) -> str:
    return detect_format(cfg.output, cfg.output_format, WRITE_FORMATS, "output")


def wants_ranking(cfg) -> bool:
    """`--top-k`, or TREC output (a run needs ranks: every row is ranked when no K is given)."""
    return cfg.top_k is not None or output_format(cfg) == TREC


class TopK:
    """Per-group bounded heaps of rows; `ranked()` yields them group by group, best first."""

    def __init__(self, spec: RankSpec, schema: pa.Schema):
        names = schema.names
        spec.check(names)
        self.spec = spec
        self.group = spec.group_column(names)
        keep = [self.group, spec.doc, spec.score] if spec.trec else names
        self.keep = list(dict.fromkeys(c for c in keep if c))
        self.schema = pa.schema([schema.field(c) for c in self.keep])
        self.heaps: dict[Any, list[list]] = {}
        self.seen = 0

    def add(self, batch: pa.RecordBatch) -> None:
        # Kept rows are Python values, built into batches at the end with the widest types seen
        # (`io.schema.widen`): a score column of whole numbers and then 7.9 stays 7.9.
        self.schema = widen(self.schema, pa.schema([batch.schema.field(c) for c in self.keep]))
        groups = batch.column(self.group).to_pylist()
        scores = score_values(batch, self.spec, self.seen)
        fresh: list[list] = []
        for i, (g, s) in enumerate(zip(groups, scores)):
            entry = self._offer(g, s, -(self.seen + i), i)
            if entry is not None:
                fresh.append(entry)
        self._materialize(batch, fresh)
        self.seen += batch.num_rows

    def _offer(self, group: Any, score: float, neg_seq: int, index: int) -> list | None:
        """Push [score, -input position, row] if it belongs in the group's top K; else None.

        The heap's root is the group's worst kept row: the lowest score, the latest row among equals.
        """
        heap = self.heaps.get(group)
        if heap is None:
            heap = self.heaps[group] = []
        entry = [score, neg_seq, index]
        if self.spec.k is None:
            heap.append(entry)
        elif len(heap) < self.spec.k:
            heapq.heappush(heap, entry)
        elif score > heap[0][0]:  # on a tie the newcomer, later in the input, loses: keep the heap
            heapq.heapreplace(heap, entry)
        else:
            return None
        return entry

    def _materialize(self, batch: pa.RecordBatch, fresh: list[list]) -> None:
        """Copy the rows that entered a heap out of the batch, so the batch itself can be freed."""
        if not fresh:
            return
        taken = batch.select(self.keep).take(pa.array([e[2] for e in fresh], type=pa.int64()))
        for entry, row in zip(fresh, zip(*(col.to_pylist() for col in taken.columns))):
            entry[2] = row

    @property
    def kept(self) -> int:
        return sum(len(h) for h in self.heaps.values())

    def ranked(self) -> Iterator[tuple[Any, int, float, tuple]]:
        """(group, rank, score, row) in output order: groups by first appearance, rank ascending."""
        for group, heap in self.heaps.items():
            for rank, (score, _, row) in enumerate(sorted(heap, key=_best_first), 1):
                yield group, rank, score, row

    def in_input_order(self) -> Iterator[tuple[Any, int, tuple]]:
        """(group, position, row): each group's kept rows in input order, positions 1-based."""
        for group, heap in self.heaps.items():
            for position, (_, _, row) in enumerate(sorted(heap, key=lambda e: -e[1]), 1):
                yield group, position, row

    def batches(self, rows: int = OUT_BATCH_ROWS) -> Iterator[pa.RecordBatch]:
        """The kept rows with a `rank` column, in output order, as RecordBatches."""
        buffer: list[tuple[int, tuple]] = []
        for _, rank, _, row in self.ranked():
            buffer.append((rank, row))
            if len(buffer) >= rows:
                yield self._to_batch(buffer)
                buffer = []
        if buffer:
            yield self._to_batch(buffer)

    def _to_batch(self, buffer: list[tuple[int, tuple]]) -> pa.RecordBatch:
        columns = list(zip(*(row for _, row in buffer)))
        arrays = [pa.array(list(values), type=f.type) for values, f in zip(columns, self.schema)]
        fields = list(self.schema)
        ranks = pa.array([rank for rank, _ in buffer], type=pa.int64())
        if RANK_COL in self.schema.names:
            at = self.schema.get_field_index(RANK_COL)
            arrays[at], fields[at] = ranks, pa.field(RANK_COL, pa.int64())
        else:
            arrays.append(ranks)
            fields.append(pa.field(RANK_COL, pa.int64()))
        return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))


def _best_first(entry: list) -> tuple[float, int]:
    return -entry[0], -entry[1]


def score_values(batch: pa.RecordBatch, spec: RankSpec, seen: int) -> list[float]:
    """Scores as floats for ordering (NaN -> -inf); a null or non-numeric score names its row."""
    column = batch.column(spec.score)
    where = display_name(spec.source)
    if column.null_count:
        row = seen + pc.index(pc.is_null(column), True).as_py() + 1
        raise InputError(where, f"{spec.score!r} is null", row=row)
    try:
        values = pc.cast(column, pa.float64()).to_pylist()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        bad = _first_non_number(column.to_pylist())
        raise InputError(where, f"{spec.score!r} is {column.to_pylist()[bad]!r}, not a number",
                         row=seen + bad + 1) from None
    return [-math.inf if math.isnan(v) else v for v in values]


def _first_non_number(values: list[Any]) -> int:
    for i, v in enumerate(values):
        try:
            float(v)
        except (TypeError, ValueError):
            return i
    return 0


class RankingWriter:
    """A writer that ranks: collects while written to, emits the ranked rows into `inner` on close."""

    def __init__(self, inner: Writer, spec: RankSpec):
        self.inner, self.spec = inner, spec
        self.topk: TopK | None = None
        self.rows = 0

    def write(self, batch: pa.RecordBatch) -> None:
        if self.topk is None:
            self.topk = TopK(self.spec, batch.schema)
        self.topk.add(batch)
        self.rows += batch.num_rows

    @property
    def kept(self) -> int:
        return self.topk.kept if self.topk else 0

    @property
    def groups(self) -> int:
        return len(self.topk.heaps) if self.topk else 0

    def __enter__(self) -> RankingWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self.topk is not None:
            try:
                for batch in self.topk.batches():
                    self.inner.write(batch)
            except BaseException as failure:
                self.inner.__exit__(type(failure), failure, failure.__traceback__)
                raise
        self.inner.__exit__(exc_type, exc, tb)


def open_ranked_output(cfg) -> RankingWriter:
    """The ranking sink for a run config: the output writer (atomic for files) wrapped in a ranker."""
    spec = RankSpec.from_config(cfg)
    inner = open_writer(cfg.output, cfg.output_format, overwrite=cfg.overwrite, group_col=cfg.group_col,
                        query_col=spec.query, doc_col=cfg.doc_col, score_col=cfg.score_col, run_tag=cfg.run_tag)
    return RankingWriter(inner, spec)


def check_ranking_columns(cfg, schema: pa.Schema) -> None:
    """Before any scoring: the columns that `--top-k` or TREC output will need are in the input."""
    if wants_ranking(cfg):
        RankSpec.from_config(cfg).check(schema.names, has_score=False)


class TrecWriter(Writer):
    """`qid Q0 docid rank score tag` lines from ranked batches (options: group/doc/score col, tag)."""

    def _write(self, batch: pa.RecordBatch) -> None:
        o = self.options
        spec = RankSpec(group=o.get("group_col"), query=o.get("query_col") or "query")
        names = batch.schema.names
        if RANK_COL not in names:
            raise OutputError(f"{self.path}: TREC output needs ranked rows (a {RANK_COL!r} column)")
        cols = [spec.group_column(names), o.get("doc_col") or "pid", RANK_COL, o.get("score_col") or "score"]
        qids, docs, ranks, scores = (_as_text(batch.column(c), c, self.path) for c in cols)
        tag = _trec_token(o.get("run_tag") or "rerank", "--run-tag", self.path)
        lines = [f"{q} Q0 {d} {r} {s} {tag}\n" for q, d, r, s in zip(qids, docs, ranks, scores)]
        self.sink.write("".join(lines).encode("utf-8"))


def _as_text(column: pa.Array, name: str, path: str) -> list[str]:
    """A TREC field per row: no nulls, no whitespace (trec_eval splits on it)."""
    values = pc.cast(column, pa.string()).to_pylist()
    for v in values:
        _trec_token(v, f"column {name!r}", path)
    return values


def _trec_token(value: str | None, what: str, path: str) -> str:
    if value is None or value == "" or any(ch.isspace() for ch in value):
        raise OutputError(f"{path}: {what} has {value!r}, which cannot be a TREC field "
                          "(empty, null or containing whitespace)")
    return value


register_writer(TREC, TrecWriter)


@dataclass
class RankSummary:
    rows: int
    groups: int
    kept: int
    seconds: float
    k: int | None

    def line(self) -> str:
        kept = f"kept the top {self.k} of each" if self.k else "ranked all of them"
        return (f"ranked {self.rows} rows in {self.groups} groups ({kept}: {self.kept} rows) "
                f"in {self.seconds:.2f} s")


def rank_file(input: str, output: str = "-", *, top_k: int | None = None, **options: Any) -> RankSummary:
    """Rank an already scored file into `output` (Python API of `rerank rank`).

    Options are `RunConfig` fields: score_col, group_col, query_col, doc_col, run_tag, input_format,
    output_format, overwrite.
    """
    from rerank_cli.config import build_config

    return run_rank(build_config({"input": input, "output": output, "top_k": top_k, **options}))


def run_rank(cfg, log: Callable[[str], None] = lambda _: None) -> RankSummary:
    """`rerank rank` for a validated config (input, output, top_k, columns, formats)."""
    from rerank_cli.io.readers import Columns, read_chunks

    started = time.perf_counter()
    check_output_path(cfg.output, [cfg.input], cfg.overwrite)
    spec = RankSpec.from_config(cfg)
    chunks = read_chunks(cfg.input, Columns.scored(), fmt=cfg.input_format, window=cfg.sort_window)
    with open_ranked_output(cfg) as writer:
        for chunk in chunks:
            if writer.topk is None and RANK_COL in chunk.batch.schema.names and not spec.trec:
                log(f"replacing the input's {RANK_COL!r} column with the new ranks")
            writer.write(chunk.batch)
    return RankSummary(writer.rows, writer.groups, writer.kept, time.perf_counter() - started, cfg.top_k)
