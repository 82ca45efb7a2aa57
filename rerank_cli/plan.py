"""Which devices a run uses (seam; the full shard planner comes with multi-device support)."""

from __future__ import annotations

from .config import RunConfig


def resolve_devices(cfg: RunConfig) -> list[str]:
    if cfg.devices:
        return list(cfg.devices)
    import torch

    return ["cuda:0"] if torch.cuda.is_available() else ["cpu"]
