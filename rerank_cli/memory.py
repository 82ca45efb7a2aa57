"""Where a device's first token budget comes from: --batch-tokens, the probe cache, or an estimate.

(Seam for `rerank probe-memory`; this first version knows only the safe defaults.)
"""

from __future__ import annotations

CPU_TOKENS = 8192
GPU_TOKENS = 16384


def initial_budget(scorer, model: str, device: str, max_length: int, requested: int | None) -> tuple[int, str]:
    """The padded-token budget to start from, and why."""
    if requested:
        return requested, "--batch-tokens"
    if device.startswith("cpu"):
        return CPU_TOKENS, "default for CPU"
    return GPU_TOKENS, "safe default (run `rerank probe-memory` to measure)"
