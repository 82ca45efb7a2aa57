"""The plan of a run: which devices, how they group into workers, how big the shards are.

Pure functions over plain values (device strings, the GPU count, the `CUDA_VISIBLE_DEVICES` string,
the CPU count), so every rule is unit-tested without a GPU. The only side effect is the lazy
`torch.cuda.device_count()` when the caller does not say how many GPUs there are. Knows nothing of
processes or files: `run.py` runs a plan, `workdir.py` keeps its shards.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from rerank_cli.errors import ConfigError, DeviceError

ENV = object()  # "read CUDA_VISIBLE_DEVICES from the environment"
MIN_AUTO_SHARD = 256  # never shrink shards below this to spread a small input
SHARDS_PER_WORKER = 2  # a known-size input is cut into at least this many shards per worker
KINDS = ("cpu", "cuda", "mps")


def visible_gpus(cuda_count: int, visible: str | None) -> list[str]:
    """The physical ids of the GPUs CUDA numbers cuda:0, cuda:1, ... ("2", "3", or GPU-/MIG- UUIDs).

    Follows CUDA's own rules: unset means every GPU; entries are read up to the first invalid one
    (so "" or "-1" hides every GPU, and "0,-1,1" shows only GPU 0).
    """
    if visible is None:
        return [str(i) for i in range(cuda_count)]
    ids: list[str] = []
    for item in (s.strip() for s in visible.split(",")):
        if not _valid_visible(item) or item in ids:
            break
        ids.append(item)
    return ids[:cuda_count]


def _valid_visible(item: str) -> bool:
    return item.isdigit() or item.startswith(("GPU-", "MIG-"))


def normalize_device(device: str) -> str:
    """"cuda" -> "cuda:0", "CPU" -> "cpu"; an unknown kind is a DeviceError naming the known ones."""
    d = device.strip().lower()
    kind, _, index = d.partition(":")
    if kind not in KINDS or (index and not index.isdigit()) or (kind != "cuda" and index):
        raise DeviceError(f"unknown device {device!r} (use cpu, cuda, cuda:N or mps)")
    return "cuda:0" if d == "cuda" else d


def resolve_devices(cfg, cuda_count: int | None = None, visible=ENV) -> list[str]:
    """The devices a run uses: --devices as given (checked), else every visible GPU, else one CPU.

    GPU indices are positions in the visible set, as CUDA numbers them: with CUDA_VISIBLE_DEVICES=2,3
    the two GPUs are cuda:0 and cuda:1.
    """
    if visible is ENV:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    requested = [normalize_device(d) for d in cfg.devices]
    if cuda_count is None and (not requested or any(d.startswith("cuda") for d in requested)):
        cuda_count = _cuda_count()
    gpus = visible_gpus(cuda_count or 0, visible)
    if not requested:
        return [f"cuda:{i}" for i in range(len(gpus))] or ["cpu"]
    asked = [d for d in requested if d.startswith("cuda")]
    if asked and not gpus:
        shown = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        raise DeviceError(f"{','.join(asked)}: no CUDA device is visible{shown}; use --devices cpu")
    problems = [p for p in (_gpu_problem(d, gpus, visible) for d in requested) if p]
    if problems:
        raise DeviceError("; ".join(dict.fromkeys(problems)))
    return requested


def _gpu_problem(device: str, gpus: list[str], visible: str | None) -> str | None:
    if not device.startswith("cuda"):
        return None
    shown = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
    index = int(device.split(":")[1])
    if index < len(gpus):
        return None
    numbering = f"; they are numbered within that list: cuda:0 is GPU {gpus[0]}" if visible is not None else ""
    return f"{device}: only {len(gpus)} GPU(s) are visible, cuda:0 to cuda:{len(gpus) - 1}{shown}{numbering}"


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


@dataclass(frozen=True)
class WorkerSpec:
    """One worker process: its devices (several when a model is spread over GPUs) and CPU threads."""

    index: int
    devices: tuple[str, ...]
    threads: int
    physical: tuple[str, ...] = ()  # CUDA_VISIBLE_DEVICES entries of its GPUs (for a GPU group)

    @property
    def device(self) -> str:
        """Where inputs go (the first device of a group)."""
        return self.devices[0]

    @property
    def label(self) -> str:
        return "+".join(self.devices)

    @property
    def is_group(self) -> bool:
        return len(self.devices) > 1

    @property
    def name(self) -> str:
        return f"worker {self.index} ({self.label})"


def group_workers(devices: list[str], gpus_per_worker: int = 1, *, gpu_ids: list[str] | None = None,
                  cpu_count: int = 1, omp_threads: int | None = None) -> tuple[list[WorkerSpec], list[str]]:
    """Workers over `devices`, and notes worth telling the user (idle GPUs).

    With `gpus_per_worker` N > 1, consecutive GPUs form groups of N (visible GPUs / N workers) and a
    leftover that cannot form a group stays idle. CPU workers divide the cores between them, unless
    OMP_NUM_THREADS (`omp_threads`) says how many each should use.
    """
    notes: list[str] = []
    if gpus_per_worker > 1:
        groups, notes = _gpu_groups(devices, gpus_per_worker)
    else:
        groups = [(d,) for d in devices]
    n_cpu = sum(1 for g in groups if g[0] == "cpu")
    specs = []
    for i, group in enumerate(groups):
        share = n_cpu if group[0] == "cpu" else len(groups)
        threads = omp_threads if omp_threads and group[0] == "cpu" else max(1, cpu_count // max(1, share))
        physical = tuple(_physical(d, gpu_ids) for d in group) if len(group) > 1 else ()
        specs.append(WorkerSpec(i, group, threads, physical))
    return specs, notes


def _gpu_groups(devices: list[str], n: int) -> tuple[list[tuple[str, ...]], list[str]]:
    others = [d for d in devices if not d.startswith("cuda")]
    if others:
        raise ConfigError(f"--gpus-per-worker spreads a model over GPUs; drop {', '.join(others)} from --devices")
    if len(devices) < n:
        raise DeviceError(f"--gpus-per-worker {n} needs at least {n} GPUs; {len(devices)} visible "
                          f"({', '.join(devices) or 'none'})")
    usable = len(devices) - len(devices) % n
    groups = [tuple(devices[i:i + n]) for i in range(0, usable, n)]
    idle = devices[usable:]
    notes = [f"{', '.join(idle)} left idle: {len(devices)} GPUs do not divide into groups of {n}"] if idle else []
    return groups, notes


def _physical(device: str, gpu_ids: list[str] | None) -> str:
    index = int(device.split(":")[1])
    return gpu_ids[index] if gpu_ids and index < len(gpu_ids) else str(index)


def shard_size(shard_rows: int, total_rows: int | None, workers: int) -> int:
    """Rows per shard: --shard-rows, made smaller for a small input of known size so that every worker
    gets more than one shard (the queue balances only what it can split), but never below MIN_AUTO_SHARD.

    Not smaller than that: pairs are length-sorted within a shard, so small shards pad more (on the
    bench pairs, 256-pair shards pad 17% of tokens, 2,000-pair windows 2%)."""
    if not total_rows:
        return shard_rows
    spread = math.ceil(total_rows / (workers * SHARDS_PER_WORKER))
    return min(shard_rows, max(MIN_AUTO_SHARD, spread))


def shard_count(rows: int, size: int) -> int:
    return math.ceil(rows / size) if rows > 0 else 0


@dataclass
class Plan:
    """What a run will do; `--dry-run` prints `lines()` and stops."""

    workers: list[WorkerSpec]
    dtypes: list[tuple[str, str]]  # (dtype, reason) per worker
    shard_rows: int
    total_rows: int | None = None  # known up front (Parquet) or counted by a dry run
    notes: list[str] = field(default_factory=list)

    @property
    def shards(self) -> int | None:
        return None if self.total_rows is None else shard_count(self.total_rows, self.shard_rows)

    def dtype_names(self) -> list[str]:
        return sorted({d for d, _ in self.dtypes})

    def headline(self) -> str:
        """One line for the start of a run."""
        shards = f"{self.shards} shards" if self.shards is not None else "shards"
        n = len(self.workers)
        return (f"{n} worker{'s' if n > 1 else ''} on {', '.join(w.label for w in self.workers)}; "
                f"{shards} of up to {self.shard_rows} pairs, handed out as workers free up")

    def lines(self) -> list[str]:
        devices = sum(len(w.devices) for w in self.workers)
        out = [f"plan: {len(self.workers)} worker(s) on {devices} device(s)"]
        for w, (dtype, why) in zip(self.workers, self.dtypes):
            spread = f", model spread over {len(w.devices)} GPUs (GPUs {','.join(w.physical)})" if w.is_group else ""
            out.append(f"  {w.name}{spread}: {dtype} ({why}); {w.threads} CPU thread(s)")
        rows = "unknown number of" if self.total_rows is None else f"{self.total_rows}"
        shards = "" if self.shards is None else f" in {self.shards} shard(s)"
        out.append(f"  input: {rows} pairs{shards} of up to {self.shard_rows} pairs, handed out as workers free up")
        return out + [f"  note: {n}" for n in self.notes]


def make_plan(cfg, devices: list[str], total_rows: int | None = None, *, visible=ENV, cuda_count: int | None = None,
              cpu_count: int | None = None, dtype_of: Callable | None = None, accelerate: bool | None = None) -> Plan:
    """Group `devices` into workers, pick each worker's dtype, size the shards. Keyword arguments
    stand in for the machine (visible GPUs, cores, dtype support, whether accelerate is installed)."""
    if visible is ENV:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpu_ids = None
    if cfg.gpus_per_worker > 1 and any(d.startswith("cuda") for d in devices):
        gpu_ids = visible_gpus(_cuda_count() if cuda_count is None else cuda_count, visible)
    omp = os.environ.get("OMP_NUM_THREADS", "")
    workers, notes = group_workers(devices, cfg.gpus_per_worker, gpu_ids=gpu_ids,
                                   cpu_count=cpu_count or _cpu_count(), omp_threads=int(omp) if omp.isdigit() else None)
    if dtype_of is None:
        from rerank_cli.model.precision import choose_dtype as dtype_of
    if any(w.is_group for w in workers) and not (_have_accelerate() if accelerate is None else accelerate):
        raise DeviceError(f"--gpus-per-worker {cfg.gpus_per_worker} spreads the model with a device map, which "
                          "needs the accelerate package: pip install accelerate")
    dtypes = [_dtype(dtype_of(cfg.dtype, w.device)) for w in workers]
    if len({d for d, _ in dtypes}) > 1:
        notes.append("workers differ in precision, so scores differ slightly by shard; pin one with --dtype")
    size = shard_size(cfg.shard_rows, total_rows, len(workers))
    return Plan(workers, dtypes, size, total_rows, notes)


def _have_accelerate() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


def _dtype(precision) -> tuple[str, str]:
    return precision.name, precision.reason


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Shard:
    """A run of consecutive valid pairs: the unit a worker takes from the queue."""

    id: int
    first_row: int  # 1-based position of its first pair among the input's valid pairs
    rows: int

    @property
    def span(self) -> str:
        return f"pairs {self.first_row}-{self.first_row + self.rows - 1}"


def cut_shards(batches: Iterable, size: int) -> Iterator[tuple[Shard, Any]]:
    """Cut a stream of record batches into (Shard, pyarrow.Table) of exactly `size` rows (the last
    may be shorter), holding no more than one shard in memory."""
    held: list = []
    count, shard_id, first = 0, 0, 1
    for batch in batches:
        while batch.num_rows:
            take = min(size - count, batch.num_rows)
            held.append(batch.slice(0, take))
            count += take
            batch = batch.slice(take)
            if count == size:
                yield Shard(shard_id, first, count), _table(held)
                shard_id, first, held, count = shard_id + 1, first + count, [], 0
    if count:
        yield Shard(shard_id, first, count), _table(held)


def _table(batches: list):
    """One shard's batches as a table; where the reader widened a column mid-shard (int, then float:
    `io.schema.widen`), the earlier batches take the wider type, losslessly."""
    import pyarrow as pa

    from rerank_cli.io.schema import conform, widen

    schema = None
    for batch in batches:
        schema = widen(schema, batch.schema)
    return pa.Table.from_batches([conform(b, schema) for b in batches], schema=schema)
