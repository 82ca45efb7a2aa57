"""`score_file()` and `run()`: the Python API the CLI wraps. Choose an engine for a config, nothing more.

- `--engine ray`: `engines/ray` (a Ray cluster, Ray Data distributes the windows);
- several devices, a GPU group, `--work-dir`, `--dry-run`, or a run to resume: `engines/local`
  (a worker process per device and a shard queue, or the same shard loop in process);
- otherwise `engines/inline`: one device, in this process.

Every engine scores with the same `Reranker`; what they share lives in `engines/job.py`.
"""

from __future__ import annotations

from typing import Any

from rerank_cli.config import RunConfig, build_config
from rerank_cli.engines.job import Summary, written_paths
from rerank_cli.errors import ConfigError
from rerank_cli.io.paths import check_paths
from rerank_cli.progress import Reporter

__all__ = ["Summary", "run", "score_file"]


def score_file(input: str, output: str = "-", *, model: str, **options: Any) -> Summary:
    """Score every pair in `input` and write them, with all input columns and a score, to `output`.

    Options are `RunConfig` fields (devices, dtype, max_length, batch_tokens, ...); `preset=` and
    `config=` name a preset or a TOML file as on the command line.
    """
    preset, config_file = options.pop("preset", None), options.pop("config", None)
    cfg = build_config({"input": input, "output": output, "model": model, **options}, preset, config_file)
    return run(cfg, Reporter(quiet=options.get("quiet", True)))


def run(cfg: RunConfig, reporter: Reporter) -> Summary:
    """Dispatch a validated config to its executor."""
    from rerank_cli.memory.budget import set_allocator_env

    set_allocator_env()  # before any CUDA use, here and in the workers that inherit the environment
    if not cfg.model:
        raise ConfigError("no model: pass --model PATH_OR_HUB_ID or --preset NAME")
    check_paths([cfg.input], written_paths(cfg), cfg.overwrite)
    if cfg.engine == "ray":
        from rerank_cli.engines.ray.run import run_ray

        return run_ray(cfg, reporter)
    from rerank_cli.engines.local.plan import resolve_devices
    from rerank_cli.engines.local.workdir import left_by_earlier_run

    devices = resolve_devices(cfg)
    if len(devices) > 1 or cfg.dry_run or cfg.work_dir or cfg.gpus_per_worker > 1 or left_by_earlier_run(cfg):
        from rerank_cli.engines.local.run import run_parallel

        return run_parallel(cfg, devices, reporter)
    from rerank_cli.engines.inline import run_inline

    return run_inline(cfg, devices[0], reporter)
