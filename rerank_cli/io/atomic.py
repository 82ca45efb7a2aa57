"""Where the bytes of an output file go: a hidden temporary file renamed into place without clobbering.

Owns the last step of every file this tool writes (output, rejects): `AtomicFile` writes beside the
target as `.NAME.rerank-tmp-PID` and `commit`s it by a rename that never replaces a file that appeared
at the target during the run (a hard link, which fails if the name exists, then unlink), unless the run
was told to `--overwrite`. A target that exists and is not a regular file (`/dev/null`, a FIFO, a
character device) is written into directly: it is not "replaced". Temporary files left by a process
that no longer lives (SIGKILL) are removed when the next run writes the same target; another live
run's are left alone. Every OSError becomes an `OutputError` naming the path.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from rerank_cli.errors import OutputError, first_line

TMP_MARK = ".rerank-tmp-"


def is_special(path: str | Path) -> bool:
    """An existing target that is written into, not replaced: a device, a FIFO, a socket."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode) and not stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False


def os_error(path: str | Path, exc: OSError, doing: str = "cannot write") -> OutputError:
    """The one line for a failed write: `out.jsonl: cannot write (No space left on device)`."""
    why = exc.strerror or first_line(exc)
    if exc.errno == errno.ENOSPC:
        why = "no space left on device"
    return OutputError(f"{path}: {doing} ({why})")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale(target: Path) -> list[Path]:
    """Remove `.TARGET.rerank-tmp-PID` files (or folders) whose process is gone; returns them."""
    import shutil

    removed = []
    prefix = f".{target.name}{TMP_MARK}"
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix):].split(".")[0]
        if not pid.isdigit() or int(pid) == os.getpid() or pid_alive(int(pid)):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass
        removed.append(Path(entry.path))
    return removed


class AtomicFile:
    """A temporary path beside `target`, put in place by `commit`, removed by `discard`.

    `overwrite`: whether `commit` may replace a file at the target (the run was told --overwrite, or
    the target is checked not to exist when the run starts: then only a newcomer could be there)."""

    def __init__(self, target: str | Path, overwrite: bool = False):
        self.target = Path(target)
        self.overwrite = overwrite
        self.direct = is_special(self.target)
        self.tmp = self.target if self.direct else self.target.with_name(
            f".{self.target.name}{TMP_MARK}{os.getpid()}")
        if not self.direct:
            remove_stale(self.target)

    def open(self):
        try:
            return open(self.tmp, "wb")
        except OSError as exc:
            raise os_error(self.target, exc) from None

    def commit(self) -> None:
        if self.direct:
            return
        try:
            if self.overwrite:
                os.replace(self.tmp, self.target)
            else:
                _rename_no_replace(self.tmp, self.target)
        except FileExistsError:
            self.discard()
            raise OutputError(f"{self.target}: a file appeared there while this run was writing it (another "
                              "run?); it was left as it is; pass --overwrite to replace it") from None
        except OSError as exc:
            self.discard()
            raise os_error(self.target, exc) from None

    def discard(self) -> None:
        if self.direct:
            return
        try:
            self.tmp.unlink()
        except FileNotFoundError:
            pass


def _rename_no_replace(src: Path, dst: Path) -> None:
    """rename(src, dst) that fails with FileExistsError if dst exists, even if it appeared just now."""
    try:
        os.link(src, dst)  # atomic: EEXIST if the name is taken
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if os.path.lexists(dst):  # no hard links here: re-check, then rename (a tiny window remains)
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
        os.rename(src, dst)
        return
    os.unlink(src)
