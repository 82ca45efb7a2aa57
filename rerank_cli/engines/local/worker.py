"""A scoring worker process: pin a device, load the model once, score the shards the parent hands over.

Started by `pool.py` with the spawn context. It talks to the parent over one duplex pipe:

    parent -> worker   a `Shard` to score, or None to stop
    worker -> parent   ("ready", info) once the model is loaded
                       ("progress", pairs) after every batch
                       ("done", shard_id, info) after the part and its marker are written
                       ("info", text) a decision worth a line (out-of-memory back-off)
                       ("error", shard_id, kind, class, message, traceback) before it gives up

It never prints (the parent owns stderr), ignores Ctrl-C (the parent decides when workers stop) and
dies with its parent. `score_table` is the scoring step, shared with the in-process sharded path.
Fault injection for tests: RERANK_FAULT_KILL=W:B[:N] makes worker W (or `*`, any) exit hard after B
batches, N times per run (default once); RERANK_FAULT_RAISE=W:B[:N] makes it raise instead.
"""

from __future__ import annotations

import os
import signal
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from rerank_cli.errors import ConfigError, RerankError

KILL_STATUS = 86  # the exit status of a RERANK_FAULT_KILL worker, to tell it from real crashes
DEVICE_FAULTS = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error", "device-side assert", "NCCL")


@dataclass(frozen=True)
class Fault:
    """An injected failure: worker `worker` (None: any) fails after `batches` batches, `times` per run."""

    action: str  # kill | raise
    worker: int | None
    batches: int
    times: int = 1

    @classmethod
    def parse(cls, action: str, env: str, value: str) -> Fault:
        parts = value.split(":")
        try:
            worker = None if parts[0] == "*" else int(parts[0])
            batches, times = int(parts[1]), int(parts[2]) if len(parts) > 2 else 1
        except (ValueError, IndexError):
            raise ConfigError(f"{env} must look like W:B or W:B:N (worker, batches, times), got {value!r}") from None
        return cls(action, worker, batches, times)

    def applies(self, worker: int, batches: int) -> bool:
        return self.worker in (None, worker) and batches == self.batches


def faults_from_env(environ=os.environ) -> tuple[Fault, ...]:
    """Parsed in the parent, so a malformed value is a clean error before any worker starts."""
    found = []
    for action, env in (("kill", "RERANK_FAULT_KILL"), ("raise", "RERANK_FAULT_RAISE")):
        if environ.get(env):
            found.append(Fault.parse(action, env, environ[env]))
    return tuple(found)


def _claim(folder: Path, run_id: str, fault: Fault) -> bool:
    """Take one of the fault's `times` firings for this run (a marker file each, created atomically)."""
    for i in range(fault.times):
        try:
            os.close(os.open(folder / f"fault-{fault.action}-{run_id}-{i}", os.O_CREAT | os.O_EXCL))
            return True
        except FileExistsError:
            continue
    return False


def worker_main(conn, spec, cfg, folder: str, run_id: str, faults: tuple[Fault, ...] = ()) -> None:
    """Entry point of a worker process."""
    _guard_process()
    shard = None
    try:
        device, device_map = _pin(spec)
        from rerank_cli.reranker import Reranker

        reranker = Reranker.from_config(cfg, device, log=lambda m: conn.send(("info", m)), device_map=device_map)
        conn.send(("ready", _describe(reranker)))
        counter = _BatchCounter(conn, spec.index, Path(folder), run_id, faults)
        while (shard := conn.recv()) is not None:
            conn.send(("done", shard.id, _score_shard(reranker, cfg, Path(folder), shard, counter)))
    except (EOFError, BrokenPipeError):
        return  # the parent is gone or stopping us
    except Exception as exc:  # reported, then this process ends; the parent decides what follows
        _report(conn, shard, exc)


def _score_shard(reranker, cfg, folder: Path, shard, counter) -> dict:
    from rerank_cli.engines.job import counts_of
    from rerank_cli.engines.local.workdir import read_arrow, shard_name, write_part

    started = time.perf_counter()
    before = counts_of(reranker.stats)
    table = read_arrow(folder / shard_name(shard.id, "in.arrow"))
    scored = score_table(reranker, cfg, table, shard.first_row, counter)
    after = counts_of(reranker.stats)
    info = {"device": reranker.device, "seconds": round(time.perf_counter() - started, 3),
            **{name: after[name] - before[name] for name in after}}
    write_part(folder, shard.id, scored, info)
    return info


def score_table(reranker, cfg, table, first_row: int, on_batch=None):
    """`table` with the score column (and in window mode the window counts) appended, scored window by
    window (--sort-window)."""
    import numpy as np

    from rerank_cli.engines.job import with_scores
    from rerank_cli.reranker import Scored

    parts = []
    for start in range(0, table.num_rows, cfg.sort_window):
        part = table.slice(start, cfg.sort_window)
        inst = part.column(cfg.instruction_col).to_pylist() if cfg.instruction_col else None
        parts.append(reranker.score_chunk(part.column(cfg.query_col).to_pylist(),
                                          part.column(cfg.passage_col).to_pylist(), inst,
                                          on_batch=on_batch, first_row=first_row + start))
    scored = Scored(np.concatenate([p.scores for p in parts]) if parts else np.empty(0, np.float32),
                    np.concatenate([p.windows for p in parts]) if parts else np.empty(0, np.int32))
    return with_scores(table, scored, cfg)


class _BatchCounter:
    """The per-batch callback: report progress, and fire an injected fault when its batch comes."""

    def __init__(self, conn, worker: int, folder: Path, run_id: str, faults: tuple[Fault, ...]):
        self.conn, self.worker, self.folder, self.run_id, self.faults = conn, worker, folder, run_id, faults
        self.batches = 0

    def __call__(self, pairs: int) -> None:
        self.conn.send(("progress", pairs))
        self.batches += 1
        for fault in self.faults:
            if fault.applies(self.worker, self.batches) and _claim(self.folder, self.run_id, fault):
                if fault.action == "kill":
                    os._exit(KILL_STATUS)
                raise RuntimeError(f"RERANK_FAULT_RAISE: injected failure after {self.batches} batches")


def _guard_process() -> None:
    """Ignore Ctrl-C (the parent stops us) and die with the parent (Linux: PR_SET_PDEATHSIG)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if os.getppid() != parent:  # pragma: no cover - the parent died before prctl
        os._exit(1)


def _pin(spec) -> tuple[str, str | None]:
    """Bind this process to its device(s) before any CUDA work, and size its CPU thread pool.

    One GPU: `torch.cuda.set_device`. A GPU group: CUDA_VISIBLE_DEVICES narrowed to the group, and the
    model spread over it with a balanced device map (the group's first GPU is cuda:0 in here). A GPU the
    group lists twice (`--devices cuda:0,cuda:0 --gpus-per-worker 2`: the device-map path on one GPU) is
    made visible once: CUDA gives no promise for repeated ids.
    """
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # the parent draws the one progress bar
    os.environ["OMP_NUM_THREADS"] = str(spec.threads)
    os.environ["RAYON_NUM_THREADS"] = str(spec.threads)
    if spec.is_group:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(dict.fromkeys(spec.physical))
    import torch

    torch.set_num_threads(spec.threads)
    if spec.is_group:
        return "cuda:0", "balanced"
    if spec.device.startswith("cuda"):
        torch.cuda.set_device(int(spec.device.split(":")[1]))
    return spec.device, None


def _describe(reranker) -> dict:
    p = reranker.precision
    return {"kind": reranker.kind, "dtype": p.name, "reason": p.reason, "tokens": reranker.budget.tokens,
            "budget_reason": reranker.budget_reason, "pid": os.getpid()}


def is_device_fault(exc: BaseException) -> bool:
    """A CUDA/driver failure: the device context is poisoned, so a fresh process may succeed."""
    import torch

    accelerator_error = getattr(torch, "AcceleratorError", ())
    return isinstance(exc, accelerator_error) or any(s in str(exc) for s in DEVICE_FAULTS)


def _report(conn, shard, exc: Exception) -> None:
    if isinstance(exc, RerankError):
        kind, message = "user", str(exc)
    else:
        kind = "device" if is_device_fault(exc) else "bug"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        message = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    cls = f"{type(exc).__module__}:{type(exc).__qualname__}"
    try:
        conn.send(("error", shard.id if shard else None, kind, cls, message, traceback.format_exc()))
    except (BrokenPipeError, OSError):
        pass
