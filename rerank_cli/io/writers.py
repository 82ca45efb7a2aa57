"""Write scored RecordBatches to JSONL, Parquet, CSV/TSV or Arrow, atomically.

Owns the formats: a file output goes through `atomic.AtomicFile` (a hidden temporary file renamed into
place without clobbering, only on success), `.gz`/`.bz2`/`.zst` outputs are compressed, and `-` streams
JSONL (or another format named explicitly) to stdout. A batch whose column types are a widening of the
earlier ones' (`schema.widen`: int then float) is taken as is by JSONL and CSV; Parquet and Arrow files
are rewritten once with the wider schema. Any failed write is one line (`OutputError`), and a stdout
closed by its reader (`| head`) is `OutputClosed`.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc

from rerank_cli.errors import OutputClosed, OutputError
from rerank_cli.io.atomic import AtomicFile, os_error
from rerank_cli.io.formats import STREAM, WRITE_FORMATS, compression_of, detect_format
from rerank_cli.io.paths import check_paths
from rerank_cli.io.schema import TypeChange, conform, widen


def check_output_path(output: str, inputs: list[str], overwrite: bool) -> None:
    """Fail before any work if `output` is an input or an existing file we were not told to replace."""
    check_paths(inputs, [("output", output)], overwrite)


class Writer:
    """Format-specific sink; `open_writer` picks the subclass. Use as a context manager."""

    def __init__(self, path: str, sink: BinaryIO, atomic: AtomicFile | None):
        self.path, self.sink, self.atomic = path, sink, atomic
        self.to_stdout = sink is sys.stdout.buffer  # now: sys.stdout may be redirected later (Ray's driver)
        self.rows = 0
        self.schema: pa.Schema | None = None

    def write(self, batch: pa.RecordBatch) -> None:
        batch = self._conform(batch)
        with self._guard():
            self._write(batch)
        self.rows += batch.num_rows

    def _conform(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        if self.schema is None or batch.schema.equals(self.schema):
            self.schema = self.schema or batch.schema
            return batch
        try:
            wider = widen(self.schema, batch.schema)
            if not wider.equals(self.schema):
                with self._guard():
                    self._widen(wider)
                self.schema = wider
            return conform(batch, wider)
        except (TypeChange, pa.ArrowInvalid) as exc:
            raise OutputError(f"{self.path}: after row {self.rows}, {exc}; the earlier rows cannot take "
                              "these values without changing them") from None

    def _widen(self, schema: pa.Schema) -> None:
        """The columns widen after `self.rows` rows were written (JSONL needs nothing)."""

    def _write(self, batch: pa.RecordBatch) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _close(self) -> None:
        pass

    def _guard(self):
        return _Guard(self.path, self.to_stdout)

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            with self._guard():
                try:
                    self._close()
                finally:
                    if not self.to_stdout:
                        self.sink.close()
                    else:
                        self.sink.flush()
        except BaseException:
            if self.atomic is not None:
                self.atomic.discard()
            if exc_type is None:
                raise
            return
        if self.atomic is None:
            return
        if exc_type is None:
            self.atomic.commit()
        else:
            self.atomic.discard()


class _Guard:
    """OSError while writing -> one line: ENOSPC, EIO, ...; EPIPE on stdout -> OutputClosed."""

    def __init__(self, path: str, stdout: bool):
        self.path, self.stdout = path, stdout

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None or not issubclass(exc_type, OSError):
            return False
        if self.stdout and (isinstance(exc, BrokenPipeError) or getattr(exc, "errno", None) == errno.EPIPE):
            raise OutputClosed("stdout was closed by its reader") from None
        raise os_error("<stdout>" if self.stdout else self.path, exc) from None


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
        if not hasattr(self, "_file"):
            self._file = self._open_format(self.sink, batch.schema)
        self._file.write_batch(batch)

    def _open_format(self, sink, schema: pa.Schema):
        import pyarrow.parquet as pq

        return pq.ParquetWriter(sink, schema)

    def _read_back(self, path: str):
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).iter_batches()

    def _widen(self, schema: pa.Schema) -> None:
        """Rewrite what is written so far with the wider schema (once per widening: rare)."""
        if not hasattr(self, "_file"):
            return
        if self.atomic is None or self.atomic.direct or getattr(self, "compressed", False):
            name = next(f.name for f, g in zip(self.schema, schema) if not f.type.equals(g.type))
            raise OutputError(f"{self.path}: column {name!r} widens from {self.schema.field(name).type} to "
                              f"{schema.field(name).type} after row {self.rows}, and a streamed or compressed "
                              "file cannot be rewritten; raise --sort-window past that row, or write JSONL")
        self._file.close()
        self.sink.close()
        tmp = str(self.atomic.tmp)
        wider = f"{tmp}.widen"
        self.sink = open(wider, "wb")
        self._file = self._open_format(self.sink, schema)
        for batch in self._read_back(tmp):
            self._file.write_batch(conform(batch, schema))
        os.replace(wider, tmp)

    def _close(self) -> None:
        if not hasattr(self, "_file"):  # no rows at all: still a valid (empty) file, with the schema if known
            self._write(_empty(self.schema))
        self._file.close()


class ArrowWriter(ParquetWriter):
    def _open_format(self, sink, schema: pa.Schema):
        import pyarrow.ipc as ipc

        return ipc.new_file(sink, schema)

    def _read_back(self, path: str):
        import pyarrow.ipc as ipc

        with pa.memory_map(path) as source:
            reader = ipc.open_file(source)
            return [reader.get_batch(i) for i in range(reader.num_record_batches)]


class CsvWriter(Writer):
    delimiter = ","

    def _write(self, batch: pa.RecordBatch) -> None:
        import pyarrow.csv as pcsv

        if not hasattr(self, "_csv"):
            opts = pcsv.WriteOptions(delimiter=self.delimiter, quoting_style="needed",
                                     include_header=not getattr(self, "_headed", False))
            self._csv = pcsv.CSVWriter(self.sink, batch.schema, write_options=opts)
            self._headed = True
        self._csv.write_batch(batch)

    def _widen(self, schema: pa.Schema) -> None:
        """CSV holds text: the same header goes on, with a new writer for the new types."""
        if hasattr(self, "_csv"):
            self._csv.close()
            del self._csv

    def _close(self) -> None:
        if not hasattr(self, "_csv") and self.schema is not None and not getattr(self, "_headed", False):
            self._write(_empty(self.schema))
        if hasattr(self, "_csv"):
            self._csv.close()


class TsvWriter(Writer):
    """TSV as the reader takes it: no quoting, a field is the text between two tabs (nulls are empty).
    A value holding a tab or a newline cannot be TSV: an error that names the column (write CSV)."""

    def _write(self, batch: pa.RecordBatch) -> None:
        if not getattr(self, "_headed", False):
            self._lines([list(batch.schema.names)], "a column name")
            self._headed = True
        columns = [pc.cast(col, pa.string()).to_pylist() for col in batch.columns]
        self._lines([["" if v is None else v for v in row] for row in zip(*columns)], "a value")

    def _lines(self, rows: list[list[str]], what: str) -> None:
        for row in rows:
            bad = next((v for v in row if "\t" in v or "\n" in v or "\r" in v), None)
            if bad is not None:
                raise OutputError(f"{self.path}: {what} holds a tab or a newline ({bad[:40]!r}), which TSV "
                                  "cannot hold; write CSV instead")
        self.sink.write("".join("\t".join(row) + "\n" for row in rows).encode("utf-8"))

    def _close(self) -> None:
        if not getattr(self, "_headed", False) and self.schema is not None:
            self._write(_empty(self.schema))


WRITERS: dict[str, type[Writer]] = {
    "jsonl": JsonlWriter, "parquet": ParquetWriter, "csv": CsvWriter, "tsv": TsvWriter, "arrow": ArrowWriter,
}


def register_writer(fmt: str, cls: type[Writer]) -> None:
    """Let another module (e.g. TREC output in ranking) plug in a format."""
    WRITERS[fmt] = cls


def open_writer(path: str, fmt: str | None = None, *, overwrite: bool = False, **options: Any) -> Writer:
    """A writer for `path` (`-` is stdout). File output is atomic: see `AtomicFile`; `overwrite`: the
    final rename may replace a file that appeared at `path` during the run."""
    fmt = detect_format(path, fmt, WRITE_FORMATS, "output")
    cls = WRITERS.get(fmt)
    if cls is None:
        raise OutputError(f"{path}: output format {fmt!r} is not available here")
    if path == STREAM:
        writer = cls(path, sys.stdout.buffer, None)
    else:
        atomic = AtomicFile(path, overwrite=overwrite)
        sink, codec = atomic.open(), compression_of(path)
        if codec:
            sink = pa.CompressedOutputStream(sink, codec)
        writer = cls(path, sink, atomic)
        writer.compressed = bool(codec)
    writer.options = options
    return writer


def _empty(schema: pa.Schema | None) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist([], schema=schema) if schema is not None else pa.RecordBatch.from_pydict({})


class RejectsFile:
    """Rejected rows as JSON lines ({"source", "where", "error", "raw"}), written like an output:
    to a temporary file, put in place by `commit` (never over a file that appeared meanwhile unless
    `overwrite`), removed by `discard`."""

    def __init__(self, path: str, source: str, overwrite: bool = False):
        self.path, self.source = path, source
        self.atomic = AtomicFile(path, overwrite=overwrite)
        self.fh = self.atomic.open()

    def add(self, rejects: list) -> None:
        lines = [json.dumps({"source": self.source, "where": r.where, "error": r.error, "raw": r.raw},
                            ensure_ascii=False) + "\n" for r in rejects]
        with _Guard(self.path, False):
            self.fh.write("".join(lines).encode("utf-8"))
            self.fh.flush()  # a full disk shows now, during the run, not after the output is in place

    def commit(self) -> None:
        with _Guard(self.path, False):
            self.fh.close()
        self.atomic.commit()

    def discard(self) -> None:
        try:
            self.fh.close()
        except OSError:
            pass
        self.atomic.discard()
