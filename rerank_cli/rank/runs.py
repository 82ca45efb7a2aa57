"""Load what `rerank eval` compares: runs (TREC run files or scored tables) and qrels (TREC or tables).

A run comes back as `{qid: {docid: score}}`, the form trec_eval-style tools take. A TREC run keeps its
own scores, so it is evaluated exactly as trec_eval would (by score; trec_eval breaks ties by docid).
A scored table (JSONL, Parquet, CSV, ...) is ranked by `ranking.TopK` (score descending, ties by input
order) and its scores are replaced by `-rank`, so the evaluated order is exactly `rerank rank`'s. The
same table read in input order gives the first-stage baseline (`--baseline-input-order`).

Qrels: TREC (`qid 0 docid relevance`) or a table with `qid`, `docid` (or `--doc-col`) and `relevance`
(or `rel`, `label`) columns. Knows nothing of metrics.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from rerank_cli.errors import InputError
from rerank_cli.io.formats import READ_FORMATS, STREAM, detect_format, display_name, open_input_stream
from rerank_cli.rank.ranking import RANK_COL, RankSpec, TopK

Run = dict[str, dict[str, float]]
Qrels = dict[str, dict[str, int]]
TREC_SUFFIXES = (".trec", ".run", ".qrels")
TABLE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".pq", ".csv", ".arrow", ".feather", ".ipc")
RELEVANCE_COLS = ("relevance", "rel", "label")


@dataclass(frozen=True)
class RunColumns:
    """Where a scored table keeps the query id, the document id and the score."""

    score: str = "score"
    group: str | None = None  # default: qid, else the query text
    doc: str = "pid"
    query: str = "query"


@dataclass
class LoadedRun:
    """A run ready to evaluate, its display name, and what the reader noticed on the way."""

    name: str
    run: Run
    notes: list[str] = field(default_factory=list)


def is_trec(path: str, fmt: str | None, fields: int) -> bool:
    """TREC text when told so, by extension, or (.txt, .tsv, no known table extension) by its first line."""
    if fmt:
        return fmt.lower() == "trec"
    if path == STREAM:
        return False
    suffixes = [s.lower() for s in PurePath(path).suffixes if s.lower() not in (".gz", ".bz2", ".zst", ".lz4")]
    last = suffixes[-1] if suffixes else ""
    if last in TREC_SUFFIXES:
        return True
    if last in TABLE_SUFFIXES:
        return False
    return _first_line_fields(path) == fields


def _first_line_fields(path: str) -> int | None:
    try:
        with _lines(path) as lines:
            for _, line in lines:
                if line.strip():
                    return len(line.split())
    except (InputError, UnicodeDecodeError):
        return None
    return None


class _lines:
    """(1-based line number, text) pairs of a possibly compressed text file, or of stdin."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        try:
            self.text = io.TextIOWrapper(open_input_stream(self.path), encoding="utf-8")
        except OSError as exc:
            raise InputError(display_name(self.path), f"cannot open ({exc})") from None
        return enumerate(self.text, 1)

    def __exit__(self, *exc_info):
        if self.path == STREAM:
            self.text.detach()
        else:
            self.text.close()


def _trec_fields(path: str, fields: int, layout: str):
    """Yield (line, fields) of a whitespace-separated file, naming the line of any malformed one."""
    _exists(path)
    name = display_name(path)
    with _lines(path) as lines:
        try:
            for line_no, line in lines:
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != fields:
                    raise InputError(name, f"expected {fields} fields ({layout}), got {len(parts)}", line=line_no)
                yield line_no, parts
        except UnicodeDecodeError as exc:
            raise InputError(name, f"bytes that are not UTF-8 ({exc.reason})") from None


def _exists(path: str) -> None:
    if path != STREAM and not Path(path).is_file():
        raise InputError(path, "no such file")


def read_trec_run(path: str) -> LoadedRun:
    """A TREC run file: `qid Q0 docid rank score tag` per line."""
    run: Run = {}
    name = display_name(path)
    for line_no, (qid, _, doc, _, score, _) in _trec_fields(path, 6, "qid Q0 docid rank score tag"):
        try:
            value = float(score)
        except ValueError:
            raise InputError(name, f"score {score!r} is not a number", line=line_no) from None
        docs = run.setdefault(qid, {})
        if doc in docs:
            raise InputError(name, f"document {doc!r} appears twice for query {qid!r}", line=line_no)
        docs[doc] = value
    return LoadedRun(name, run)


def read_scored(path: str, columns: RunColumns, fmt: str | None = None) -> tuple[LoadedRun, LoadedRun]:
    """A scored table as two runs: ranked by score (the reranker), and in input order (the first stage)."""
    from rerank_cli.io.readers import Columns, read_chunks

    spec = RankSpec(score=columns.score, group=columns.group, query=columns.query, doc=columns.doc,
                    trec=True, source=path)
    topk, has_rank = None, False
    for chunk in read_chunks(path, Columns.scored(), fmt=fmt):
        if topk is None:
            topk = TopK(spec, chunk.batch.schema)
            has_rank = RANK_COL in chunk.batch.schema.names
        topk.add(chunk.batch)
    name = display_name(path)
    if topk is None:
        raise InputError(name, "has no rows")
    ranked = _as_run(name, ((g, r, row[1]) for g, r, _, row in topk.ranked()))
    ordered = _as_run(name, ((g, r, row[1]) for g, r, row in topk.in_input_order()))
    first_stage = LoadedRun(f"{name} (input order)", ordered)
    if has_rank:
        first_stage.notes.append(f"{name} has a {RANK_COL!r} column: if it is already ranked, its input "
                                 "order is the reranked order, not the first stage")
    return LoadedRun(name, ranked), first_stage


def _as_run(name: str, ranked) -> Run:
    """(group, rank, doc) triples -> {qid: {doc: -rank}}: higher is better, as trec_eval expects."""
    run: Run = {}
    for group, rank, doc in ranked:
        qid, docid = str(group), str(doc)
        docs = run.setdefault(qid, {})
        if docid in docs:
            raise InputError(name, f"document {docid!r} appears twice for query {qid!r}")
        docs[docid] = float(-rank)
    return run


def load_run(path: str, columns: RunColumns, fmt: str | None = None) -> tuple[LoadedRun, LoadedRun | None]:
    """The run in `path`, and its input order when it is a scored table (None for a TREC run)."""
    _exists(path)
    if is_trec(path, fmt, 6):
        return read_trec_run(path), None
    return read_scored(path, columns, _table_format(path, fmt))


def _table_format(path: str, fmt: str | None) -> str:
    return detect_format(path, fmt, READ_FORMATS, "input")


def read_qrels(path: str, doc_col: str = "pid", fmt: str | None = None) -> Qrels:
    """Relevance judgements `{qid: {docid: relevance}}` from TREC qrels or a table."""
    _exists(path)
    if is_trec(path, fmt, 4):
        return _trec_qrels(path)
    return _table_qrels(path, doc_col, _table_format(path, fmt))


def _trec_qrels(path: str) -> Qrels:
    qrels: Qrels = {}
    name = display_name(path)
    for line_no, (qid, _, doc, rel) in _trec_fields(path, 4, "qid 0 docid relevance"):
        try:
            qrels.setdefault(qid, {})[doc] = int(rel)
        except ValueError:
            raise InputError(name, f"relevance {rel!r} is not an integer", line=line_no) from None
    return qrels


def _table_qrels(path: str, doc_col: str, fmt: str) -> Qrels:
    import pyarrow as pa
    import pyarrow.compute as pc

    from rerank_cli.io.readers import Columns, read_chunks

    name = display_name(path)
    qrels: Qrels = {}
    row = 0
    for chunk in read_chunks(path, Columns.scored(), fmt=fmt):
        batch = chunk.batch
        qid, doc, rel = _qrels_columns(name, batch.schema.names, doc_col)
        try:
            rels = pc.cast(batch.column(rel), pa.int64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise InputError(name, f"column {rel!r} must hold integer relevance grades") from None
        for i, (q, d, r) in enumerate(zip(*(c.to_pylist() for c in (batch.column(qid), batch.column(doc), rels)))):
            if q is None or d is None or r is None:
                raise InputError(name, f"empty {qid!r}, {doc!r} or {rel!r}", row=row + i + 1)
            qrels.setdefault(str(q), {})[str(d)] = r
        row += batch.num_rows
    return qrels


def _qrels_columns(name: str, names: list[str], doc_col: str) -> tuple[str, str, str]:
    doc = next((c for c in ("docid", doc_col) if c in names), None)
    rel = next((c for c in RELEVANCE_COLS if c in names), None)
    if "qid" not in names or doc is None or rel is None:
        raise InputError(name, f"qrels need columns qid, docid (or {doc_col}) and relevance (or rel, label); "
                               f"found: {', '.join(names)}")
    return "qid", doc, rel
