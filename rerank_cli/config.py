"""One frozen `RunConfig` per run: defaults <- preset (configs/*.toml) <- --config file <- flags.

This module owns the merge and the validation (every problem reported at once). It knows nothing of
torch, files or models; it only says what the user asked for.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from rerank_cli.errors import ConfigError

KINDS = ("auto", "cross-encoder", "llm")
DTYPES = ("auto", "fp32", "fp16", "bf16")
BAD_ROW_POLICIES = ("error", "skip")
ENGINES = ("local", "ray")
LONG_PASSAGES = ("truncate", "window")
AGGREGATES = ("max", "first", "mean", "sum")
MAX_WINDOWS = 32  # windows per passage in window mode unless --max-windows says


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides what a run does. Built by `build_config`, never mutated."""

    input: str = "-"
    output: str = "-"
    input_format: str | None = None
    output_format: str | None = None
    query_col: str = "query"
    passage_col: str = "passage"
    instruction_col: str | None = None
    score_col: str = "score"
    model: str | None = None
    kind: str = "auto"
    template: str | None = None
    instruction: str | None = None
    max_length: int = 512
    normalize: bool = False
    share_prefix: bool = True  # LLM rerankers: a prefix the pairs of a batch share is computed once
    long_passages: str = "truncate"
    window_stride: int | None = None  # None: half a window
    aggregate: str | None = None  # None: max
    max_windows: int | None = None  # None: MAX_WINDOWS
    dtype: str = "auto"
    devices: tuple[str, ...] = ()
    gpus_per_worker: int = 1
    batch_tokens: int | None = None  # None: auto (probe cache or a safe estimate)
    batch_size: int = 256
    sort_window: int = 4096
    on_bad_row: str = "error"
    rejects: str | None = None
    overwrite: bool = False
    quiet: bool = False
    work_dir: str | None = None
    shard_rows: int = 2048
    dry_run: bool = False
    engine: str = "local"
    ray_address: str | None = None
    ray_workers: int | None = None
    output_dir: str | None = None
    top_k: int | None = None
    group_col: str | None = None
    doc_col: str = "pid"
    run_tag: str = "rerank"
    trust_remote_code: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


FIELDS = {f.name for f in dataclasses.fields(RunConfig)}


def config_dir() -> Path:
    """Where presets live: $RERANK_CONFIG_DIR, else the project's configs/ folder."""
    env = os.environ.get("RERANK_CONFIG_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "configs"


def list_presets() -> list[str]:
    d = config_dir()
    return sorted(p.stem for p in d.glob("*.toml")) if d.is_dir() else []


def load_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None


def load_preset(name: str) -> dict[str, Any]:
    path = config_dir() / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(list_presets()) or "none"
        raise ConfigError(f"unknown preset {name!r} (known: {known})")
    return load_toml(path, "preset")


def build_config(
    flags: dict[str, Any], preset: str | None = None, config_file: str | None = None
) -> RunConfig:
    """Merge layers (later wins; a flag left as None does not override) and validate the result.

    Every problem is reported at once: unknown settings and values of the wrong type (named with the
    layer they came from), then what `problems_of` finds in the merged config.
    """
    layers: list[tuple[str, dict[str, Any]]] = []
    if preset:
        layers.append((f"preset {preset!r}: ", load_preset(preset)))
    if config_file:
        layers.append((f"{config_file}: ", load_toml(Path(config_file), "config file")))
    layers.append(("", {k: v for k, v in flags.items() if v is not None}))
    merged: dict[str, Any] = {}
    problems: list[str] = []
    for where, layer in layers:
        for key, value in layer.items():
            key = key.replace("-", "_")
            if key not in FIELDS:
                problems.append(f"{where}unknown setting {key!r}")
                continue
            value, problem = coerce(key, value)
            if problem:
                problems.append(where + problem)
                merged.pop(key, None)  # not checked further; the problem is reported
            else:
                merged[key] = value
    cfg = RunConfig(**merged)
    problems += problems_of(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg


HINTS = typing.get_type_hints(RunConfig)
WANTED = {bool: "true or false", int: "a whole number", str: "a string", dict: "a table",
          tuple: "a list of device names or a comma-separated string"}


def coerce(name: str, value: Any) -> tuple[Any, str | None]:
    """`value` as field `name` holds it, or a problem naming the setting and the type it needs.

    One rule for every field, from its annotation: a bool is not a number (nor a number a bool), a
    whole float (512.0) is an int, `batch_tokens = "auto"` is None, devices may be a list or "a,b".
    """
    args = typing.get_args(HINTS[name])
    optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else HINTS[name]
    base = typing.get_origin(base) or base
    if value is None or (name == "batch_tokens" and value == "auto"):
        return None, None if optional else f"{name} must be {WANTED[base]}, not empty"
    if base is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if base is tuple and isinstance(value, (str, list, tuple)) and all(isinstance(d, str) for d in value):
        return parse_devices(value), None
    ok = isinstance(value, base) and (base is not int or not isinstance(value, bool))
    return (value, None) if ok else (value, f"{name} must be {WANTED[base]}, not {_described(value)}")


def _described(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, (list, tuple)):
        return f"the list {list(value)!r:.60}"
    if isinstance(value, dict):
        return "a table"
    return repr(value)


def parse_devices(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(d.strip() for d in items if d.strip())


def _choice(problems: list[str], name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        problems.append(f"{_flag(name)} must be one of {', '.join(allowed)} (got {value!r})")


def validate(cfg: RunConfig) -> None:
    """Raise every problem of `cfg` at once, each naming the fix."""
    problems = problems_of(cfg)
    if problems:
        raise ConfigError("; ".join(problems))


def problems_of(cfg: RunConfig) -> list[str]:
    """What cannot work in `cfg`: wrong types, values out of range or choice, clashing columns."""
    typed = {f.name: coerce(f.name, getattr(cfg, f.name))[1] for f in dataclasses.fields(cfg)}
    problems = [p for p in typed.values() if p]
    if problems:  # the checks below assume the types are right
        return problems
    _choice(problems, "kind", cfg.kind, KINDS)
    _choice(problems, "dtype", cfg.dtype, DTYPES)
    _choice(problems, "on_bad_row", cfg.on_bad_row, BAD_ROW_POLICIES)
    _choice(problems, "engine", cfg.engine, ENGINES)
    problems += window_problems(cfg.long_passages, cfg.window_stride, cfg.aggregate, cfg.max_windows)
    for name in ("max_length", "batch_size", "sort_window", "shard_rows", "gpus_per_worker"):
        if getattr(cfg, name) < 1:
            problems.append(f"{_flag(name)} must be at least 1")
    if cfg.batch_tokens is not None and cfg.batch_tokens < 1:
        problems.append("--batch-tokens must be a positive number or 'auto'")
    if cfg.top_k is not None and cfg.top_k < 1:
        problems.append("--top-k must be at least 1")
    if cfg.output_dir and cfg.engine != "ray":
        problems.append("--output-dir works with --engine ray; use -o FILE with the local engine")
    if not cfg.run_tag or any(ch.isspace() for ch in cfg.run_tag):
        problems.append(f"--run-tag must be one word, without spaces (got {cfg.run_tag!r})")
    return problems + _column_problems(cfg)


COLUMNS = ("query_col", "passage_col", "instruction_col", "score_col", "group_col", "doc_col")
PAIR_COLUMNS = ("query_col", "passage_col", "instruction_col", "score_col")  # four different columns


def _column_problems(cfg: RunConfig) -> list[str]:
    """Column names must name something, and the pair, instruction and score columns must differ."""
    problems = [f"{_flag(name)} must name a column (got {getattr(cfg, name)!r})" for name in COLUMNS
                if getattr(cfg, name) is not None and not getattr(cfg, name).strip()]
    named = [(name, getattr(cfg, name)) for name in PAIR_COLUMNS if getattr(cfg, name)]
    for i, (a, value) in enumerate(named):
        problems += [f"{_flag(a)} and {_flag(b)} must differ (both are {value!r})"
                     for b, other in named[i + 1:] if other == value]
    return problems


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def window_problems(long_passages: str, window_stride: int | None, aggregate: str | None,
                    max_windows: int | None) -> list[str]:
    """What is wrong with the long-passage settings (the CLI's and the Python API's shared rules)."""
    problems: list[str] = []
    _choice(problems, "long_passages", long_passages, LONG_PASSAGES)
    given = {"window_stride": window_stride, "aggregate": aggregate, "max_windows": max_windows}
    if long_passages == "truncate":
        problems += [f"{_flag(name)} works with --long-passages window (truncate scores one window)"
                     for name, value in given.items() if value is not None]
    if aggregate is not None:
        _choice(problems, "aggregate", aggregate, AGGREGATES)
    for name, value in (("window_stride", window_stride), ("max_windows", max_windows)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            problems.append(f"{_flag(name)} must be a whole number of at least 1 (got {value!r})")
    return problems
