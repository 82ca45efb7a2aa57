"""`score_file()`: the Python API the CLI wraps. Reads, scores and writes one file, on one device
inline (many devices and Ray are other executors of the same `Reranker`).

Owns the order of a run: check the output path, read the first chunk (bad input fails before the
slow model load), load the model, stream chunk -> scores -> writer, write rejects, summarise.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from rerank_cli.config import RunConfig, build_config
from rerank_cli.errors import ConfigError
from rerank_cli.io.readers import Chunk, Columns, read_chunks
from rerank_cli.io.writers import check_output_path, open_writer, write_rejects
from rerank_cli.progress import Reporter
from rerank_cli.rank.ranking import check_ranking_columns, open_ranked_output, wants_ranking


@dataclass
class Summary:
    """What a run did, for the last line on stderr and for API callers."""

    pairs: int = 0
    rejected: int = 0
    seconds: float = 0.0
    devices: list[str] = field(default_factory=list)
    dtype: str = ""
    backoffs: int = 0
    fp32_reruns: int = 0
    rejects_path: str | None = None
    output: str = "-"
    per_device: dict[str, Any] = field(default_factory=dict)

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        text = (f"scored {self.pairs} pairs in {self.seconds:.2f} s ({self.pairs_per_s:.1f} pairs/s) "
                f"on {','.join(self.devices)}, {self.dtype}")
        if self.rejected:
            text += f"; {self.rejected} bad rows skipped"
            if self.rejects_path:
                text += f" (see {self.rejects_path})"
        if self.backoffs:
            text += f"; {self.backoffs} out-of-memory back-offs"
        if self.fp32_reruns:
            text += f"; {self.fp32_reruns} batches re-run in fp32"
        return text


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
    check_output_path(cfg.output, [cfg.input], cfg.overwrite)
    if cfg.engine == "ray":
        from rerank_cli.ray_engine import run_ray

        return run_ray(cfg, reporter)
    from rerank_cli.plan import resolve_devices
    from rerank_cli.workdir import left_by_earlier_run

    devices = resolve_devices(cfg)
    if len(devices) > 1 or cfg.dry_run or cfg.work_dir or cfg.gpus_per_worker > 1 or left_by_earlier_run(cfg):
        from rerank_cli.workers import run_parallel

        return run_parallel(cfg, devices, reporter)
    return run_inline(cfg, devices[0], reporter)


def open_output(cfg: RunConfig):
    """The sink every executor writes scored batches to, in input order (ranking may wrap it)."""
    if wants_ranking(cfg):
        return open_ranked_output(cfg)
    return open_writer(cfg.output, cfg.output_format)


def columns_of(cfg: RunConfig) -> Columns:
    return Columns(cfg.query_col, cfg.passage_col, cfg.instruction_col, cfg.score_col)


def open_chunks(cfg: RunConfig):
    """The input's chunks; the first is read now, so bad input fails before the model loads."""
    chunks = read_chunks(cfg.input, columns_of(cfg), fmt=cfg.input_format, window=cfg.sort_window,
                         skip_bad=cfg.on_bad_row == "skip")
    first = next(chunks, None)
    if first is not None:
        check_ranking_columns(cfg, first.batch.schema)
    return itertools.chain([first], chunks) if first is not None else iter(())


def pair_columns(chunk: Chunk, columns: Columns):
    batch = chunk.batch
    q = batch.column(columns.query).to_pylist()
    p = batch.column(columns.passage).to_pylist()
    inst = batch.column(columns.instruction).to_pylist() if columns.instruction else None
    return q, p, inst


def with_scores(batch: pa.RecordBatch, scores, name: str) -> pa.RecordBatch:
    return batch.append_column(pa.field(name, pa.float32()), pa.array(scores, type=pa.float32()))


def input_rows(cfg: RunConfig) -> int | None:
    """Row count when the format tells it cheaply (Parquet metadata), for the progress bar."""
    if cfg.input == "-" or not cfg.input.endswith((".parquet", ".pq")) or not os.path.isfile(cfg.input):
        return None
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(cfg.input).metadata.num_rows
    except Exception:
        return None


class RejectSink:
    """Rejected rows, appended to a JSONL file opened on first use and removed if the run fails."""

    def __init__(self, cfg: RunConfig):
        self.path = cfg.rejects or (f"{cfg.output}.rejects.jsonl" if cfg.output != "-" else None)
        self.source = cfg.input
        self.count = 0
        if self.path and os.path.exists(self.path) and not cfg.overwrite:
            raise ConfigError(f"{self.path}: rejects file already exists; pass --overwrite or --rejects PATH")
        self._created = False

    def add(self, rejects: list) -> None:
        if not rejects:
            return
        self.count += len(rejects)
        if self.path:
            if not self._created and os.path.exists(self.path):
                os.unlink(self.path)
            self._created = True
            write_rejects(self.path, rejects, self.source)

    def __enter__(self) -> RejectSink:
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is not None and self._created and self.path and os.path.exists(self.path):
            os.unlink(self.path)


def run_inline(cfg: RunConfig, device: str, reporter: Reporter) -> Summary:
    """One device, no subprocess: the path to read when debugging."""
    from rerank_cli.reranker import Reranker

    started = time.perf_counter()
    columns = columns_of(cfg)
    chunks = open_chunks(cfg)
    reranker = Reranker.from_config(cfg, device, log=reporter.info)
    describe_choices(reporter, device, reranker)
    summary = Summary(devices=[device], dtype=reranker.precision.name, output=cfg.output)
    reporter.start(input_rows(cfg))
    row = 1
    with open_output(cfg) as writer, RejectSink(cfg) as rejects:
        for chunk in chunks:
            rejects.add(chunk.rejects)
            q, p, inst = pair_columns(chunk, columns)
            scores = reranker.score_columns(q, p, inst, on_batch=reporter.advance, first_row=row)
            writer.write(with_scores(chunk.batch, scores, cfg.score_col))
            row += chunk.num_rows
        reporter.stop()
    return finish(summary, reranker.stats, rejects, started)


def describe_choices(reporter: Reporter, device: str, reranker) -> None:
    reporter.info(choices_line(device, reranker))


def choices_line(device: str, reranker) -> str:
    """The precision and batch-size decisions for a device, with their reasons."""
    p = reranker.precision
    return (f"{device}: {reranker.kind} in {p.name} ({p.reason}); "
            f"batches of up to {reranker.budget.tokens} padded tokens ({reranker.budget_reason})")


def finish(summary: Summary, stats, rejects: RejectSink, started: float) -> Summary:
    summary.pairs = stats.pairs
    summary.backoffs = stats.backoffs
    summary.fp32_reruns = stats.fp32_reruns
    summary.rejected = rejects.count
    summary.rejects_path = rejects.path if rejects.count else None
    summary.seconds = time.perf_counter() - started
    return summary
