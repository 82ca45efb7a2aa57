"""`rerank probe-memory`: measure, per device, the largest padded-token batch that fits.

For each device: load the model as `rerank score` would, build synthetic batches of the widest pair
the max length allows (one row a token short, so the padding mask exists as in real batches), and
run real forward passes through `Scorer.forward` (so RERANK_FAULT_OOM_TOKENS applies): double the
rows until a batch fails, then binary-search between the last that fitted and the first that did not.
A batch fails when it runs out of memory or, where the device reports memory (CUDA), when its peak
allocated memory passes (1 - headroom) x the device's total. The CPU never runs out of memory this
way (the kernel would kill the process first), so there the search stops at CPU_MAX_TOKENS, at what
the available RAM allows by the config estimate, or after a batch slower than SLOW_BATCH_S.
Results go to the probe cache (`budget.py`) that `rerank score --batch-tokens auto` starts from.
`--estimate` gives the same answer from the config alone (`estimate.py`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

from rerank_cli.errors import PairTooLargeError
from rerank_cli.memory.batching import free_memory, try_forward
from rerank_cli.model.precision import Precision, choose_dtype, device_kind, device_label

CPU_MAX_TOKENS = 65536
GPU_MAX_TOKENS = 1 << 20
SLOW_BATCH_S = 30.0
DEFAULT_MEMORY = 80 << 30  # --estimate for a GPU that is not here, without --memory
BOUNDS = {
    "oom": "ran out of memory beyond this; headroom taken off the tokens",
    "memory": "peak memory would pass (1 - headroom) x total beyond this",
    "cap": "search cap reached",
    "ram": "available RAM (by the config estimate) reached",
    "time": f"a batch took over {SLOW_BATCH_S:.0f} s",
}


@dataclass
class ProbeResult:
    """One device's answer; the first six fields are the --json contract."""

    device: str
    dtype: str
    max_length: int
    max_batch_tokens: int
    max_batch_size: int
    peak_memory_bytes: int | None
    name: str = ""
    total_memory_bytes: int | None = None
    dtype_reason: str = ""
    width: int = 0  # padded width of the synthetic rows (LLM prompts add tokens past max_length)
    weights_bytes: int = 0
    bound: str = ""
    peak_memory_source: str = ""
    estimated: bool = False
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        data = asdict(self)
        data.update(data.pop("extra"))
        return data


@dataclass(frozen=True)
class Outcome:
    fits: bool
    reason: str = ""  # why not: oom | memory
    seconds: float = 0.0


def search_rows(trial: Callable[[int], Outcome], cap_rows: int, cap_reason: str = "cap",
                slow_s: float = SLOW_BATCH_S) -> tuple[int, str, list[str]]:
    """Largest row count that fits: double from 1, then binary search. -> (rows, bound, trace)."""
    ok, bad, bound, trace = 0, None, cap_reason, []
    rows = 1
    while bad is None and rows <= cap_rows:
        out = trial(rows)
        trace.append(f"{rows}:{'ok' if out.fits else out.reason}")
        if not out.fits:
            bad, bound = rows, out.reason
        elif out.seconds > slow_s:
            ok, bound = rows, "time"
            break
        else:
            ok = rows
            rows = cap_rows if rows < cap_rows < 2 * rows else rows * 2
    while bad is not None and bad - ok > 1:
        mid = (ok + bad) // 2
        out = trial(mid)
        trace.append(f"{mid}:{'ok' if out.fits else out.reason}")
        if out.fits:
            ok = mid
        else:
            bad, bound = mid, out.reason
    return ok, bound, trace


def synthetic_row(scorer, max_length: int):
    """The widest pair a run at `max_length` produces (query and passage truncated as usual)."""
    return scorer.encode(["how much memory does one batch need"], [" ".join(["memory"] * (2 * max_length))])[0]


def synthetic_batch(row, rows: int) -> list:
    """`rows` copies of `row`, the last one token short so the batch is padded like real ones."""
    if rows == 1:
        return [row]
    from rerank_cli.model.templates import Encoded

    short = Encoded(row.ids[:-1], row.type_ids[:-1] if row.type_ids is not None else None)
    return [row] * (rows - 1) + [short]


def weights_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


class Device:
    """What the probe needs to know about one device: its name, size and how to measure a batch."""

    def __init__(self, device: str):
        self.device = device
        self.cuda = device_kind(device) == "cuda"
        self.name = device_label(device)
        self.total = self._total()

    def _total(self) -> int | None:
        if self.cuda:
            import torch

            return torch.cuda.get_device_properties(torch.device(self.device)).total_memory
        from rerank_cli.memory.budget import total_ram

        return total_ram()

    def trial(self, scorer, batch: list, limit: int | None) -> Outcome:
        """Run one batch; it fits if it does not run out of memory and (CUDA) peaks under `limit`."""
        self._reset_peak()
        started = time.perf_counter()
        fitted = try_forward(scorer, batch) is not None
        seconds = time.perf_counter() - started
        peak = self._peak() if fitted else None
        free_memory(self.device)
        if not fitted:
            return Outcome(False, "oom", seconds)
        if peak is not None and limit is not None and peak > limit:
            return Outcome(False, "memory", seconds)
        return Outcome(True, "", seconds)

    def _reset_peak(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats(torch.device(self.device))

    def _peak(self) -> int | None:
        """Peak allocated bytes since the reset, where the device keeps count (CUDA)."""
        if self.cuda:
            import torch

            return torch.cuda.max_memory_allocated(torch.device(self.device))
        return None

    def measure(self, scorer, batch: list) -> tuple[int | None, str]:
        """Peak allocated bytes (weights included) of one batch, and where the number comes from."""
        if self.cuda:
            self._reset_peak()
            fitted = try_forward(scorer, batch) is not None
            return (self._peak() if fitted else None), "torch.cuda.max_memory_allocated"
        activations = cpu_forward_peak(scorer, batch)
        if activations is None:
            return None, "not measured: this torch's profiler has no memory events"
        return (weights_bytes(scorer.model) + activations,
                "weights + peak of torch's CPU allocations during the batch (torch.profiler)")


def cpu_forward_peak(scorer, batch: list) -> int | None:
    """Peak of live CPU tensor bytes during one forward pass, from the profiler's allocation events."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        scorer.forward(batch)
    try:
        events = [e for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    except AttributeError:  # the event API is torch's own; it may move
        return None
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()  # negative for frees
        peak = max(peak, live)
    return peak


@contextmanager
def native_stderr_silenced():
    """Kineto prints profiler_start/stop lines on fd 2 from C++; hide them for the profiled batch."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def probe_memory(cfg, devices: list[str], headroom: float = 0.1, estimate: bool = False,
                 memory: int | None = None, log: Callable[[str], None] | None = None) -> list[ProbeResult]:
    """Probe (or, with `estimate`, work out from the config) each device's largest batch."""
    from rerank_cli.errors import ConfigError
    from rerank_cli.memory.budget import set_allocator_env

    set_allocator_env()
    if not 0 <= headroom < 1:
        raise ConfigError(f"--headroom must be at least 0 and below 1 (got {headroom})")
    log = log or (lambda msg: None)
    if estimate:
        from rerank_cli.model.checks import check_max_length
        from rerank_cli.model.load import detect_kind, load_config

        config = load_config(cfg.model, cfg.trust_remote_code)
        kind = detect_kind(config, cfg.kind, cfg.model)
        check_max_length(config, cfg.max_length, cfg.model)  # as `rerank score` would refuse it
        return [estimate_device(cfg, config, kind, d, headroom, memory, log) for d in devices]
    results = []
    for device in devices:
        results.append(probe_device(cfg, device, headroom, log))
        free_memory(device)  # the device's model is gone with probe_device's frame: give its memory back
    return results


def probe_device(cfg, device: str, headroom: float, log: Callable[[str], None]) -> ProbeResult:
    from rerank_cli.memory.budget import cache_key, write_cache
    from rerank_cli.model.load import load_scorer

    scorer = load_scorer(cfg.model, device, kind=cfg.kind, dtype=cfg.dtype, template=cfg.template,
                         max_length=cfg.max_length, instruction=cfg.instruction,
                         trust_remote_code=cfg.trust_remote_code)
    dev, p = Device(device), scorer.precision
    log(f"{device}: {scorer.kind} in {p.name} ({p.reason})")
    row = synthetic_row(scorer, cfg.max_length)
    width = len(row.ids)
    limit = int((1 - headroom) * dev.total) if dev.cuda and dev.total else None
    cap_rows, cap_reason = search_cap(scorer, dev, width, headroom)
    ok, bound, trace = search_rows(lambda r: dev.trial(scorer, synthetic_batch(row, r), limit), cap_rows, cap_reason)
    if ok == 0:
        raise PairTooLargeError(f"{device}: one pair of {width} tokens does not fit in memory even alone; "
                                "lower --max-length or use --dtype bf16 (fp16 on GPUs without bf16)")
    rows = max(1, int(ok * (1 - headroom))) if bound == "oom" else ok
    peak, source = dev.measure(scorer, synthetic_batch(row, rows))
    log(f"{device}: rows tried at {width} tokens: {' '.join(trace)}; keeping {rows} ({BOUNDS[bound]})")
    result = ProbeResult(device, p.name, cfg.max_length, rows * width, rows, peak, name=dev.name,
                         total_memory_bytes=dev.total, dtype_reason=p.reason, width=width,
                         weights_bytes=weights_bytes(scorer.model), bound=bound, peak_memory_source=source)
    write_cache(cache_key(cfg.model, dev.name, p.name, cfg.max_length), result.to_json())
    return result


def search_cap(scorer, dev: Device, width: int, headroom: float) -> tuple[int, str]:
    """Most rows worth trying: GPU_MAX_TOKENS on GPUs; on the CPU CPU_MAX_TOKENS or the RAM estimate."""
    if dev.cuda:
        return max(1, GPU_MAX_TOKENS // width), "cap"
    from rerank_cli.memory.budget import available_ram, per_token_bytes

    cap = max(1, CPU_MAX_TOKENS // width)
    ram = available_ram()
    if ram:
        fits = int(((1 - headroom) * ram - weights_bytes(scorer.model)) // (per_token_bytes(scorer, width) * width))
        if fits < cap:
            return max(1, fits), "ram"
    return cap, "cap"


def estimate_device(cfg, config, kind: str, device: str, headroom: float, memory: int | None,
                    log: Callable[[str], None]) -> ProbeResult:
    from rerank_cli.memory.estimate import CUDA_RESERVE, estimate, shape_of

    cuda, here = device_kind(device) == "cuda", device_present(device)
    p = estimate_precision(cfg.dtype, device, here)
    dev = Device(device) if here else None
    total = memory or (dev.total if dev else DEFAULT_MEMORY)
    est = estimate(shape_of(config, kind), p.name, cfg.max_length, total, headroom, CUDA_RESERVE if cuda else 0)
    if est.max_batch_size == 0:
        log(f"{device}: {est.weights_bytes / 2**30:.1f} GiB of weights leave no room for one pair of "
            f"{cfg.max_length} tokens in {total / 2**30:.1f} GiB with {headroom:.0%} headroom")
    return ProbeResult(device, p.name, cfg.max_length, est.max_batch_tokens, est.max_batch_size,
                       est.peak_memory_bytes, name=dev.name if dev else "(not here: estimate only)",
                       total_memory_bytes=total, dtype_reason=p.reason, width=cfg.max_length,
                       weights_bytes=est.weights_bytes, bound="estimate", peak_memory_source="estimate from the config",
                       estimated=True, extra={"activation_bytes_per_token": round(est.activation_bytes_per_token),
                                              "full_vocab_logits_bytes_per_token":
                                                  est.full_vocab_logits_bytes_per_token})


def device_present(device: str) -> bool:
    kind = device_kind(device)
    if kind == "cpu":
        return True
    if kind != "cuda":
        return False
    import torch

    index = int(device.split(":")[1]) if ":" in device else 0
    return torch.cuda.is_available() and index < torch.cuda.device_count()


def estimate_precision(requested: str, device: str, here: bool) -> Precision:
    """The dtype a run would use; for a GPU that is not here, assume bf16 support unless told."""
    if here or device_kind(device) == "cpu":
        return choose_dtype(requested, device)
    if requested != "auto":
        return Precision(requested, "asked for with --dtype")
    return Precision("bf16", "assumed: a GPU with bf16 (Ampere or newer); pass --dtype fp16 for older ones")


def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def render_table(results: list[ProbeResult], console) -> None:
    """The per-device table `rerank probe-memory` prints, then why each dtype and each limit."""
    from rich.table import Table

    estimated = any(r.estimated for r in results)
    table = Table(title="estimated from the config" if estimated else "measured with real batches")
    for col in ("device", "name", "total memory", "dtype", "max batch tokens", "max batch size",
                "estimated peak" if estimated else "peak memory"):
        table.add_column(col, justify="left" if col in ("device", "name", "dtype") else "right")
    for r in results:
        table.add_row(r.device, r.name, human_bytes(r.total_memory_bytes), r.dtype, str(r.max_batch_tokens),
                      f"{r.max_batch_size} x {r.width}", human_bytes(r.peak_memory_bytes))
    console.print(table)
    for r in results:
        why = "worked out from the config, not measured" if r.estimated else BOUNDS.get(r.bound, r.bound)
        for line in (f"dtype {r.dtype}: {r.dtype_reason}", f"limit: {why}", f"peak: {r.peak_memory_source}"):
            console.print(f"{r.device}: {line}", markup=False, highlight=False, soft_wrap=True)
