"""What runs inside the Ray cluster for `--engine ray`.

`ScoreWindow` is the callable class Ray Data's `map_batches` gives each scoring actor: it builds one
`Reranker` when the actor starts and scores each window of rows with `Reranker.score_columns`, the
same batching, precision choice and OOM back-off as the local engine. `RunLog` is a small actor the
scorers report progress, decisions and restarts to, so the driver can show them through its own
`Reporter`. `KillSwitch` is the fault injection the tests use to kill one actor mid-job.

Knows nothing of files or of how the cluster was reached (see run.py).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from rerank_cli.errors import InputError, PairTooLargeError
from rerank_cli.io.columnar import _check_schema

PROGRESS_EVERY_S = 0.5


@dataclass(frozen=True)
class KillSwitch:
    """RERANK_FAULT_RAY_KILL=N: the first actor to finish N windows exits hard, once per job.

    The marker file makes it once: the restarted actor (and every other one) finds it taken.
    """

    after: int
    marker: str

    def maybe_die(self, windows_done: int) -> None:
        if windows_done >= self.after and _claim(self.marker):
            os._exit(17)


def _claim(path: str) -> bool:
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


class RunLog:
    """Collects what the scoring actors report; the driver drains it for its progress bar, and
    adds up their counters (back-offs, fp32 re-runs, truncations: job.COUNTERS) for the summary."""

    def __init__(self):
        from rerank_cli.engines.job import COUNTERS

        self.pending_pairs = 0
        self.notes: list[str] = []
        self.starts = 0
        self.devices: dict[str, str] = {}
        self.totals = {"pairs": 0, **{name: 0 for name in COUNTERS}}

    def hello(self, device: str, dtype: str, note: str) -> None:
        self.starts += 1
        self.devices[device] = dtype
        self.notes.append(note)

    def note(self, message: str) -> None:
        self.notes.append(message)

    def progress(self, pairs: int, counts: dict | None = None) -> None:
        self.pending_pairs += pairs
        self.totals["pairs"] += pairs
        for key, value in (counts or {}).items():
            self.totals[key] = self.totals.get(key, 0) + value

    def drain(self) -> tuple[int, list[str]]:
        out = (self.pending_pairs, self.notes)
        self.pending_pairs, self.notes = 0, []
        return out

    def summary(self) -> dict:
        return {**self.totals, "starts": self.starts, "devices": dict(self.devices)}


class _Progress:
    """Sends pair counts to the RunLog at most every PROGRESS_EVERY_S (fire and forget)."""

    def __init__(self, log):
        self.log, self.pending, self.last = log, 0, time.monotonic()

    def add(self, n: int) -> None:
        self.pending += n
        if time.monotonic() - self.last >= PROGRESS_EVERY_S:
            self.flush()

    def flush(self, counts: dict | None = None) -> None:
        counts = {k: v for k, v in (counts or {}).items() if v}
        if self.pending or counts:
            self.log.progress.remote(self.pending, counts)
        self.pending, self.last = 0, time.monotonic()


class ScoreWindow:
    """One scoring actor: loads the model once, then scores windows of rows in the order given.

    Rows whose query, passage or instruction is null get a null score and are left for the driver,
    which knows their row numbers (or, with `raise_on_bad`, fail here: part-file output has no driver).
    """

    def __init__(self, cfg, device: str, threads: int | None, log, kill: KillSwitch | None = None,
                 raise_on_bad: bool = False, device_map: str | None = None):
        from rerank_cli.engines.job import choices_line, columns_of, counts_of
        from rerank_cli.reranker import Reranker

        if threads:
            import torch

            torch.set_num_threads(threads)
        self.log, self.kill, self.raise_on_bad = log, kill, raise_on_bad
        self.cfg, self.source = cfg, cfg.input
        self.columns = columns_of(cfg)
        self.reranker = Reranker.from_config(cfg, device, log=lambda msg: log.note.remote(msg),
                                             device_map=device_map)
        self.progress = _Progress(log)
        self.windows = 0
        self.seen = counts_of(self.reranker.stats)
        log.hello.remote(device, self.reranker.precision.name, choices_line(device, self.reranker))

    def __call__(self, table: pa.Table) -> pa.Table:
        from rerank_cli.engines.job import added_columns, check_added_columns

        if self.kill is not None:
            self.kill.maybe_die(self.windows)
        _check_schema(self.source, table.schema, self.columns)  # each file may differ
        check_added_columns(self.cfg, table.schema)
        good = self._good_rows(table)
        rows = table.filter(good) if good is not None else table
        queries = rows.column(self.columns.query).to_pylist()
        passages = rows.column(self.columns.passage).to_pylist()
        inst = rows.column(self.columns.instruction).to_pylist() if self.columns.instruction else None
        try:
            scored = self.reranker.score_chunk(queries, passages, inst, on_batch=self.progress.add)
        except PairTooLargeError as exc:
            first = queries[0][:40] if queries else ""
            raise PairTooLargeError(f"{exc} (row counted within a Ray block of {len(queries)} pairs "
                                    f"that starts with query {first!r})") from None
        self.windows += 1
        self._report()
        mask = good.to_pylist() if good is not None else None
        for f, column in added_columns(self.cfg, scored, mask):
            table = table.append_column(f, column)
        return table

    def _good_rows(self, table: pa.Table):
        """A mask of scorable rows, or None when all are."""
        bad = None
        for name in self.columns.required:
            nulls = pc.is_null(table.column(name))
            bad = nulls if bad is None else pc.or_(bad, nulls)
        if bad is None or not pc.any(bad).as_py():
            return None
        if self.raise_on_bad:
            col = next(c for c in self.columns.required if table.column(c).null_count)
            raise InputError(self.source, f"{col!r} is null in a row (the Ray engine gives row numbers "
                                          "and --on-bad-row skip only with -o FILE, not --output-dir)")
        return pc.invert(bad)

    def _report(self) -> None:
        from rerank_cli.engines.job import counts_of

        now = counts_of(self.reranker.stats)
        delta = {k: now[k] - self.seen.get(k, 0) for k in now}
        self.seen = now
        self.progress.flush(delta)
