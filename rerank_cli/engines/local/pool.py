"""The worker processes of a parallel run, seen from the parent: start, send, watch, replace, stop.

torch.multiprocessing with the spawn context (a fresh interpreter per worker: safe with CUDA), and one
duplex pipe per worker rather than a shared queue, so a worker killed in the middle of a message holds
no lock that could wedge the others. `events()` waits on every pipe and every process sentinel at
once, with a timeout: a death is seen the moment it happens, and the parent never blocks for good.
Which shard goes where, and what a death means, is decided in `run.py`.
"""

from __future__ import annotations

import pickle
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from rerank_cli.engines.local.plan import Shard, WorkerSpec


@dataclass(eq=False)
class Slot:
    """One worker position: the current process on its device(s) and what it is doing."""

    spec: WorkerSpec
    process: Any = None
    conn: Any = None
    eof: bool = False
    ready: bool = False
    shard: Shard | None = None
    progress: int = 0  # pairs reported for the shard in flight
    last_heard: float = 0.0
    cause: str | None = None  # what the worker said before it went down
    deaths: int = 0  # in a row, without finishing a shard
    restarts: int = 0
    described: bool = False
    pairs: int = 0
    shards: int = 0
    busy_s: float = 0.0
    counts: dict = field(default_factory=dict)  # the summary's counters (job.COUNTERS), over finished shards

    @property
    def alive(self) -> bool:
        return self.process is not None


@dataclass
class Pool:
    """Processes for `specs`, each running `worker.worker_main(conn, spec, *args)`."""

    specs: list[WorkerSpec]
    args: tuple
    slots: list[Slot] = field(default_factory=list)

    def __post_init__(self) -> None:
        import torch.multiprocessing as mp

        self._ctx = mp.get_context("spawn")
        self.slots = [Slot(spec) for spec in self.specs]

    def start_all(self) -> None:
        for slot in self.slots:
            self.start(slot)

    def start(self, slot: Slot) -> None:
        """(Re)start the worker of `slot`. Ctrl-C is ignored while it starts, so the child begins
        life ignoring it too (the parent alone decides when workers stop)."""
        from rerank_cli.engines.local.worker import worker_main

        parent_end, child_end = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=worker_main, args=(child_end, slot.spec, *self.args),
                                    name=f"rerank-worker-{slot.spec.index}", daemon=True)
        with _sigint_ignored():
            process.start()
        child_end.close()
        slot.process, slot.conn, slot.eof, slot.ready = process, parent_end, False, False
        slot.last_heard = time.monotonic()

    def send(self, slot: Slot, message: Any) -> bool:
        try:
            slot.conn.send(message)
            return True
        except (BrokenPipeError, OSError):
            return False

    def events(self, timeout: float) -> list[tuple[Slot, tuple]]:
        """Messages from workers, then ("exit", status) for each worker that ended, within `timeout`."""
        from multiprocessing.connection import wait

        live = [s for s in self.slots if s.alive]
        handles: dict[Any, Slot] = {s.process.sentinel: s for s in live}
        handles.update({s.conn: s for s in live if not s.eof})
        if not handles:
            time.sleep(timeout)
            return []
        ready = wait(list(handles), timeout)
        out: list[tuple[Slot, tuple]] = []
        for slot in dict.fromkeys(handles[h] for h in ready):
            out += self._drain(slot)
            if slot.process.sentinel in ready:
                slot.process.join()
                out.append((slot, ("exit", slot.process.exitcode)))
                slot.conn.close()
                slot.process, slot.conn, slot.ready = None, None, False
        return out

    def _drain(self, slot: Slot) -> list[tuple[Slot, tuple]]:
        out = []
        try:
            while not slot.eof and slot.conn.poll():
                out.append((slot, slot.conn.recv()))
                slot.last_heard = time.monotonic()
        except (EOFError, OSError, pickle.UnpicklingError):
            slot.eof = True
        return out

    def stop(self, graceful: bool, grace_s: float = 5.0) -> None:
        """Graceful: idle, loaded workers are asked to exit; any other (still loading, or every worker
        when not graceful) is terminated at once. None holds anything a later run needs: parts and
        markers appear only by atomic rename."""
        live = [s for s in self.slots if s.alive]
        for slot in live:
            if not (graceful and slot.ready and slot.shard is None and self.send(slot, None)):
                slot.process.terminate()
        deadline = time.monotonic() + grace_s
        for slot in live:
            slot.process.join(max(0.1, deadline - time.monotonic()))
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join(2.0)
            slot.conn.close()
            slot.process, slot.conn = None, None

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, exc_type, *rest) -> None:
        self.stop(graceful=exc_type is None)


class _sigint_ignored:
    def __enter__(self):
        try:
            self.old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:  # not the main thread: signals are not ours to change
            self.old = None

    def __exit__(self, *exc_info):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)


def describe_exit(status: int | None) -> str:
    """"exited with status 86", "was killed by SIGKILL", "crashed (SIGSEGV)"."""
    if status is None or status >= 0:
        return f"exited with status {status}"
    try:
        name = signal.Signals(-status).name
    except ValueError:
        name = f"signal {-status}"
    if name in ("SIGSEGV", "SIGBUS", "SIGABRT", "SIGILL", "SIGFPE"):
        return f"crashed ({name})"
    return f"was killed by {name}"
