"""Sharded runs: many devices (a worker process each, a dynamic shard queue, recovery) and resume.

The parent streams the input once (validation and bad-row errors happen here, with file and line),
cuts it into shards, writes each shard's rows to the work dir and hands shard ids to workers as they
free up. A worker that dies gives its shard back to the queue and is replaced on the same device; a
shard that keeps failing, or a worker error, ends the run with one clean line. Parts are merged into
the output in input order as soon as they are next in line. After success the work dir goes; after a
failure or Ctrl-C its finished shards stay, and the same command resumes from them.

One device with --work-dir runs the same shard loop in this process (no subprocess).
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import uuid
from collections import deque

from rerank_cli.engines.job import (
    COUNTERS,
    RejectSink,
    Summary,
    describe_choices,
    empty_output,
    finish,
    input_rows,
    open_chunks,
    open_output,
    written_paths,
)
from rerank_cli.engines.local.merge import OrderedMerge
from rerank_cli.engines.local.plan import Plan, cut_shards, make_plan
from rerank_cli.engines.local.pool import Pool, Slot, describe_exit
from rerank_cli.engines.local.workdir import WorkDir, fingerprint, write_arrow, write_part
from rerank_cli.errors import Interrupted, RerankError, WorkerError

RETRIES = 3  # failures of one shard (or deaths in a row of one worker) before the run gives up
POLL_S = 0.2
READ_AHEAD = 2  # shards kept ready per worker while the input is being read
STALL_S = float(os.environ.get("RERANK_STALL_TIMEOUT_S", "600"))  # a busy worker silent this long is hung


def run_parallel(cfg, devices: list[str], reporter) -> Summary | None:
    """Score `cfg.input` over `devices` (or print the plan, for --dry-run)."""
    plan = make_plan(cfg, devices, input_rows(cfg))
    workdir = WorkDir.for_run(cfg)
    workdir.check_paths([cfg.input], written_paths(cfg))
    fp = fingerprint(cfg, plan)
    if cfg.dry_run:
        return dry_run(cfg, plan, workdir, fp)
    from rerank_cli.engines.local.worker import faults_from_env

    faults = faults_from_env()
    resume = workdir.open(fp, plan.shards)
    ok = False
    try:
        if resume.message:
            reporter.info(resume.message)
        for note in plan.notes:
            reporter.info(note)
        if len(plan.workers) == 1 and not plan.workers[0].is_group:
            summary = run_sharded_inline(cfg, plan, workdir, fp, resume, reporter)
        else:
            reporter.info(plan.headline())
            summary = ParallelRun(cfg, plan, workdir, fp, resume, reporter, faults).run()
        ok = True
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (errors.Terminated)
        kept = workdir.finished() and not workdir.temporary
        raise Interrupted.by(stop, f"; finished shards are kept in {workdir.path}: rerun to resume"
                             if kept else "") from None
    finally:
        workdir.finish() if ok or not workdir.finished() else workdir.close()  # keep only what resumes
    return summary


def dry_run(cfg, plan: Plan, workdir: WorkDir, fp: dict) -> None:
    """Print the plan on stdout (reading, and so checking, the whole input) and score nothing."""
    plan.total_rows = sum(chunk.num_rows for chunk in open_chunks(cfg))
    where = "a temporary folder, removed at the end" if workdir.temporary else str(workdir.path)
    resume = workdir.peek(fp, plan.shards) if not workdir.temporary else None
    workdir.close()
    lines = plan.lines() + [f"  work dir: {where}"]
    if resume and resume.message:
        lines.append(f"  {resume.message.replace(f' ({workdir.path})', '')}")
    print("\n".join(lines + ["nothing scored (--dry-run)"]), flush=True)
    return None


def _batches(chunks, rejects: RejectSink, schemas: list):
    """The chunks' batches for `cut_shards`; `schemas` gets the first one's schema (for `empty_output`)."""
    for chunk in chunks:
        rejects.add(chunk.rejects)
        if not schemas:
            schemas.append(chunk.batch.schema)
        yield chunk.batch


def run_sharded_inline(cfg, plan: Plan, workdir: WorkDir, fp: dict, resume, reporter) -> Summary:
    """One device, resumable: the shard loop of the workers, in this process."""
    from rerank_cli.engines.local.worker import score_table
    from rerank_cli.reranker import Reranker

    started = time.perf_counter()
    spec = plan.workers[0]
    chunks = open_chunks(cfg)
    reranker = Reranker.from_config(cfg, spec.device, log=reporter.info)
    describe_choices(reporter, spec.device, reranker)
    summary = Summary.for_run(cfg, devices=[spec.device], dtype=reranker.precision.name, output=cfg.output)
    total = input_rows(cfg)
    reporter.start(total)
    try:
        with RejectSink(cfg) as rejects, open_output(cfg) as writer:
            merge = OrderedMerge(writer, workdir.part)
            shards, schemas = 0, []
            for shard, table in cut_shards(_batches(chunks, rejects, schemas), plan.shard_rows):
                shards += 1
                if resume.done.get(shard.id) != shard.rows:
                    t = time.perf_counter()
                    scored = score_table(reranker, cfg, table, shard.first_row, reporter.advance)
                    write_part(workdir.path, shard.id, scored, {"device": spec.device,
                                                                 "seconds": round(time.perf_counter() - t, 3)})
                elif total:
                    total -= shard.rows
                    reporter.set_total(total)  # the bar counts this run's work only
                merge.add(shard.id, shard.rows)
                merge.flush()
            if not shards and schemas:
                writer.write(empty_output(cfg, schemas[0]))
            workdir.record_shards(fp, shards)
    finally:
        reporter.stop()
    return finish(summary, reranker.stats, rejects, started)


class ParallelRun:
    """The parent's event loop: read shards, hand them out, watch workers, merge, recover."""

    def __init__(self, cfg, plan: Plan, workdir: WorkDir, fp: dict, resume, reporter, faults=()):
        self.cfg, self.plan, self.workdir, self.fp, self.resume = cfg, plan, workdir, fp, resume
        self.reporter = reporter
        self.pool = Pool(plan.workers, (cfg, str(workdir.path), uuid.uuid4().hex[:12], faults))
        self.pending: deque = deque()  # shards written and waiting for a worker
        self.failures: dict[int, list[str]] = {}
        self.total: int | None = None  # shard count, once the input is read to the end
        self.read_shards = 0
        self.rows_read = 0
        self.rows_resumed = 0
        self.known_rows = input_rows(cfg)
        self.started = False

    def run(self) -> Summary:
        started = time.perf_counter()
        chunks = open_chunks(self.cfg)  # bad input fails here, before any worker starts
        with RejectSink(self.cfg) as rejects, open_output(self.cfg) as writer, self.pool:
            self.merge = OrderedMerge(writer, self.workdir.part)
            schemas: list = []
            self.source = cut_shards(_batches(chunks, rejects, schemas), self.plan.shard_rows)
            self.reporter.start(self.known_rows)
            try:
                self._loop()
            finally:
                self.reporter.stop()
            if not self.rows_read and schemas:
                writer.write(empty_output(self.cfg, schemas[0]))
        if self.merge.rows != self.rows_read:
            raise WorkerError(f"internal: merged {self.merge.rows} rows of {self.rows_read}")
        return self._summary(rejects, started)

    def _loop(self) -> None:
        while not self.merge.complete(self.total):
            reading = self.total is None and len(self.pending) < READ_AHEAD * len(self.pool.slots)
            if reading:
                self._read_shard()
            for slot, message in self.pool.events(0.0 if reading else POLL_S):
                self._handle(slot, message)
            self._check_stalls()
            self._dispatch()
            if not self.merge.flush():
                self._check_lost()

    # --- input -----------------------------------------------------------------------------------

    def _read_shard(self) -> None:
        item = next(self.source, None)
        if item is None:
            self.total = self.read_shards
            self.workdir.record_shards(self.fp, self.total)
            self.reporter.set_total(self.rows_read - self.rows_resumed)
            return
        shard, table = item
        self.read_shards += 1
        self.rows_read += shard.rows
        if self.resume.done.get(shard.id) == shard.rows:
            self.rows_resumed += shard.rows
            self.merge.add(shard.id, shard.rows)
            if self.known_rows:
                self.reporter.set_total(self.known_rows - self.rows_resumed)
            return
        write_arrow(self.workdir.input(shard.id), table)
        self.pending.append(shard)
        if not self.started:  # the first shard to score (none if all were done before): start workers
            self.pool.start_all()
            self.started = True

    # --- workers ---------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        for slot in self.pool.slots:
            if not self.pending:
                return
            if slot.alive and slot.ready and slot.shard is None:
                shard = self.pending.popleft()
                if self.pool.send(slot, shard):
                    slot.shard, slot.last_heard = shard, time.monotonic()
                else:  # it is going down; the exit event will follow
                    self.pending.appendleft(shard)

    def _handle(self, slot: Slot, message: tuple) -> None:
        kind = message[0]
        if kind == "progress":
            slot.progress += message[1]
            self.reporter.advance(message[1])
        elif kind == "ready":
            slot.ready = True
            self._describe(slot, message[1])
        elif kind == "info":
            self.reporter.info(f"{slot.spec.name}: {message[1]}")
        elif kind == "done":
            self._done(slot, message[1], message[2])
        elif kind == "error":
            self._error(slot, *message[1:])
        elif kind == "exit":
            self._died(slot, message[1])

    def _describe(self, slot: Slot, info: dict) -> None:
        if not slot.described:
            slot.described = True
            self.reporter.info(f"{slot.spec.name}: {info['kind']} in {info['dtype']} ({info['reason']}); batches "
                               f"of up to {info['tokens']} padded tokens ({info['budget_reason']})")

    def _done(self, slot: Slot, shard_id: int, info: dict) -> None:
        shard = slot.shard
        if shard is None or shard.id != shard_id:
            raise WorkerError(f"internal: {slot.spec.name} finished shard {shard_id}, which it was not given")
        slot.shard, slot.progress, slot.deaths = None, 0, 0
        slot.pairs += shard.rows
        slot.shards += 1
        slot.busy_s += info.get("seconds", 0.0)
        for name in COUNTERS:
            slot.counts[name] = slot.counts.get(name, 0) + info.get(name, 0)
        self.merge.add(shard.id, shard.rows)
        self.workdir.input(shard.id).unlink(missing_ok=True)

    def _error(self, slot: Slot, shard_id, kind: str, cls: str, message: str, tb: str) -> None:
        if os.environ.get("RERANK_DEBUG") == "1":
            print(f"--- {slot.spec.name} traceback ---\n{tb}", file=sys.stderr, flush=True)
        if kind == "device":  # the process ends next; its exit event retries the shard elsewhere
            slot.cause = f"failed with {message}"
            return
        if kind == "user":
            raise rebuild_error(cls, message)
        on = f" on shard {shard_id} ({slot.shard.span})" if slot.shard is not None else " while loading the model"
        raise WorkerError(f"{slot.spec.name} failed{on}: {message}")

    def _died(self, slot: Slot, status: int | None) -> None:
        cause, slot.cause = slot.cause or describe_exit(status), None
        slot.deaths += 1
        slot.restarts += 1
        if slot.progress:
            self.reporter.advance(-slot.progress)
        shard, slot.shard, slot.progress = slot.shard, None, 0
        what = ""
        if shard is not None:
            tries = self.failures.setdefault(shard.id, [])
            tries.append(cause)
            if len(tries) >= RETRIES:
                raise WorkerError(f"shard {shard.id} ({shard.span}) failed {len(tries)} times; last on "
                                  f"{slot.spec.label}: the worker {cause}")
            self.pending.appendleft(shard)
            what = f"; shard {shard.id} goes back on the queue"
        if slot.deaths > RETRIES:
            raise WorkerError(f"{slot.spec.name} died {slot.deaths} times in a row; last: it {cause}")
        self.reporter.info(f"{slot.spec.name} {cause}{what}; starting a replacement")
        self.pool.start(slot)

    def _check_stalls(self) -> None:
        now = time.monotonic()
        for slot in self.pool.slots:
            if slot.alive and slot.shard is not None and now - slot.last_heard > STALL_S:
                slot.cause = f"made no progress for {STALL_S:.0f} s (hung?) and was killed"
                slot.last_heard = now
                slot.process.kill()

    def _check_lost(self) -> None:
        """A guard, never expected to fire: nothing in flight, nothing queued, yet not finished."""
        if self.total is not None and not self.pending and not any(s.shard for s in self.pool.slots) \
                and not self.merge.complete(self.total):
            raise WorkerError(f"internal: shard {self.merge.next} was lost")

    # --- the end ---------------------------------------------------------------------------------

    def _summary(self, rejects: RejectSink, started: float) -> Summary:
        slots = self.pool.slots
        summary = Summary.for_run(self.cfg, devices=[s.spec.label for s in slots],
                                  dtype=",".join(self.plan.dtype_names()), output=self.cfg.output,
                                  pairs=sum(s.pairs for s in slots), rejected=rejects.count,
                                  rejects_path=rejects.path if rejects.count else None,
                                  seconds=time.perf_counter() - started)
        for slot in slots:
            summary.add_counts(slot.counts)
        for slot in slots:
            rate = slot.pairs / slot.busy_s if slot.busy_s else 0.0
            restarts = f"; restarted {slot.restarts} time(s)" if slot.restarts else ""
            summary.per_device[slot.spec.name] = {"pairs": slot.pairs, "shards": slot.shards,
                                                  "seconds": round(slot.busy_s, 3), "pairs_per_s": round(rate, 1),
                                                  "restarts": slot.restarts}
            self.reporter.info(f"{slot.spec.name}: {slot.pairs} pairs in {slot.shards} shard(s), "
                               f"{rate:.1f} pairs/s{restarts}")
        if self.rows_resumed:
            self.reporter.info(f"{self.rows_resumed} pairs came from shards finished by an earlier run")
        return summary


def rebuild_error(cls: str, message: str) -> RerankError:
    """The worker's RerankError, as the same class with the same message (so the same CLI line)."""
    module, _, name = cls.partition(":")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        found = WorkerError
    if not (isinstance(found, type) and issubclass(found, RerankError)):
        found = WorkerError
    exc = found.__new__(found)
    RerankError.__init__(exc, message)
    return exc
