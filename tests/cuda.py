"""What the tests that need a CUDA device share: the `gpu` marks and a real cap on GPU memory.

They carry `pytest.mark.gpu` and skip where there is no CUDA; `pytest -m gpu` runs them, and
`make gpu-check` runs that on a lent GPU machine. `memory_cap` makes this process run out of GPU
memory for real (`torch.OutOfMemoryError` from the allocator, no fault injection) past a given size.
"""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch

# Tests that run the CLI in process start CUDA under the allocator settings a real run uses.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
GPU = [pytest.mark.gpu, needs_cuda]  # `pytestmark = GPU`, or `pytest.param(..., marks=GPU)`


def gpu_test(fn):
    """Mark one test function as needing CUDA."""
    return pytest.mark.gpu(needs_cuda(fn))


@dataclass
class Cap:
    limit: int  # bytes this process may hold from torch's allocator, counting what it held at the start
    baseline: int  # bytes allocated when the cap was set (other tests' leftovers, if any)
    how: str


@contextmanager
def memory_cap(allowance: int, device: int = 0):
    """Let this process allocate only `allowance` more bytes on `device`; give it all back after.

    `torch.cuda.set_per_process_memory_fraction` is checked to bite (an allocation past the cap must
    fail); if this allocator ignores it, the rest of the device is taken by a ballast outside torch's
    allocator (cupy), so torch's own counters (peak memory, as the probe reads it) stay clean.
    """
    gc.collect()
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated(device)
    total = torch.cuda.get_device_properties(device).total_memory
    limit = torch.cuda.memory_reserved(device) + allowance
    torch.cuda.set_per_process_memory_fraction(limit / total, device)
    ballast = None
    try:
        how = "torch.cuda.set_per_process_memory_fraction"
        if not _cap_bites(limit, device):
            torch.cuda.set_per_process_memory_fraction(1.0, device)
            ballast, how = _ballast(allowance, device), "a cupy ballast (the memory fraction did not bite)"
        yield Cap(limit, baseline, how)
    finally:
        del ballast
        gc.collect()
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()


def _cap_bites(limit: int, device: int) -> bool:
    try:
        probe = torch.empty(limit + (64 << 20), dtype=torch.uint8, device=f"cuda:{device}")
    except torch.OutOfMemoryError:
        return True
    del probe
    torch.cuda.empty_cache()
    return False


def _ballast(allowance: int, device: int):
    try:
        import cupy
    except ImportError:
        pytest.fail("set_per_process_memory_fraction does not bite here and cupy is missing for a ballast")
    free, _ = torch.cuda.mem_get_info(device)
    with cupy.cuda.Device(device):
        return cupy.cuda.Memory(max(0, free - allowance))
