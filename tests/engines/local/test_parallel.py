"""Many devices through the real CLI: `--devices cpu,cpu` runs two real spawned workers.

A worker killed mid-run, a worker that raises, Ctrl-C then resume, the dry-run plan, and resume on the
one-device (in-process) sharded path. Scores are compared with the single-device inline run. The same on
a real GPU is in test_cuda_workers.py (`pytest -m gpu`).
"""

from __future__ import annotations

import glob
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from rerank_cli import score_file
from rerank_cli.config import build_config
from rerank_cli.errors import Interrupted
from rerank_cli.model.precision import choose_dtype
from rerank_cli.pipeline import run
from rerank_cli.progress import Reporter
from tests.conftest import ROOT

PAIRS = 240
SPAWN = ["--devices", "cpu,cpu", "--shard-rows", "20", "--batch-size", "8"]  # 12 shards of ~3 batches


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from rerank_cli.model.tiny import write_pairs

    return str(write_pairs(tmp_path_factory.mktemp("par") / "pairs.parquet", PAIRS, seed=5))


@pytest.fixture(scope="module")
def inline_rows(pairs, ce_model, tmp_path_factory):
    """The single-device inline run: the scores every executor must reproduce."""
    out = tmp_path_factory.mktemp("inline") / "out.jsonl"
    score_file(pairs, str(out), model=ce_model, devices="cpu", quiet=True)  # the CPU even where there is a GPU
    return read_rows(out)


@pytest.fixture(scope="module")
def parallel_bytes(pairs, ce_model, tmp_path_factory):
    """An uninterrupted two-worker run (in this process, as the Python API)."""
    out = tmp_path_factory.mktemp("parallel") / "out.jsonl"
    summary = score_file(pairs, str(out), model=ce_model, quiet=True, devices="cpu,cpu", shard_rows=20,
                         batch_size=8)
    assert summary.pairs == PAIRS and sum(d["shards"] for d in summary.per_device.values()) == 12
    assert not (out.parent / ".out.jsonl.rerank-work").exists()  # removed after success
    return out.read_bytes()


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def assert_same_scores(rows: list[dict], reference: list[dict]) -> None:
    assert [r["pid"] for r in rows] == [r["pid"] for r in reference]  # every row once, in input order
    got, want = np.array([r["score"] for r in rows]), np.array([r["score"] for r in reference])
    assert np.allclose(got, want, rtol=1e-5, atol=1e-5), np.abs(got - want).max()  # batch shapes differ


@pytest.mark.slow
def test_two_workers_score_like_one_device(parallel_bytes, inline_rows):
    rows = [json.loads(line) for line in parallel_bytes.decode().splitlines()]
    assert_same_scores(rows, inline_rows)
    assert list(rows[0]) == ["qid", "pid", "query", "passage", "label", "score"]


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_every_row_is_scored_once(rerank_proc, pairs, ce_model, tmp_path, inline_rows,
                                                                   parallel_bytes):
    out = tmp_path / "out.jsonl"
    proc = rerank_proc("score", pairs, "-o", str(out), "-m", ce_model, *SPAWN, env={"RERANK_FAULT_KILL": "1:2"})
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "worker 1 (cpu) exited with status 86; shard" in err and "goes back on the queue" in err
    assert "starting a replacement" in err
    assert "worker 1 (cpu): " in err and "restarted 1 time(s)" in err
    assert_same_scores(read_rows(out), inline_rows)
    assert out.read_bytes() == parallel_bytes


@pytest.mark.slow
def test_a_worker_that_raises_ends_the_run_with_one_clean_line(rerank_proc, pairs, ce_model, tmp_path):
    out = tmp_path / "out.jsonl"
    started = time.monotonic()
    proc = rerank_proc("score", pairs, "-o", str(out), "-m", ce_model, *SPAWN, env={"RERANK_FAULT_RAISE": "*:1"})
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: worker ") and "failed on shard " in last
    assert last.endswith("RuntimeError: RERANK_FAULT_RAISE: injected failure after 1 batches")
    assert "Traceback" not in err
    assert not out.exists() and not glob.glob(str(tmp_path / ".out.jsonl.rerank-tmp*"))
    assert time.monotonic() - started < 120


@pytest.mark.slow
def test_a_pair_too_large_in_a_worker_gives_the_inline_error(rerank_proc, pairs, ce_model, tmp_path, monkeypatch,
                                                             capsys):
    from rerank_cli.cli import main

    monkeypatch.setenv("RERANK_FAULT_OOM_TOKENS", "1")  # every batch "runs out of memory", even one pair
    with pytest.raises(SystemExit) as exit_inline:
        main(["score", pairs, "-o", str(tmp_path / "inline.jsonl"), "-m", ce_model, "-q"])
    inline_error = capsys.readouterr().err.strip().splitlines()[-1]
    proc = rerank_proc("score", pairs, "-o", str(tmp_path / "par.jsonl"), "-m", ce_model, "--devices", "cpu,cpu",
                      "-q")
    assert exit_inline.value.code == 2 and proc.returncode == 2
    assert inline_error.startswith("error: row ") and "does not fit in memory on cpu even alone" in inline_error
    assert proc.stderr.decode().strip() == inline_error
    assert not (tmp_path / "par.jsonl").exists()


@pytest.mark.slow
def test_ctrl_c_stops_keeps_shards_and_the_same_command_resumes_to_the_same_file(rerank_proc, pairs, ce_model, tmp_path,
                                                                                  parallel_bytes):
    out = tmp_path / "out.jsonl"
    work = tmp_path / ".out.jsonl.rerank-work"
    args = [sys.executable, "-m", "rerank_cli", "score", pairs, "-o", str(out), "-m", ce_model, *SPAWN]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while not glob.glob(str(work / "*.done")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert err.decode().strip().splitlines()[-1] == (
        f"error: interrupted; finished shards are kept in {work}: rerun to resume")
    assert not out.exists()
    done = len(glob.glob(str(work / "*.done")))
    assert 1 <= done < 12

    again = rerank_proc("score", pairs, "-o", str(out), "-m", ce_model, *SPAWN)
    text = again.stderr.decode()
    assert again.returncode == 0, text
    assert f"resuming: {done} of 12 shards already done ({work})" in text
    assert out.read_bytes() == parallel_bytes
    assert not work.exists()


def test_dry_run_prints_the_plan_and_scores_nothing(rerank_proc, pairs, ce_model, tmp_path):
    out = tmp_path / "out.jsonl"
    proc = rerank_proc("score", pairs, "-o", str(out), "-m", ce_model, "--devices", "cpu,cpu", "--shard-rows", "50",
                      "--dry-run")
    assert proc.returncode == 0, proc.stderr.decode()
    why = choose_dtype("auto", "cpu").reason  # names AMX where the CPU has it
    assert proc.stdout.decode().splitlines() == [
        "plan: 2 worker(s) on 2 device(s)",
        f"  worker 0 (cpu): fp32 ({why}); 1 CPU thread(s)",
        f"  worker 1 (cpu): fp32 ({why}); 1 CPU thread(s)",
        f"  input: {PAIRS} pairs in 5 shard(s) of up to 50 pairs, handed out as workers free up",
        f"  work dir: {tmp_path / '.out.jsonl.rerank-work'}",
        "nothing scored (--dry-run)",
    ]
    assert os.listdir(tmp_path) == []


def test_bad_input_is_reported_by_the_parent_with_its_line_and_leaves_nothing(rerank_proc, ce_model, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"query": "q", "passage": "p"}\n{"query": null, "passage": "p"}\n')
    proc = rerank_proc("score", str(src), "-o", str(tmp_path / "out.jsonl"), "-m", ce_model, "--devices", "cpu,cpu")
    assert proc.returncode == 2
    assert proc.stderr.decode().strip().splitlines()[-1] == f"error: {src}:2: 'query' is null"
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]  # no output, no work dir: nothing to resume


def test_gpus_that_are_not_there_fail_before_any_work(rerank_proc, pairs, ce_model, tmp_path):
    proc = rerank_proc("score", pairs, "-o", str(tmp_path / "o.jsonl"), "-m", ce_model, "--devices", "cuda:0,cuda:1",
                      env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2
    assert proc.stderr.decode().strip() == (
        "error: cuda:0,cuda:1: no CUDA device is visible (CUDA_VISIBLE_DEVICES=''); use --devices cpu")


def test_one_device_with_a_work_dir_resumes_in_process(pairs, ce_model, tmp_path, interrupt_shards, inline_rows):
    out, work = tmp_path / "out.jsonl", tmp_path / ".out.jsonl.rerank-work"
    cfg = build_config({"input": pairs, "output": str(out), "model": ce_model, "devices": "cpu", "shard_rows": 100})
    interrupt_shards.arm(on_call=3)
    with pytest.raises(Interrupted):
        run(cfg.replace(work_dir=str(work)), Reporter(quiet=True))
    assert not out.exists() and len(glob.glob(str(work / "*.done"))) == 2
    interrupt_shards.disarm()
    log = io.StringIO()
    summary = run(cfg, Reporter(stream=log, force_plain=True))  # no --work-dir: the leftover one is found
    assert f"resuming: 2 of 3 shards already done ({work})" in log.getvalue()
    assert summary.pairs == PAIRS - 200
    assert_same_scores(read_rows(out), inline_rows)
    assert not work.exists()



def _group_alive(pgid: int) -> list[str]:
    """Processes of the process group that are still running (zombies, waiting to be reaped, do not count)."""
    alive = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(stat)
    return alive


def _sigterm_group_when(ready, args: list[str]) -> tuple[subprocess.Popen, str]:
    """Start `rerank ARGS` in a process group of its own, SIGTERM the whole group once `ready()`."""
    proc = subprocess.Popen([sys.executable, "-m", "rerank_cli", *args], stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    deadline = time.monotonic() + 180
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)  # parent and workers alike, as a supervisor or `kill -- -PGID` does
    _, err = proc.communicate(timeout=60)
    deadline = time.monotonic() + 10
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_alive(proc.pid), "worker processes were left behind"
    return proc, err.decode()


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads process groups from /proc")
def test_sigterm_to_the_group_stops_like_ctrl_c_and_the_same_command_resumes(pairs, ce_model, tmp_path,
                                                                             parallel_bytes):
    out = tmp_path / "out.jsonl"
    work = tmp_path / ".out.jsonl.rerank-work"
    args = ["score", pairs, "-o", str(out), "-m", ce_model, *SPAWN]
    proc, err = _sigterm_group_when(lambda: glob.glob(str(work / "*.done")), [*args, "-q"])
    assert proc.returncode == 143, err
    assert err == f"error: terminated by SIGTERM; finished shards are kept in {work}: rerun to resume\n"
    assert not out.exists() and not glob.glob(str(tmp_path / ".out.jsonl.rerank-tmp*"))
    done = len(glob.glob(str(work / "*.done")))
    assert 1 <= done < 12

    again = subprocess.run([sys.executable, "-m", "rerank_cli", *args], capture_output=True, timeout=240,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert again.returncode == 0, again.stderr.decode()
    assert f"resuming: {done} of 12 shards already done ({work})" in again.stderr.decode()
    assert out.read_bytes() == parallel_bytes
    assert not work.exists()


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads process groups from /proc")
def test_sigterm_while_the_workers_load_leaves_nothing(pairs, ce_model, tmp_path):
    out = tmp_path / "out.jsonl"
    work = tmp_path / ".out.jsonl.rerank-work"
    # the parent has written the first shards and started the workers; none has finished one
    proc, err = _sigterm_group_when(lambda: glob.glob(str(work / "*.in.arrow")),
                                    ["score", pairs, "-o", str(out), "-m", ce_model, *SPAWN, "-q"])
    assert proc.returncode == 143, err
    assert err == "error: terminated by SIGTERM\n"
    assert list(tmp_path.iterdir()) == []  # no output, no temporary file, no work dir: nothing to resume
