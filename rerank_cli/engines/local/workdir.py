"""The work directory of a sharded run: what makes a rerun of the same command resume.

Layout (every name is ours; a --work-dir may hold other files, which are left alone):

    manifest.json          fingerprint of what decides the scores, and the shard count once known
    lock                   held (flock) while a run uses the folder
    shard-000007.in.arrow  the rows of shard 7 (removed once it is scored)
    shard-000007.out.arrow the same rows with the score column
    shard-000007.done      completion marker (JSON: rows, device, seconds), written last

Every file appears by atomic rename, so a killed writer leaves either nothing or a whole file. A shard
counts as done only when its marker exists and its part holds the rows the marker says. Knows nothing
of models or processes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from rerank_cli.config import MAX_WINDOWS
from rerank_cli.errors import ConfigError
from rerank_cli.io.paths import same_file

MANIFEST = "manifest.json"
LOCK = "lock"
VERSION = 1
_OURS = ("shard-", "manifest.json", "lock", ".tmp-", "fault-")


def shard_name(k: int, what: str) -> str:
    return f"shard-{k:06d}.{what}"


def write_arrow(path: Path, table: pa.Table) -> None:
    """Write `table` as an Arrow IPC file, atomically."""
    import pyarrow.ipc as ipc

    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with ipc.new_file(str(tmp), table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, path)


def read_arrow(path: Path) -> pa.Table:
    import pyarrow.ipc as ipc

    with pa.memory_map(str(path)) as source:
        return ipc.open_file(source).read_all()


def arrow_rows(path: Path) -> int:
    import pyarrow.ipc as ipc

    with pa.memory_map(str(path)) as source:
        return ipc.open_file(source).count_rows()


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def write_part(folder: str | Path, k: int, table: pa.Table, info: dict[str, Any]) -> None:
    """A scored shard: its part file, then its completion marker (the commit point)."""
    folder = Path(folder)
    write_arrow(folder / shard_name(k, "out.arrow"), table)
    _write_json(folder / shard_name(k, "done"), {"rows": table.num_rows, **info})


def left_by_earlier_run(cfg) -> bool:
    """Whether the default work dir beside the output holds an earlier run's manifest: then even a
    one-device run goes through the shards, to reuse what is finished (and to clean up after itself)."""
    if cfg.work_dir or cfg.output == "-":
        return False
    return (WorkDir.for_run(cfg).path / MANIFEST).is_file()


@dataclass
class Resume:
    """What a run found in its work dir: finished shards (id -> rows) and what to tell the user."""

    done: dict[int, int] = field(default_factory=dict)
    total: int | None = None
    message: str | None = None


class WorkDir:
    """One run's work directory. `open` it (lock, compare manifest), `finish` on success, `close` always."""

    def __init__(self, path: Path, temporary: bool = False):
        self.path = path
        self.temporary = temporary  # made for this run only (stdout output, no --work-dir)
        self._lock = None

    @classmethod
    def for_run(cls, cfg) -> WorkDir:
        """--work-dir, else a hidden folder beside the output, else (stdout) a temporary folder."""
        if cfg.work_dir:
            return cls(Path(cfg.work_dir))
        if cfg.output != "-":
            out = Path(cfg.output)
            return cls(out.parent / f".{out.name}.rerank-work")
        return cls(Path(tempfile.mkdtemp(prefix="rerank-work-")), temporary=True)

    def check_paths(self, inputs: list[str], outputs: list[tuple[str, str]]) -> None:
        """Refuse a work dir that is a file the run reads or writes, or in which clearing our files
        would remove one of them (an input named `shard-...` or `lock` inside it)."""
        if self.temporary:
            return
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"work dir {self.path}: exists and is not a folder")
        for role, path in [("input", p) for p in inputs] + outputs:
            if not path or path == "-":
                continue
            if same_file(path, self.path):
                raise ConfigError(f"work dir {self.path}: is the {role}; choose another --work-dir")
            if same_file(Path(path).parent, self.path) and Path(path).name.startswith(_OURS):
                raise ConfigError(f"{path}: the {role} is in the work dir {self.path} under a name the work "
                                  "dir uses for its own files; choose another --work-dir")

    def input(self, k: int) -> Path:
        return self.path / shard_name(k, "in.arrow")

    def part(self, k: int) -> Path:
        return self.path / shard_name(k, "out.arrow")

    def marker(self, k: int) -> Path:
        return self.path / shard_name(k, "done")

    def peek(self, fingerprint: dict[str, Any], shards: int | None = None) -> Resume:
        """What `open` would find, changing nothing (for --dry-run)."""
        old = self._manifest()
        if old is None:
            return Resume()
        why = compare(old, fingerprint)
        if why:
            return Resume(message=f"would start fresh in {self.path}: {why}")
        done, total = self._done(), old.get("shards") or shards
        return Resume(done, total, self._resume_line(done, total))

    def open(self, fingerprint: dict[str, Any], shards: int | None = None) -> Resume:
        """Lock the folder and keep the finished shards of a run with the same fingerprint.

        `shards` is the shard count when the plan knows it already (input of known size)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create work dir {self.path}: {exc.strerror}") from None
        self._take_lock()
        resume = Resume()
        old = self._manifest()
        why = compare(old, fingerprint) if old is not None else None
        if why:
            resume.message = f"starting fresh in {self.path}: {why}"
        if old is not None and not why:
            resume.done, resume.total = self._done(), old.get("shards") or shards
            resume.message = self._resume_line(resume.done, resume.total)
        self._clear(keep=set(resume.done))
        _write_json(self.path / MANIFEST, {**fingerprint, "shards": resume.total})
        return resume

    def record_shards(self, fingerprint: dict[str, Any], shards: int) -> None:
        """Once the whole input is read: remember how many shards there are, for later resume lines."""
        _write_json(self.path / MANIFEST, {**fingerprint, "shards": shards})

    def _resume_line(self, done: dict[int, int], total: int | None) -> str | None:
        if not done:
            return None
        counted = f"{len(done)} of {total} shards" if total else f"{len(done)} shard{'s' if len(done) > 1 else ''}"
        return f"resuming: {counted} already done ({self.path})"

    def _manifest(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.path / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _done(self) -> dict[int, int]:
        done = {}
        for marker in self.path.glob("shard-*.done"):
            k = int(marker.name.split("-")[1].split(".")[0])
            rows = self._valid_rows(k)
            if rows is not None:
                done[k] = rows
        return done

    def _valid_rows(self, k: int) -> int | None:
        try:
            rows = json.loads(self.marker(k).read_text(encoding="utf-8"))["rows"]
            return rows if arrow_rows(self.part(k)) == rows else None
        except (OSError, ValueError, KeyError, pa.ArrowException):
            return None

    def _clear(self, keep: set[int]) -> None:
        """Remove our files except the finished shards in `keep` (and the lock we hold)."""
        for p in self.path.iterdir():
            if p.name == LOCK or not p.name.startswith(_OURS):
                continue
            if p.name.startswith("shard-") and not p.name.endswith(".in.arrow"):
                if int(p.name.split("-")[1].split(".")[0]) in keep:
                    continue
            _unlink(p)

    def _take_lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return
        self._lock = open(self.path / LOCK, "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            self._lock = None
            raise ConfigError(f"work dir {self.path} is in use by another rerank run; wait for it or pass "
                              "another --work-dir") from None

    def finished(self) -> int:
        """How many shards have a completion marker (what a rerun could reuse)."""
        return sum(1 for _ in self.path.glob("shard-*.done")) if self.path.is_dir() else 0

    def finish(self) -> None:
        """After success: remove every file of ours, and the folder if nothing else is left in it."""
        if self.path.is_dir():
            self._clear(keep=set())
            _unlink(self.path / LOCK)
            if self.temporary:
                shutil.rmtree(self.path, ignore_errors=True)
            elif not any(self.path.iterdir()):
                self.path.rmdir()
        self.close()

    def close(self) -> None:
        """Release the lock (finished shards stay for resume); a temporary folder goes entirely."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if self.temporary:
            shutil.rmtree(self.path, ignore_errors=True)


def _unlink(p: Path) -> None:
    try:
        p.unlink()
    except FileNotFoundError:
        pass


# --- the fingerprint: what decides the scores ------------------------------------------------------

LABELS = {
    "version": "the work dir was written by another version of rerank",
    "model": "the model changed",
    "kind": "--kind changed",
    "template": "--template changed",
    "instruction": "--instruction changed",
    "max_length": "--max-length changed",
    "normalize": "--normalize changed",
    "long_passages": "--long-passages, --window-stride, --aggregate or --max-windows changed",
    "dtype": "the dtype changed",
    "shard_rows": "the shard size changed",
    "columns": "the columns changed",
    "on_bad_row": "--on-bad-row changed",
    "input_format": "--input-format changed",
}


def fingerprint(cfg, plan) -> dict[str, Any]:
    """Everything that changes the scores or the shard boundaries, as plain JSON values."""
    return {
        "version": VERSION, "input": input_identity(cfg.input), "model": model_identity(cfg.model),
        "kind": cfg.kind, "template": cfg.template, "instruction": cfg.instruction, "max_length": cfg.max_length,
        "normalize": cfg.normalize, "long_passages": long_passages(cfg), "dtype": plan.dtype_names(),
        "shard_rows": plan.shard_rows,
        "columns": [cfg.query_col, cfg.passage_col, cfg.instruction_col, cfg.score_col],
        "on_bad_row": cfg.on_bad_row, "input_format": cfg.input_format,
    }


def long_passages(cfg) -> dict[str, Any] | None:
    """Window mode's settings, with their defaults filled in; None for truncation, so that work dirs
    written before window mode existed still resume."""
    if cfg.long_passages == "truncate":
        return None
    return {"mode": cfg.long_passages, "window_stride": cfg.window_stride, "aggregate": cfg.aggregate or "max",
            "max_windows": cfg.max_windows or MAX_WINDOWS}


def input_identity(path: str) -> dict[str, Any]:
    if path == "-":
        return {"path": "-"}
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def model_identity(model: str | None) -> dict[str, Any]:
    """A hub id as given; a local folder by its path and the newest modification time inside it."""
    if not model or not os.path.isdir(model):
        return {"id": model}
    mtimes = [e.stat().st_mtime_ns for e in os.scandir(model) if e.is_file()]
    return {"path": str(Path(model).resolve()), "mtime_ns": max(mtimes, default=0)}


def compare(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """Why the finished shards of `old` cannot be reused for `new`, or None if they can."""
    if new["input"].get("path") == "-":
        return "the input is stdin, which cannot be checked for changes"
    if old.get("input") != new["input"]:
        return _input_change(old.get("input") or {}, new["input"])
    if old.get("model") != new["model"] and _show(old.get("model")) == _show(new["model"]):
        return f"the model folder {_show(new['model'])} changed since the last run"
    for key, label in LABELS.items():
        if old.get(key) != new.get(key):
            return f"{label} ({_show(old.get(key))} -> {_show(new.get(key))})"
    return None


def _input_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    if old.get("path") != new.get("path"):
        return f"the input changed ({old.get('path')} -> {new.get('path')})"
    return "the input file changed since the last run (size or modification time)"


def _show(value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("path") or value.get("id")
    return json.dumps(value) if not isinstance(value, str) else value
