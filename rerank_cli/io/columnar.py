"""Parquet and Arrow IPC input: streamed record batches, validated with Arrow compute; rows are 1-based.

Owns the columnar formats only (the row-wise ones are in `readers.py`, which dispatches here).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from rerank_cli.errors import ConfigError, InputError, first_line
from rerank_cli.io.chunks import Chunk, Columns, Reject
from rerank_cli.io.formats import display_name, is_regular, open_input_stream


def _parquet(path: str, columns: Columns, window: int, skip_bad: bool, fmt: str) -> Iterator[Chunk]:
    """Streamed in record batches of `window` rows with pre-buffering off, so memory stays flat
    whatever the row-group size the writer chose (one 200,000-row group is not decoded whole)."""
    import pyarrow.parquet as pq

    name = display_name(path)
    source = path if is_regular(path) else io.BytesIO(_read_all(path))
    try:
        pf = pq.ParquetFile(source, pre_buffer=False, buffer_size=1 << 20)
        batches = pf.iter_batches(batch_size=window)
        yield from _columnar(name, pf.schema_arrow, batches, columns, skip_bad)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        raise InputError(name, f"not a readable Parquet file ({first_line(exc)})") from None


def _arrow(path: str, columns: Columns, window: int, skip_bad: bool, fmt: str) -> Iterator[Chunk]:
    import pyarrow.ipc as ipc

    name = display_name(path)
    try:
        with (pa.memory_map(path) if is_regular(path) else pa.BufferReader(_read_all(path))) as source:
            reader = ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            yield from _columnar(name, reader.schema, _rebatch(batches, window), columns, skip_bad)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(name, f"not a readable Arrow file ({first_line(exc)})") from None


def _read_all(path: str) -> bytes:
    """Stdin, a FIFO or `<(...)`: a columnar file needs seeking, so it is read into memory first."""
    try:
        with open_input_stream(path) as stream:
            return stream.read()
    except OSError as exc:
        raise InputError(display_name(path), f"cannot be read ({first_line(exc)})") from None


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
    if first_row == 1:  # no rows: still the columns, so the output has its schema
        yield Chunk(pa.RecordBatch.from_pylist([], schema=schema))


def _check_schema(name: str, schema: pa.Schema, columns: Columns) -> None:
    twice = next((n for i, n in enumerate(schema.names) if n in schema.names[:i]), None)
    if twice is not None:
        raise InputError(name, f"two columns are named {twice!r}; rename one")
    for col in columns.required:
        if col not in schema.names:
            raise InputError(name, f"missing column {col!r} (columns: {', '.join(schema.names)})")
        type_ = schema.field(col).type
        if pa.types.is_dictionary(type_):  # pandas' category: dictionary-encoded strings are strings
            type_ = type_.value_type
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
