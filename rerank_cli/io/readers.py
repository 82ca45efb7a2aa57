"""Stream an input file as `Chunk`s of at most `window` valid pairs, in input order.

Owns parsing and validation: every bad row is reported with the file and the 1-based line (JSONL, CSV)
or row (Parquet, Arrow), either as an `InputError` or, with `on_bad_row=skip`, as a `Reject` carried
by the chunk. Never reads the whole file at once. Knows nothing about models or output. Parses JSONL
and CSV/TSV here (types widened chunk by chunk by `schema.widen`); Parquet and Arrow are `columnar.py`'s.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from rerank_cli.errors import ConfigError, InputError, first_line
from rerank_cli.io.chunks import Chunk, Columns, Reject
from rerank_cli.io.columnar import _arrow, _parquet
from rerank_cli.io.formats import (
    READ_FORMATS,
    STREAM,
    detect_format,
    display_name,
    open_input_stream,
)
from rerank_cli.io.schema import TypeChange, conform, widen, widen_type


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
        """This chunk's rows, typed by themselves, then widened with the earlier chunks' types
        (`schema.widen`): 7 in the first chunk and 7.9 in a later one make a float column, never 7."""
        if self.schema is None:
            names = list(dict.fromkeys(k for row in self.rows for k in row))
            if self.columns.score in names:
                raise ConfigError(
                    f"{display_name(self.path)} already has a column {self.columns.score!r}; "
                    "name the new one with --score-col"
                )
        else:
            self._check_new_keys()
            names = self.schema.names
        batch = pa.RecordBatch.from_arrays([self._column(name, None) for name in names], names=names)
        try:
            self.schema = widen(self.schema, batch.schema)
            return conform(batch, self.schema)
        except TypeChange as change:
            name, type_ = change.name, change.old
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            name = next(f.name for f, n in zip(self.schema, batch.schema) if not f.type.equals(n.type))
            type_ = self.schema.field(name).type
        values = [row.get(name) for row in self.rows]
        raise InputError(display_name(self.path), f"column {name!r} changes type here (earlier rows: {type_})",
                         line=self.lines[_first_odd_value(values, type_)]) from None

    def _column(self, name: str, type_: pa.DataType | None) -> pa.Array:
        values = [row.get(name) for row in self.rows]
        try:
            return pa.array(values, type=type_)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            i = _first_odd_value(values, type_)
            if isinstance(values[i], int) and not -(2**63) <= values[i] < 2**63:
                raise InputError(display_name(self.path), f"column {name!r} holds an integer past 64 bits",
                                 line=self.lines[i]) from None
            known = self.schema is not None and name in self.schema.names
            earlier = self.schema.field(name).type if known else pa.array(values[:i]).type
            raise InputError(display_name(self.path), f"column {name!r} changes type here (earlier rows: {earlier})",
                             line=self.lines[i]) from None

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
    """Index of the first value that does not fit the earlier ones' type (`type_`, else inferred)."""
    errors = (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError)
    for i, value in enumerate(values):
        try:
            if type_ is None:
                pa.array(values[: i + 1])
            elif value is not None:
                widen_type("", type_, pa.array([value]).type)
                pa.array([value]).cast(type_, safe=True)
        except (*errors, TypeChange):
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
    line_no = 0
    with _stream(path) as stream:
        with _unreadable(path, lambda: line_no + 1):
            for line_no, raw in enumerate(stream, 1):
                if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8):]  # a byte-order mark is not part of the first key
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
    except RecursionError:
        buf.bad(line_no, "JSON nested too deeply", shown[:200])
        return None
    if "\\u" in text and _has_lone_surrogate(obj):
        buf.bad(line_no, "a \\u escape that is a lone surrogate (not a character: not valid UTF-8)", shown)
        return None
    if not isinstance(obj, dict):
        buf.bad(line_no, f"expected a JSON object, got {type(obj).__name__}", shown)
        return None
    return obj


def _has_lone_surrogate(obj: Any) -> bool:
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


class _unreadable:
    """A stream that fails mid-read (a corrupt or truncated .gz, a file that is not gzip at all) is an
    InputError naming the line it could not read."""

    def __init__(self, path: str, line):
        self.path, self.line = path, line

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, OSError):
            raise InputError(display_name(self.path), f"cannot be read ({first_line(exc)})",
                             line=self.line()) from None
        return False


def _csv(path: str, columns: Columns, window: int, skip_bad: bool, fmt: str) -> Iterator[Chunk]:
    """CSV as Python's csv module reads it, strictly (a quote must close before the end of the file
    and within MAX_RECORD_LINES lines); TSV with no quoting at all: a field is what lies between tabs."""
    buf = _RowBuffer(path, columns, skip_bad)
    name = display_name(path)
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # a passage may be long; lines are bounded
    with _stream(path) as stream:
        text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")  # -sig: a BOM is not a name
        lines = _LineCounter(text)
        dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {"strict": True}
        reader = csv.reader(lines, **dialect)
        try:
            with _unreadable(path, lambda: lines.count + 1):
                header = next(reader, None)
                if header is None:
                    return
                _check_header(name, header, columns)
                lines.start = lines.count + 1
                for fields in reader:
                    line, lines.start = lines.start, lines.count + 1
                    if len(fields) != len(header):
                        buf.bad(line, f"expected {len(header)} fields, got {len(fields)}", ",".join(fields))
                        continue
                    buf.add(line, dict(zip(header, fields)), ",".join(fields))
                    if len(buf.rows) >= window:
                        yield buf.flush()
        except UnicodeDecodeError as exc:
            raise InputError(name, f"bytes that are not UTF-8 (at byte {exc.start} of a read block)",
                             line=lines.count + 1) from None
        except _OpenQuote:
            raise InputError(name, f"a quoted field opens here and does not close within {MAX_RECORD_LINES:,} "
                                   "lines (an unclosed quote?)", line=lines.start) from None
        except csv.Error as exc:
            if "end of data" in str(exc):
                raise InputError(name, "a quoted field opens here and never closes", line=lines.start) from None
            raise InputError(name, f"malformed CSV ({exc})", line=lines.count) from None
    if buf.rows or buf.rejects or buf.schema is None:
        yield buf.flush() if buf.rows or buf.rejects else _header_only(header)


MAX_RECORD_LINES = 10_000  # a CSV record (quoted newlines included) spanning more lines is an error


class _OpenQuote(Exception):
    pass


class _LineCounter:
    """Feeds csv.reader line by line, counting; `start` is the line the record being read began on."""

    def __init__(self, text):
        self.text, self.count, self.start = text, 0, 1

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = next(self.text)
        self.count += 1
        if self.count - self.start >= MAX_RECORD_LINES:
            raise _OpenQuote()
        return line


def _header_only(header: list[str]) -> Chunk:
    """A CSV file with a header and no rows: no rows, but its columns (all strings), for the output."""
    return Chunk(pa.RecordBatch.from_pylist([], schema=pa.schema([(n, pa.string()) for n in header])))


def _check_header(name: str, header: list[str], columns: Columns) -> None:
    twice = next((n for i, n in enumerate(header) if n in header[:i]), None)
    if twice is not None:
        raise InputError(name, f"two columns are named {twice!r}; rename one", line=1)
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


