"""File formats: which one a path means, and how to open a path or `-` as a byte stream.

Owns format names and detection only; reading lives in `readers.py`, writing in `writers.py`.
"""

from __future__ import annotations

import os
import sys
from pathlib import PurePath
from typing import BinaryIO

from rerank_cli.errors import ConfigError

READ_FORMATS = ("jsonl", "parquet", "csv", "tsv", "arrow")
WRITE_FORMATS = ("jsonl", "parquet", "csv", "tsv", "arrow", "trec")
STREAM = "-"

_SUFFIXES = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
    ".parquet": "parquet", ".pq": "parquet",
    ".csv": "csv", ".tsv": "tsv",
    ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow",
    ".trec": "trec", ".run": "trec",
}
_COMPRESSION = (".gz", ".bz2", ".zst", ".lz4")


def detect_format(path: str, override: str | None, allowed: tuple[str, ...], role: str) -> str:
    """The format for `path`: the override if given, else from the extension; `-` (and a device or
    FIFO without an extension) means JSONL."""
    if override:
        fmt = override.lower()
    elif path == STREAM:
        fmt = "jsonl"
    else:
        fmt = _from_suffix(path)
        if fmt is None and _is_stream_like(path):  # /dev/null, a FIFO, <(...): JSONL, as for `-`
            fmt = "jsonl"
        if fmt is None:
            raise ConfigError(
                f"cannot tell the {role} format of {path!r} from its extension; "
                f"use --{role}-format ({', '.join(allowed)})"
            )
    if fmt not in allowed:
        raise ConfigError(f"unknown {role} format {fmt!r} (known: {', '.join(allowed)})")
    return fmt


def _from_suffix(path: str) -> str | None:
    suffixes = [s.lower() for s in PurePath(path).suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION:
        suffixes = suffixes[:-1]
    return _SUFFIXES.get(suffixes[-1]) if suffixes else None


_CODECS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".lz4": "lz4"}


def compression_of(path: str) -> str | None:
    """The codec a path's last suffix names (`out.jsonl.gz` -> gzip), else None."""
    return _CODECS.get(PurePath(path).suffix.lower()) if path != STREAM else None


def open_input_stream(path: str) -> BinaryIO:
    """A binary stream over `path` (decompressing .gz and friends) or stdin for `-`."""
    if path == STREAM:
        return sys.stdin.buffer
    import pyarrow as pa

    if is_regular(path):
        return pa.input_stream(path, compression="detect")
    # A FIFO, `<(...)`, a device: no seeking (pyarrow's file reader would fail with "lseek failed").
    codec = compression_of(path)
    return pa.input_stream(open(path, "rb"), compression=codec) if codec else open(path, "rb")


def _is_stream_like(path: str) -> bool:
    """An existing path that is neither a regular file nor a folder: a device, a FIFO, /dev/fd/N."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def is_regular(path: str) -> bool:
    """A regular file (seekable, memory-mappable), not stdin, a FIFO or a device."""
    import stat

    try:
        return path != STREAM and stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def display_name(path: str) -> str:
    return "<stdin>" if path == STREAM else path
