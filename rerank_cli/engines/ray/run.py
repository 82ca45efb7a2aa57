"""`--engine ray`: the same scoring job on a Ray cluster, with Ray Data doing the distribution.

Owns the run: the options Ray cannot serve, the Ray Data plan (read -> windows of `--sort-window`
rows -> `ScoreWindow` actors -> in-order sink), actor restarts and task retries, progress and notes
from the actors to our `Reporter`, and Ray's failures turned back into `RerankError`s. Scoring inside
each actor is `Reranker.score_columns`, the local engine's code path (actor.py); reaching the
cluster and sizing the pool live in cluster.py, reading and writing in io.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import threading
import time
import uuid
import warnings

from rerank_cli.config import RunConfig
from rerank_cli.engines.job import RejectSink, Summary, input_rows, open_output
from rerank_cli.engines.ray.cluster import ANSI, ActorPlan, cause_text, cluster_shape, plan_actors, ray_session
from rerank_cli.engines.ray.io import (
    check_first_window,
    check_output_dir,
    explain_read_error,
    read_input,
    write_dir,
    write_file,
)
from rerank_cli.errors import ConfigError, InputError, RerankError, WorkerError
from rerank_cli.io.formats import STREAM, detect_format
from rerank_cli.progress import Reporter

INSTALL_HINT = "pip install 'rerank-cli[ray]'"
MAX_RESTARTS = 3  # a scoring actor that dies is restarted up to this many times...
MAX_TASK_RETRIES = 3  # ...and the window it held is retried (there or on another actor)
PUMP_EVERY_S = 0.5
FOOTER_READERS = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
DIR_FORMATS = ("parquet", "jsonl", "csv")


def import_ray():
    """The `ray` module, or a ConfigError with the install hint."""
    if os.environ.get("RERANK_DEBUG") != "1":
        # Ray's C++ core prints its warnings straight onto our stderr (one per actor, or one a second
        # while it retries a connection); its own log files keep the rest.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ConfigError(f"--engine ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def run_ray(cfg: RunConfig, reporter: Reporter) -> Summary:
    """Score `cfg.input` on a Ray cluster; same output, columns, scores and order as the local engine."""
    check_options(cfg)
    ray = import_ray()
    started = time.perf_counter()
    summary = Summary.for_run(cfg, output=cfg.output_dir or cfg.output)
    with contextlib.ExitStack() as stack:
        # The rejects file is entered first so it exits last: it is kept only if the output's commit worked.
        rejects = stack.enter_context(RejectSink(cfg)) if not cfg.output_dir else None
        writer = None if cfg.output_dir else stack.enter_context(open_output(cfg))
        stack.enter_context(contextlib.redirect_stdout(_ReporterLines(reporter)))
        stack.enter_context(ray_session(ray, cfg, reporter))
        stack.enter_context(data_context(ray, cfg))
        stack.enter_context(user_errors(ray, cfg))
        plan = plan_actors(*cluster_shape(ray), cfg)
        reporter.info(plan.describe())
        dataset = read_input(ray, cfg)
        log = ray.remote(num_cpus=0)(_run_log_class()).remote()
        scored = score_dataset(dataset, cfg, plan, log, stack.enter_context(kill_switch()))
        reporter.start(input_rows(cfg))
        stack.callback(reporter.stop)
        with LogPump(ray, log, reporter):
            summary.pairs = write_file(scored, cfg, writer, rejects) if writer else write_dir(scored, cfg)
        reporter.stop()
        finish(summary, ray.get(log.summary.remote()), plan, rejects, reporter, cfg.dtype)
    summary.seconds = time.perf_counter() - started
    return summary


def check_options(cfg: RunConfig) -> None:
    """What the Ray engine cannot do, said before anything starts (every problem at once)."""
    problems = []
    if cfg.input == STREAM:
        problems.append("--engine ray reads files (local paths or URIs such as s3://bucket/pairs.parquet), "
                        "not stdin")
    if any(not d.startswith("cpu") for d in cfg.devices):
        problems.append("--device/--devices pick local devices; with --engine ray every GPU of the cluster "
                        "is used (--ray-workers sets how many actors; --device cpu forces CPU actors)")
    if cfg.ray_workers is not None and cfg.ray_workers < 1:
        problems.append("--ray-workers must be at least 1")
    if cfg.output_dir:
        if cfg.output != STREAM:
            problems.append("use -o FILE or --output-dir DIR, not both")
        if cfg.on_bad_row == "skip":
            problems.append("--on-bad-row skip needs one output file (-o FILE), not --output-dir")
        if cfg.top_k:
            problems.append("--top-k needs one output file (-o FILE), not --output-dir")
        fmt = cfg.output_format or "parquet"
        if fmt not in DIR_FORMATS:
            problems.append(f"--output-dir writes {', '.join(DIR_FORMATS)} part files (got {fmt!r})")
    if problems:
        raise ConfigError("; ".join(problems))
    detect_format(cfg.input, cfg.input_format, ("jsonl", "parquet", "csv", "tsv"), "input")
    if "://" not in cfg.input and not os.path.exists(cfg.input):
        raise InputError(cfg.input, "no such file")
    check_first_window(cfg)
    if cfg.output_dir:
        check_output_dir(cfg.output_dir, cfg.overwrite, [cfg.input] + ([cfg.rejects] if cfg.rejects else []))


# --- the dataset -------------------------------------------------------------------------------


def score_dataset(dataset, cfg: RunConfig, plan: ActorPlan, log, kill):
    """`dataset` with a score column, computed by a pool of `ScoreWindow` actors."""
    from rerank_cli.engines.ray.actor import ScoreWindow

    kwargs = dict(cfg=cfg, device=plan.device, threads=plan.threads, log=log, kill=kill,
                  raise_on_bad=bool(cfg.output_dir))
    if plan.num_gpus > 1:
        kwargs["device_map"] = "auto"
    with warnings.catch_warnings():
        # Ray 2.60 deprecates passing actor options this way but offers no other for these two.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return dataset.map_batches(
            ScoreWindow, fn_constructor_kwargs=kwargs, batch_format="pyarrow", batch_size=cfg.sort_window,
            concurrency=plan.actors, num_cpus=plan.num_cpus, num_gpus=plan.num_gpus or None,
            max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES,
        )


@contextlib.contextmanager
def data_context(ray, cfg: RunConfig):
    """Ray Data settings for the run (restored after): input order, no Ray progress bars, quiet logs."""
    ctx = ray.data.DataContext.get_current()
    footer_readers = os.environ.get(FOOTER_READERS)
    if footer_readers is None and os.path.isfile(cfg.input):
        os.environ[FOOTER_READERS] = "1"  # one Parquet footer to read: not Ray's default pool of 32 actors
    names = ("enable_progress_bars", "print_on_execution_start", "raise_original_map_exception")
    saved = ctx.execution_options.preserve_order, [getattr(ctx, n) for n in names]
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False  # our Reporter shows progress; two bars would fight
    ctx.print_on_execution_start = False
    ctx.raise_original_map_exception = True  # our errors, not UserCodeException, come out of the actors
    data_log = logging.getLogger("ray.data")
    level = data_log.level
    data_log.setLevel(logging.CRITICAL)  # failures reach the user as our one-line errors instead
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"ray\.")  # tuning hints meant for Ray Data authors
            yield ctx
    finally:
        ctx.execution_options.preserve_order = saved[0]
        for name, value in zip(names, saved[1]):
            setattr(ctx, name, value)
        if footer_readers is None:
            os.environ.pop(FOOTER_READERS, None)
        data_log.setLevel(level)


@contextlib.contextmanager
def kill_switch():
    """RERANK_FAULT_RAY_KILL=N (tests): one scoring actor exits hard after N windows, once per job.

    The marker lives in the temp folder of the node the actor runs on (here, for a local cluster)."""
    after = os.environ.get("RERANK_FAULT_RAY_KILL")
    if after is None:
        yield None
        return
    from rerank_cli.engines.ray.actor import KillSwitch

    marker = os.path.join(tempfile.gettempdir(), f"rerank-ray-kill-{uuid.uuid4().hex}")
    try:
        yield KillSwitch(int(after), marker)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(marker)


def _run_log_class():
    from rerank_cli.engines.ray.actor import RunLog

    return RunLog


# --- what the user sees -------------------------------------------------------------------------


class LogPump:
    """A thread that moves the actors' progress and notes from the RunLog to our Reporter."""

    def __init__(self, ray, log, reporter: Reporter):
        self.ray, self.log, self.reporter = ray, log, reporter
        self.seen: set[str] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="rerank-ray-progress", daemon=True)

    def _loop(self) -> None:
        while not self.stop.wait(PUMP_EVERY_S):
            self.pump()

    def pump(self) -> None:
        try:
            pairs, notes = self.ray.get(self.log.drain.remote(), timeout=10)
        except Exception:  # progress is best effort; the job's own errors surface elsewhere
            return
        for note in notes:
            if note not in self.seen:
                self.seen.add(note)
                self.reporter.info(note)
        if pairs:
            self.reporter.advance(pairs)

    def __enter__(self) -> LogPump:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        self.thread.join()
        self.pump()


class _ReporterLines(io.TextIOBase):
    """Stands in for stdout while Ray runs: Ray prints its console messages there, and our data (`-o -`)
    must stay clean. Each line goes to the Reporter (so `--quiet` silences it, and rich keeps its bar)."""

    def __init__(self, reporter: Reporter):
        self.reporter, self.buffer_text = reporter, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.buffer_text += text
        while "\n" in self.buffer_text:
            line, self.buffer_text = self.buffer_text.split("\n", 1)
            line = ANSI.sub("", line).strip()
            if line:
                self.reporter.info(line)
        return len(text)


def finish(summary: Summary, totals: dict, plan: ActorPlan, rejects: RejectSink | None,
           reporter: Reporter, asked_dtype: str) -> None:
    restarts = max(0, totals["starts"] - plan.actors)
    if restarts:
        reporter.info(f"ray: {restarts} scoring actor restart(s); the windows they held were retried")
    summary.devices = [f"ray:{plan.actors}x{'gpu' if plan.num_gpus else 'cpu'}"]
    summary.dtype = ",".join(sorted(set(totals["devices"].values()))) or asked_dtype  # no actor ran
    summary.add_counts(totals)
    summary.per_device = {"actors": plan.actors, "restarts": restarts}
    if rejects is not None:
        summary.rejected = rejects.count
        summary.rejects_path = rejects.path if rejects.count else None


# --- errors ------------------------------------------------------------------------------------


@contextlib.contextmanager
def user_errors(ray, cfg: RunConfig):
    """Ray wraps what an actor raised (RayTaskError, UserCodeException, ...): give the user our error."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, RerankError) and not isinstance(exc, ray.exceptions.RayError):
            raise
        err = user_error_in(ray, exc, cfg)
        if err is None:
            raise
        raise err from None


def user_error_in(ray, exc: BaseException, cfg: RunConfig) -> RerankError | None:
    """The RerankError inside Ray's wrappers, an InputError for unreadable input, a WorkerError for an
    actor that stayed dead; None for anything else (a bug: it keeps its traceback)."""
    import pyarrow as pa

    seen, stack, found = set(), [exc], []
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, RerankError) and not isinstance(e, ray.exceptions.RayError):
            return e
        found.append(e)
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    for e in found:
        if isinstance(e, (pa.ArrowInvalid, pa.ArrowTypeError, FileNotFoundError, json.JSONDecodeError)):
            return explain_read_error(cfg, e)
    for e in found:
        if isinstance(e, ray.exceptions.RayActorError):
            return WorkerError(f"a Ray scoring actor died and stayed dead after {MAX_RESTARTS} restarts "
                               f"({cause_text(e)}); see the Ray logs under /tmp/ray/session_latest/logs")
    return None



