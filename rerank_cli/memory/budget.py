"""Where a device's first token budget comes from, and the probe cache behind it.

Order: --batch-tokens if given; else the budget `rerank probe-memory` measured for the same (model,
device name, dtype, max length), kept in $RERANK_CACHE_DIR/probe-memory.json (default
~/.cache/rerank/); else a safe estimate (on a GPU: 80% of the memory left after loading, at the
activation bytes per token `estimate.py` works out from the config; on the CPU: 2048 tokens, a
throughput choice (larger batches spill the caches), lowered if available memory is short). The
out-of-memory back-off in `batching.py` corrects whatever this gets wrong. Also owns PYTORCH_CUDA_ALLOC_CONF.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from rerank_cli.errors import ConfigError

CPU_TOKENS = 2048  # measured best on CPU: bigger batches spill the caches (8192 is 14-20% slower)
GPU_SAFE_FRACTION = 0.8  # of the free memory after loading, when nothing was probed
MAX_TOKENS = 1 << 20
CACHE_FILE = "probe-memory.json"
ALLOC_CONF = "expandable_segments:True"
UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000**2, "mib": 1 << 20,
         "g": 1 << 30, "gb": 1000**3, "gib": 1 << 30, "t": 1 << 40, "tb": 1000**4, "tib": 1 << 40}


def set_allocator_env() -> None:
    """Expandable CUDA segments (less fragmentation) unless the user configured the allocator.

    Call before CUDA is first used; spawned workers inherit the environment.
    """
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOC_CONF


def parse_memory(text: str) -> int:
    """'80GiB', '80GB', '24G', '512MiB', '1073741824' -> bytes (G, M, K are binary)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text or "")
    if not m or m.group(2).lower() not in UNITS:
        raise ConfigError(f"--memory must look like 80GiB, 24GB or 512MiB (got {text!r})")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def cache_path() -> Path:
    root = os.environ.get("RERANK_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "rerank")
    return Path(root) / CACHE_FILE


def model_id(model: str) -> str:
    """A local folder by its absolute path, a hub id as written."""
    return os.path.realpath(model) if os.path.exists(model) else model


def cache_key(model: str, device_name: str, dtype: str, max_length: int) -> str:
    return f"{model_id(model)}|{device_name}|{dtype}|{max_length}"


def fault_setting() -> int | None:
    """RERANK_FAULT_OOM_TOKENS, recorded with each probe so injected limits never leak into real runs."""
    value = os.environ.get("RERANK_FAULT_OOM_TOKENS")
    return int(value) if value else None


def read_cache() -> dict:
    try:
        with open(cache_path(), encoding="utf-8") as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # no cache, or a damaged one: probing again rewrites it


def write_cache(key: str, entry: dict) -> Path:
    """Add one probe result; written to a temporary file and renamed, so readers never see half."""
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = read_cache()
    data[key] = {**entry, "fault_oom_tokens": fault_setting(), "probed_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)
    return path


def cached_budget(model: str, device_name: str, dtype: str, max_length: int) -> dict | None:
    entry = read_cache().get(cache_key(model, device_name, dtype, max_length))
    if not entry or entry.get("fault_oom_tokens") != fault_setting() or not entry.get("max_batch_tokens"):
        return None
    return entry


def initial_budget(scorer, model: str, device: str, max_length: int, requested: int | None) -> tuple[int, str]:
    """The padded-token budget to start from, and why."""
    if requested:
        return requested, "--batch-tokens"
    from rerank_cli.model.precision import device_label

    name = device_label(device)
    entry = cached_budget(model, name, scorer.precision.name, max_length)
    if entry:
        return int(entry["max_batch_tokens"]), f"from probe cache, probed {entry.get('probed_at', '?')}"
    if device.startswith("cuda"):
        return gpu_estimate(scorer, device, max_length)
    return cpu_default(scorer, max_length)


def gpu_estimate(scorer, device: str, max_length: int) -> tuple[int, str]:
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(device))
    per_token = per_token_bytes(scorer, max_length)
    tokens = int(min(MAX_TOKENS, max(max_length, GPU_SAFE_FRACTION * free // per_token)))
    return tokens, (f"estimated: {GPU_SAFE_FRACTION:.0%} of {free / 2**30:.1f} GiB free at "
                    f"{per_token / 1024:.0f} KiB/token (run `rerank probe-memory` to measure)")


def cpu_default(scorer, max_length: int) -> tuple[int, str]:
    available = available_ram()
    if available:
        fits = int(available // 2 // per_token_bytes(scorer, max_length))
        if fits < CPU_TOKENS:
            return max(max_length, fits), f"half of the {available / 2**30:.1f} GiB of RAM available"
    return CPU_TOKENS, "default for CPU"


def per_token_bytes(scorer, width: int) -> float:
    from rerank_cli.memory.estimate import activation_bytes_per_token, shape_of

    return activation_bytes_per_token(shape_of(scorer.model.config, scorer.kind), width, scorer.precision.name)


def available_ram() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def total_ram() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
