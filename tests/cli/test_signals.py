"""SIGTERM stops a run as Ctrl-C does: the same cleanup, one line on stderr, exit status 143.

Real `rerank score` subprocesses, signalled mid-run and while the model loads. (Many devices, with
the work dir kept for resume: tests/engines/local/test_parallel.py.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

# Loaded at start-up by the subprocess (PYTHONPATH): weights load slowly, and say when they start.
SLOW_LOAD = '''
import os, time
import safetensors
_open = safetensors.safe_open
def _slow_open(*args, **kwargs):
    open(os.environ["RERANK_TEST_LOADING"], "w").close()
    time.sleep(120)
    return _open(*args, **kwargs)
safetensors.safe_open = _slow_open
'''


def _start(args: list[str], extra_path: str | None = None, env: dict | None = None) -> subprocess.Popen:
    path = os.pathsep.join(p for p in (extra_path, str(ROOT)) if p)
    full = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "rerank_cli", *args], stderr=subprocess.PIPE, env=full,
                            start_new_session=True)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1].decode()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    from rerank_cli.model.tiny import write_pairs

    return write_pairs(tmp_path_factory.mktemp("many") / "many.parquet", 3000, seed=1)


@pytest.mark.slow
def test_sigterm_mid_run_exits_143_with_one_line_and_no_output(ce_model, many, tmp_path):
    out = tmp_path / "out.parquet"
    proc = _start(["score", str(many), "-o", str(out), "-m", ce_model, "--batch-tokens", "64", "-q"])
    _wait_for(lambda: list(tmp_path.glob(".out.parquet.rerank-tmp-*")), proc)  # scoring, writing
    os.killpg(proc.pid, signal.SIGTERM)  # the whole process group, as a supervisor does
    os.killpg(proc.pid, signal.SIGTERM)  # a second one while it cleans up changes nothing
    err = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == 143, err
    assert err == "error: terminated by SIGTERM; no output written\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.slow
def test_sigterm_while_the_model_loads(ce_model, pairs_jsonl, tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_LOAD)
    loading = tmp_path / "loading"
    out = tmp_path / "run" / "out.jsonl"
    out.parent.mkdir()
    proc = _start(["score", str(pairs_jsonl), "-o", str(out), "-m", ce_model, "-q"], str(hooks),
                  {"RERANK_TEST_LOADING": str(loading)})
    _wait_for(loading.exists, proc)
    started = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    err = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == 143, err
    assert err == "error: terminated by SIGTERM; no output written\n"
    assert time.monotonic() - started < 30  # it did not wait for the load to finish
    assert list(out.parent.iterdir()) == []


def test_sigterm_handler_is_the_callers_again_after_a_command(cli, pairs_jsonl, tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    code, _, err = cli("score", str(pairs_jsonl), "-o", str(tmp_path / "o.jsonl"), "--query-col", "")
    assert code == 2 and err == "error: --query-col must name a column (got '')\n"
    assert signal.getsignal(signal.SIGTERM) is before
