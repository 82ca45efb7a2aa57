"""Stream an input file as `Chunk`s of at most `window` valid pairs, in input order.

Owns parsing and validation: every bad row is reported with the file and the 1-based line (JSONL, CSV)
or row (Parquet, Arrow), either as an `InputError` or, with `on_bad_row=skip`, as a `Reject` carried
by the chunk. Never reads the whole file at once. Knows nothing about models or output.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from rerank_cli.errors import ConfigError, InputError, first_line
from rerank_cli.io.formats import READ_FORMATS, STREAM, detect_format, display_name, open_input_stream


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


def read_chunks(
    path: str, columns: Columns, *, fmt: str | None = None, window: int = 4096, skip_bad: bool = False
) -> Iterator[Chunk]:
    """Yield chunks of `path` in input order. Raises InputError on the first bad row unless skip_bad."""
    fmt = detect_format(path, fmt, READ_FORMATS, "input")
    if path != STREAM and not os.path.exists(path):
        raise InputError(path, "no such file")
    if path != STREAM and os.path.isdir(path):
        raise InputError(path, "is a directory, not a file")
    reader = {"jsonl": _jsonl, "csv": _csv, "tsv": _csv, "parquet": _parquet, "arrow": _arrow}[fmt]
    yield from reader(path, columns, window, skip_bad, fmt)


# --- row-wise formats (JSONL, CSV): validated in Python, with exact line numbers ---------------


class _RowBuffer:
    """Collects validated rows, fixes the schema from the first chunk, emits RecordBatches."""

    def __init__(self, path: str, columns: Columns, skip_bad: bool):
        self.path, self.columns, self.skip_bad = path, columns, skip_bad
        self.rows: list[dict[str, Any]] = []
        self.lines: list[int] = []
        self.rejects: list[Reject] = []
        self.schema: pa.Schema | None = None

    def bad(self, line: int, message: str, raw: str) -> None:
        if not self.skip_bad:
            raise InputError(display_name(self.path), message, line=line)
        self.rejects.append(Reject(f"line {line}", message, raw))

    def add(self, line: int, row: dict[str, Any], raw: str) -> None:
        problem = pair_problem(row, self.columns)
        if problem:
            self.bad(line, problem, raw)
        else:
            self.rows.append(row)
            self.lines.append(line)

    def flush(self) -> Chunk:
        batch = self._to_batch()
        chunk = Chunk(batch, self.rejects)
        self.rows, self.lines, self.rejects = [], [], []
        return chunk

    def _to_batch(self) -> pa.RecordBatch:
        if self.schema is None:
            names = list(dict.fromkeys(k for row in self.rows for k in row))
            if self.columns.score in names:
                raise ConfigError(
                    f"{display_name(self.path)} already has a column {self.columns.score!r}; "
                    "name the new one with --score-col"
                )
            arrays = [self._column(name, None) for name in names]
            batch = pa.RecordBatch.from_arrays(arrays, names=names)
            self.schema = batch.schema
            return batch
        self._check_new_keys()
        arrays = [self._column(f.name, f.type) for f in self.schema]
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)

    def _column(self, name: str, type_: pa.DataType | None) -> pa.Array:
        values = [row.get(name) for row in self.rows]
        try:
            return pa.array(values, type=type_)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            line = self.lines[_first_odd_value(values, type_)]
            seen = f" ({type_})" if type_ is not None else ""
            raise InputError(
                display_name(self.path), f"column {name!r} changes type here{seen}", line=line
            ) from None

    def _check_new_keys(self) -> None:
        known = set(self.schema.names)
        for row, line in zip(self.rows, self.lines):
            extra = [k for k in row if k not in known]
            if extra:
                raise InputError(
                    display_name(self.path),
                    f"key {extra[0]!r} first appears here, after the first chunk fixed the columns; "
                    "put it on an early row or raise --sort-window",
                    line=line,
                )


def _first_odd_value(values: list[Any], type_: pa.DataType | None) -> int:
    """Index of the first value that does not fit the type of the earlier ones."""
    for i in range(len(values)):
        try:
            pa.array(values[: i + 1], type=type_)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            return i
    return 0


def pair_problem(row: dict[str, Any], columns: Columns) -> str | None:
    """Why this row cannot be scored, or None."""
    for name in columns.required:
        if name not in row:
            return f"missing key {name!r}"
        value = row[name]
        if value is None:
            return f"{name!r} is null"
        if not isinstance(value, str):
            return f"{name!r} is {type(value).__name__}, not a string"
    return None


def _jsonl(path: str, columns: Columns, window: int, skip_bad: bool, fmt: str) -> Iterator[Chunk]:
    buf = _RowBuffer(path, columns, skip_bad)
    with _stream(path) as stream:
        for line_no, raw in enumerate(stream, 1):
            row = _parse_json_line(buf, line_no, raw)
            if row is not None:
                buf.add(line_no, row, raw.decode("utf-8", "replace").rstrip("\n"))
            if len(buf.rows) >= window:
                yield buf.flush()
    if buf.rows or buf.rejects:
        yield buf.flush()


def _parse_json_line(buf: _RowBuffer, line_no: int, raw: bytes) -> dict[str, Any] | None:
    if not raw.strip():
        return None
    shown = raw.decode("utf-8", "replace").rstrip("\n")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        buf.bad(line_no, f"bytes that are not UTF-8 (at byte {exc.start})", shown)
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        buf.bad(line_no, f"malformed JSON ({exc.msg} at column {exc.colno})", shown)
        return None
    if not isinstance(obj, dict):
        buf.bad(line_no, f"expected a JSON object, got {type(obj).__name__}", shown)
        return None
    return obj


def _csv(path: str, columns: Columns, window: int, skip_bad: bool, fmt: str) -> Iterator[Chunk]:
    buf = _RowBuffer(path, columns, skip_bad)
    name = display_name(path)
    with _stream(path) as stream:
        text = io.TextIOWrapper(stream, encoding="utf-8", newline="")
        reader = csv.reader(text, delimiter="\t" if fmt == "tsv" else ",")
        try:
            header = next(reader, None)
            if header is None:
                return
            _check_header(name, header, columns)
            for fields in reader:
                line = reader.line_num
                if len(fields) != len(header):
                    buf.bad(line, f"expected {len(header)} fields, got {len(fields)}", ",".join(fields))
                    continue
                buf.add(line, dict(zip(header, fields)), ",".join(fields))
                if len(buf.rows) >= window:
                    yield buf.flush()
        except UnicodeDecodeError as exc:
            raise InputError(name, f"bytes that are not UTF-8 (at byte {exc.start} of a read block)",
                             line=reader.line_num + 1) from None
        except csv.Error as exc:
            raise InputError(name, f"malformed CSV ({exc})", line=reader.line_num) from None
    if buf.rows or buf.rejects:
        yield buf.flush()


def _check_header(name: str, header: list[str], columns: Columns) -> None:
    missing = [c for c in columns.required if c not in header]
    if missing:
        raise InputError(name, f"missing column {missing[0]!r} (columns: {', '.join(header)})", line=1)
    if columns.score in header:
        raise ConfigError(f"{name} already has a column {columns.score!r}; name the new one with --score-col")


class _stream:
    """Context manager for an input byte stream that leaves stdin open."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        try:
            self.fh = open_input_stream(self.path)
        except OSError as exc:
            raise InputError(display_name(self.path), f"cannot open ({exc})") from None
        return self.fh if self.path == STREAM else io.BufferedReader(_RawAdapter(self.fh))

    def __exit__(self, *exc_info):
        if self.path != STREAM:
            self.fh.close()


class _RawAdapter(io.RawIOBase):
    """Lets io.BufferedReader (line iteration) sit on a pyarrow NativeFile (decompression)."""

    def __init__(self, native):
        self.native = native

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.native.read(len(b))
        b[: len(data)] = data
        return len(data)


# --- columnar formats (Parquet, Arrow IPC): validated with Arrow compute, rows are 1-based ----------


def _parquet(path: str, columns: Columns, window: int, skip_bad: bool, fmt: str) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    name = display_name(path)
    source = io.BytesIO(open_input_stream(path).read()) if path == STREAM else path
    try:
        pf = pq.ParquetFile(source)
        batches = pf.iter_batches(batch_size=window)
        yield from _columnar(name, pf.schema_arrow, batches, columns, skip_bad)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        raise InputError(name, f"not a readable Parquet file ({first_line(exc)})") from None


def _arrow(path: str, columns: Columns, window: int, skip_bad: bool, fmt: str) -> Iterator[Chunk]:
    import pyarrow.ipc as ipc

    name = display_name(path)
    try:
        with pa.memory_map(path) as source:
            reader = ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            yield from _columnar(name, reader.schema, _rebatch(batches, window), columns, skip_bad)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(name, f"not a readable Arrow file ({first_line(exc)})") from None


def _rebatch(batches: Iterator[pa.RecordBatch], window: int) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        for start in range(0, batch.num_rows, window):
            yield batch.slice(start, window)


def _columnar(name, schema, batches, columns: Columns, skip_bad: bool) -> Iterator[Chunk]:
    _check_schema(name, schema, columns)
    first_row = 1
    for batch in batches:
        yield _validate_batch(name, batch, columns, skip_bad, first_row)
        first_row += batch.num_rows


def _check_schema(name: str, schema: pa.Schema, columns: Columns) -> None:
    for col in columns.required:
        if col not in schema.names:
            raise InputError(name, f"missing column {col!r} (columns: {', '.join(schema.names)})")
        type_ = schema.field(col).type
        if not (pa.types.is_string(type_) or pa.types.is_large_string(type_)
                or pa.types.is_string_view(type_) or pa.types.is_null(type_)):
            raise InputError(name, f"column {col!r} holds {type_}, not strings")
    if columns.score in schema.names:
        raise ConfigError(f"{name} already has a column {columns.score!r}; name the new one with --score-col")


def _validate_batch(name, batch: pa.RecordBatch, columns: Columns, skip_bad: bool, first_row: int) -> Chunk:
    if not columns.required:
        return Chunk(batch)
    bad = None
    for col in columns.required:
        nulls = pc.is_null(batch.column(col))
        bad = nulls if bad is None else pc.or_(bad, nulls)
    if not pc.any(bad).as_py():
        return Chunk(batch)
    indices = pc.indices_nonzero(bad).to_pylist()
    if not skip_bad:
        row = batch.slice(indices[0], 1).to_pylist()[0]
        col = next(c for c in columns.required if row[c] is None)
        raise InputError(name, f"{col!r} is null", row=first_row + indices[0])
    rejects = [_columnar_reject(batch, i, first_row, columns) for i in indices]
    return Chunk(batch.filter(pc.invert(bad)), rejects)


def _columnar_reject(batch: pa.RecordBatch, i: int, first_row: int, columns: Columns) -> Reject:
    row = batch.slice(i, 1).to_pylist()[0]
    col = next(c for c in columns.required if row[c] is None)
    return Reject(f"row {first_row + i}", f"{col!r} is null", json.dumps(row, default=str))
