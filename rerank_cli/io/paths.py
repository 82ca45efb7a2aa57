"""Before any work: every path a run will write is checked against every path it reads, and each other.

Owns the one rule that keeps what the user wrote safe: no output (the output file, the rejects file)
may be an input or another output of the same run, however it is spelled (`./x` and `x`, a symlink,
a hard link: the same inode is the same file), and an existing regular file is replaced only with
`--overwrite`. A device or FIFO (`/dev/null`, a terminal) is written into, never replaced, so two
outputs may share one. Also refuses, with one line, targets that cannot be written (a folder, a folder that
does not exist or is a file, a folder without write permission). Writes nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from rerank_cli.errors import OutputError
from rerank_cli.io.atomic import is_special
from rerank_cli.io.formats import STREAM


def identity(path: str | Path) -> tuple:
    """What makes two spellings the same file: (device, inode) if it exists, else its real path."""
    try:
        st = os.stat(path)
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", os.path.realpath(path))


def same_file(a: str | Path, b: str | Path) -> bool:
    return identity(a) == identity(b) or os.path.realpath(a) == os.path.realpath(b)


def check_paths(inputs: list[str], outputs: list[tuple[str, str]], overwrite: bool) -> None:
    """`outputs` are (role, path), e.g. ("output", "out.jsonl"), ("rejects file", "bad.jsonl")."""
    files = [p for p in inputs if p and p != STREAM]
    seen: list[tuple[str, str]] = []
    for role, path in outputs:
        if not path or path == STREAM:
            continue
        for inp in files:
            if same_file(inp, path):
                raise OutputError(f"{path}: refusing to write over the input file (as the {role}); choose another path")
        for other_role, other in seen:
            if same_file(other, path) and not is_special(path):  # two outputs may share /dev/null
                raise OutputError(f"{path}: the {role} and the {other_role} are the same file; give them "
                                  "different paths")
        seen.append((role, path))
        check_target(path, role, overwrite)


def check_target(path: str, role: str, overwrite: bool) -> None:
    """`path` can be written: not a folder, its folder exists and is writable, not an unwanted overwrite."""
    out = Path(path)
    if out.is_dir():
        raise OutputError(f"{path}: is a directory")
    if is_special(out):
        return  # /dev/null, a FIFO: written into, not replaced
    parent = out.parent
    if not parent.exists():
        raise OutputError(f"{path}: folder {str(parent)!r} does not exist")
    if not parent.is_dir():
        raise OutputError(f"{path}: {str(parent)!r} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write in folder {str(parent)!r} (permission denied)")
    if os.path.lexists(out) and not overwrite:
        what = "already exists" if role == "output" else f"{role} already exists"
        raise OutputError(f"{path}: {what}; pass --overwrite to replace it")
