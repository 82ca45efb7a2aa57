"""Pick the compute dtype for a device, and say why.

`choose_dtype("auto", "cuda:0")` returns the dtype *and* the reason the program prints
("bf16: NVIDIA H100 supports it"). An explicit dtype the device cannot run is a `DeviceError` that
names the alternatives. Imports torch lazily: callers already need it.
"""

from __future__ import annotations

from dataclasses import dataclass

from rerank_cli.errors import DeviceError

NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | fp16 | bf16
    reason: str

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, NAMES[self.name])


def device_kind(device: str) -> str:
    return device.split(":")[0]


def device_label(device: str) -> str:
    """A human name for the device ("NVIDIA H100 80GB HBM3", "cpu")."""
    if device_kind(device) != "cuda":
        return device
    import torch

    return torch.cuda.get_device_name(_cuda_index(device))


def _cuda_index(device: str) -> int:
    return int(device.split(":")[1]) if ":" in device else 0


def supports_bf16(device: str) -> bool:
    kind = device_kind(device)
    if kind == "cpu":
        return True
    if kind == "cuda":
        import torch

        major, _ = torch.cuda.get_device_capability(_cuda_index(device))
        return major >= 8
    return False


def choose_dtype(requested: str, device: str) -> Precision:
    """bf16 > fp16 > fp32 on GPUs; fp32 on CPU (reduced precision there is inexact, and slow without AMX)."""
    kind = device_kind(device)
    if requested == "auto":
        return _auto(device, kind)
    if requested == "bf16" and not supports_bf16(device):
        raise DeviceError(
            f"bf16 is not supported on {device} ({device_label(device)}); use --dtype fp16 or fp32"
        )
    if requested == "fp16" and kind not in ("cuda", "cpu", "mps"):
        raise DeviceError(f"fp16 is not supported on {device}; use --dtype fp32")
    return Precision(requested, "asked for with --dtype")


def _auto(device: str, kind: str) -> Precision:
    if kind == "cpu":
        return Precision("fp32", _cpu_reason())
    if kind == "cuda" and supports_bf16(device):
        return Precision("bf16", f"{device_label(device)} supports bf16 (wider range than fp16)")
    if kind in ("cuda", "mps"):
        return Precision("fp16", f"{device_label(device)} lacks bf16; fp16 with fp32 re-run on overflow")
    return Precision("fp32", f"{device}: no reduced-precision support known")


def check_device(device: str) -> None:
    """Fail early, with the fix, on a device this machine does not have."""
    kind = device_kind(device)
    if kind == "cpu":
        return
    import torch

    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{device}: CUDA is not available on this machine; use --device cpu")
        if _cuda_index(device) >= torch.cuda.device_count():
            raise DeviceError(f"{device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif kind == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"{device}: MPS is not available; use --device cpu")
    else:
        raise DeviceError(f"unknown device {device!r} (use cpu, cuda or cuda:N)")


def _cpu_reason() -> str:
    """Why fp32 on this CPU: bf16 is inexact everywhere, and slow unless the CPU has AMX tiles."""
    import torch

    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    if amx:
        return "cpu: fp32 keeps scores exact; this CPU has AMX, so --dtype bf16 is faster but rounds"
    return "cpu: bf16/fp16 matmuls are slow and inexact on CPU"
