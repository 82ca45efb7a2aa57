"""Write scored RecordBatches to JSONL, Parquet, CSV/TSV or Arrow, atomically.

Owns output safety: a file output is written to a hidden temporary file beside the target and renamed
into place only on `commit()`; any failure removes the temporary file, so no partial output is ever
left. Refuses to write over the input, and over an existing file unless told to. `-` streams JSONL
(or another format named explicitly) to stdout.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc

from rerank_cli.errors import OutputError
from rerank_cli.io.formats import STREAM, WRITE_FORMATS, detect_format


def check_output_path(output: str, inputs: list[str], overwrite: bool) -> None:
    """Fail before any work if `output` is an input or an existing file we were not told to replace."""
    if output == STREAM:
        return
    out = Path(output)
    for inp in inputs:
        if inp != STREAM and os.path.exists(inp) and out.exists() and os.path.samefile(inp, out):
            raise OutputError(f"{output}: refusing to write over the input file")
        if inp != STREAM and Path(inp).resolve() == out.resolve():
            raise OutputError(f"{output}: refusing to write over the input file")
    if out.is_dir():
        raise OutputError(f"{output}: is a directory")
    if out.exists() and not overwrite:
        raise OutputError(f"{output}: already exists; pass --overwrite to replace it")
    if not out.parent.exists():
        raise OutputError(f"{output}: folder {str(out.parent)!r} does not exist")


class AtomicFile:
    """A temporary path beside `target`, renamed onto it by `commit`, removed by `discard`."""

    def __init__(self, target: str):
        self.target = Path(target)
        self.tmp = self.target.with_name(f".{self.target.name}.rerank-tmp-{os.getpid()}")

    def commit(self) -> None:
        os.replace(self.tmp, self.target)

    def discard(self) -> None:
        try:
            self.tmp.unlink()
        except FileNotFoundError:
            pass


class Writer:
    """Format-specific sink; `open_writer` picks the subclass. Use as a context manager."""

    def __init__(self, path: str, sink: BinaryIO, atomic: AtomicFile | None):
        self.path, self.sink, self.atomic = path, sink, atomic
        self.rows = 0

    def write(self, batch: pa.RecordBatch) -> None:
        self._write(batch)
        self.rows += batch.num_rows

    def _write(self, batch: pa.RecordBatch) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _close(self) -> None:
        pass

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._close()
        finally:
            if self.sink is not sys.stdout.buffer:
                self.sink.close()
            else:
                self.sink.flush()
        if self.atomic is None:
            return
        if exc_type is None:
            self.atomic.commit()
        else:
            self.atomic.discard()


class JsonlWriter(Writer):
    def _write(self, batch: pa.RecordBatch) -> None:
        lines = [json.dumps(row, ensure_ascii=False, default=str) for row in _json_ready(batch).to_pylist()]
        if lines:
            self.sink.write(("\n".join(lines) + "\n").encode("utf-8"))


def _json_ready(batch: pa.RecordBatch) -> pa.RecordBatch:
    """float32 columns as the shortest decimal that round-trips (0.1234 rather than 0.12340000271)."""
    arrays = [
        pc.cast(pc.cast(col, pa.string()), pa.float64()) if pa.types.is_float32(col.type) else col
        for col in batch.columns
    ]
    return pa.RecordBatch.from_arrays(arrays, names=batch.schema.names)


class ParquetWriter(Writer):
    def _write(self, batch: pa.RecordBatch) -> None:
        import pyarrow.parquet as pq

        if not hasattr(self, "_pq"):
            self._pq = pq.ParquetWriter(self.sink, batch.schema)
        self._pq.write_batch(batch)

    def _close(self) -> None:
        if not hasattr(self, "_pq"):  # no rows at all: still a valid (empty) Parquet file
            self._write(pa.RecordBatch.from_pydict({}))
        self._pq.close()


class CsvWriter(Writer):
    delimiter = ","

    def _write(self, batch: pa.RecordBatch) -> None:
        import pyarrow.csv as pcsv

        if not hasattr(self, "_csv"):
            opts = pcsv.WriteOptions(delimiter=self.delimiter, quoting_style="needed")
            self._csv = pcsv.CSVWriter(self.sink, batch.schema, write_options=opts)
        self._csv.write_batch(batch)

    def _close(self) -> None:
        if hasattr(self, "_csv"):
            self._csv.close()


class TsvWriter(CsvWriter):
    delimiter = "\t"


class ArrowWriter(Writer):
    def _write(self, batch: pa.RecordBatch) -> None:
        import pyarrow.ipc as ipc

        if not hasattr(self, "_ipc"):
            self._ipc = ipc.new_file(self.sink, batch.schema)
        self._ipc.write_batch(batch)

    def _close(self) -> None:
        if not hasattr(self, "_ipc"):
            self._write(pa.RecordBatch.from_pydict({}))
        self._ipc.close()


WRITERS: dict[str, type[Writer]] = {
    "jsonl": JsonlWriter, "parquet": ParquetWriter, "csv": CsvWriter, "tsv": TsvWriter, "arrow": ArrowWriter,
}


def register_writer(fmt: str, cls: type[Writer]) -> None:
    """Let another module (e.g. TREC output in ranking) plug in a format."""
    WRITERS[fmt] = cls


def open_writer(path: str, fmt: str | None = None, **options: Any) -> Writer:
    """A writer for `path` (`-` is stdout). File output is atomic: see `AtomicFile`."""
    fmt = detect_format(path, fmt, WRITE_FORMATS, "output")
    cls = WRITERS.get(fmt)
    if cls is None:
        raise OutputError(f"{path}: output format {fmt!r} is not available here")
    if path == STREAM:
        writer = cls(path, sys.stdout.buffer, None)
    else:
        atomic = AtomicFile(path)
        writer = cls(path, open(atomic.tmp, "wb"), atomic)
    writer.options = options
    return writer


def write_rejects(path: str, rejects: list, source: str) -> None:
    """Append rejected rows as JSON lines: {"source", "where", "error", "raw"}."""
    with open(path, "a", encoding="utf-8") as fh:
        for r in rejects:
            fh.write(json.dumps({"source": source, "where": r.where, "error": r.error, "raw": r.raw},
                                ensure_ascii=False) + "\n")
