"""The parent's recovery rules, without processes: deaths, retries, errors, fault injection settings."""

from __future__ import annotations

import pytest

from rerank_cli.config import build_config
from rerank_cli.engines.local.plan import Shard, make_plan
from rerank_cli.engines.local.pool import describe_exit
from rerank_cli.engines.local.run import RETRIES, ParallelRun, rebuild_error
from rerank_cli.engines.local.workdir import Resume, WorkDir, fingerprint
from rerank_cli.engines.local.worker import Fault, faults_from_env, is_device_fault
from rerank_cli.errors import ConfigError, PairTooLargeError, WorkerError
from rerank_cli.progress import Reporter


@pytest.fixture
def run(tmp_path):
    cfg = build_config({"input": str(tmp_path / "in.jsonl"), "output": str(tmp_path / "out.jsonl"), "model": "m",
                        "devices": "cpu,cpu"})
    plan = make_plan(cfg, ["cpu", "cpu"], cpu_count=2)
    r = ParallelRun(cfg, plan, WorkDir(tmp_path / "w"), {}, Resume(), Reporter(quiet=True))
    r.started = []
    r.pool.start = r.started.append  # no processes: record replacements instead
    return r


def test_a_dead_workers_shard_goes_back_first_and_a_replacement_starts(run):
    slot = run.pool.slots[1]
    run.pending.append(Shard(7, 141, 20))
    slot.shard, slot.progress = Shard(4, 81, 20), 12
    run.reporter.done = 30
    run._died(slot, -9)
    assert [s.id for s in run.pending] == [4, 7]
    assert run.started == [slot] and slot.shard is None and slot.restarts == 1
    assert run.reporter.done == 18  # the lost shard's progress is taken back


def test_a_shard_failing_repeatedly_ends_the_run_naming_shard_device_and_cause(run):
    slot = run.pool.slots[0]
    shard = Shard(4, 81, 20)
    for _ in range(RETRIES - 1):
        slot.shard = shard
        run._died(slot, -11)
        run.pending.clear()
    slot.shard = shard
    with pytest.raises(WorkerError) as err:
        run._died(slot, -9)
    assert str(err.value) == "shard 4 (pairs 81-100) failed 3 times; last on cpu: the worker was killed by SIGKILL"


def test_a_worker_that_keeps_dying_while_loading_ends_the_run(run):
    slot = run.pool.slots[0]
    for _ in range(RETRIES):
        run._died(slot, 1)
    with pytest.raises(WorkerError, match=r"worker 0 \(cpu\) died 4 times in a row; last: it exited with status 1"):
        run._died(slot, 1)


def test_a_user_error_in_a_worker_is_the_same_error_in_the_parent(run):
    with pytest.raises(PairTooLargeError) as err:
        run._error(run.pool.slots[0], 2, "user", "rerank_cli.errors:PairTooLargeError", "row 5 (9 tokens) ...", "")
    assert str(err.value) == "row 5 (9 tokens) ..." and err.value.exit_code == 2


def test_a_bug_in_a_worker_is_one_clean_line_naming_worker_and_shard(run):
    slot = run.pool.slots[1]
    slot.shard = Shard(2, 41, 20)
    with pytest.raises(WorkerError) as err:
        run._error(slot, 2, "bug", "builtins:RuntimeError", "RuntimeError: boom", "Traceback ...")
    assert str(err.value) == "worker 1 (cpu) failed on shard 2 (pairs 41-60): RuntimeError: boom"


def test_a_device_fault_is_retried_like_a_death_with_its_cause(run):
    slot = run.pool.slots[0]
    slot.shard = Shard(0, 1, 20)
    run._error(slot, 0, "device", "torch:AcceleratorError", "AcceleratorError: CUDA error: illegal address", "")
    run._died(slot, 0)
    assert run.failures[0] == ["failed with AcceleratorError: CUDA error: illegal address"]
    assert run.pending[0].id == 0


def test_rebuild_error_keeps_unknown_classes_clean():
    assert type(rebuild_error("nowhere:Nope", "x")) is WorkerError
    assert type(rebuild_error("builtins:ValueError", "x")) is WorkerError


@pytest.mark.parametrize("status, text", [
    (86, "exited with status 86"), (-9, "was killed by SIGKILL"), (-11, "crashed (SIGSEGV)"),
    (-15, "was killed by SIGTERM"),
])
def test_exit_statuses_read_as_causes(status, text):
    assert describe_exit(status) == text


def test_fault_settings_parse_or_fail_cleanly():
    assert faults_from_env({"RERANK_FAULT_KILL": "1:2"}) == (Fault("kill", 1, 2, 1),)
    assert faults_from_env({"RERANK_FAULT_RAISE": "*:3:2"}) == (Fault("raise", None, 3, 2),)
    assert Fault("kill", None, 2).applies(5, 2) and not Fault("kill", 1, 2).applies(0, 2)
    with pytest.raises(ConfigError, match="RERANK_FAULT_KILL must look like W:B"):
        faults_from_env({"RERANK_FAULT_KILL": "one"})


def test_device_faults_are_told_from_bugs():
    assert is_device_fault(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_device_fault(ValueError("bad value"))


def test_fingerprint_ignores_what_does_not_change_scores(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("{}\n")
    cfg = build_config({"input": str(src), "output": "o.jsonl", "model": "m", "devices": "cpu,cpu"})
    a = fingerprint(cfg, make_plan(cfg, ["cpu", "cpu"], cpu_count=2))
    b = fingerprint(cfg.replace(batch_size=7, quiet=True), make_plan(cfg, ["cpu", "cpu"], cpu_count=2))
    assert a == b
