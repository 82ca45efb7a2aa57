"""`--engine ray` end to end on a real local Ray cluster (CPU, no mocks).

One cluster per module (`ray start --head --block`, owned by the fixture and stopped by its pid), with
token authentication and credentials of its own: a token in a temporary folder handed to the head and
to each client through RAY_AUTH_TOKEN_PATH, and Ray's files in a temporary folder (nothing in ~/.ray
or /tmp/ray). Each test runs the real CLI as a subprocess that joins it through RAY_ADDRESS, like a
user on a cluster would. Two tests leave RAY_ADDRESS out, so the CLI starts (and stops) its own cluster.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rerank_cli import score_file
from tests.conftest import ROOT, run_rerank

pytest.importorskip("ray", reason="the Ray engine tests need the ray extra (make install)")
pytestmark = pytest.mark.slow

CLUSTER_CPUS = 3  # two scoring actors plus one CPU for Ray Data's read tasks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Cluster:
    address: str
    token: Path  # the file holding the cluster's authentication token


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    token = tmp_path_factory.mktemp("ray-auth") / "token"
    token.write_text(secrets.token_hex(32))
    port = _free_port()
    ray_cli = Path(sys.executable).with_name("ray")
    folder = tmp_path_factory.mktemp("ray")
    log = folder / "ray-start.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token),
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # stop at once at teardown
    with open(log, "wb") as out:
        head = subprocess.Popen(
            [str(ray_cli), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
             f"--num-cpus={CLUSTER_CPUS}", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
             f"--temp-dir={folder / 't'}"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        _wait_for_head(log, head)
        yield Cluster(address, token)
    finally:
        head.terminate()
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()


def _wait_for_head(log: Path, head: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "Ray runtime started" in log.read_text(errors="replace"):
            return
        if head.poll() is not None:
            break
        time.sleep(0.5)
    raise RuntimeError(f"ray start --head did not come up:\n{log.read_text(errors='replace')[-3000:]}")


def ray_score(cluster: Cluster | None, *args: str, env: dict | None = None,
              timeout: float = 180) -> subprocess.CompletedProcess:
    """`rerank score ARGS --engine ray` joining `cluster` with its token (RAY_AUTH_MODE=token and
    RAY_AUTH_TOKEN_PATH, as the README says), or on a cluster of its own when `cluster` is None."""
    extra = {"RAY_ADDRESS": ""}
    if cluster is not None:
        extra = {"RAY_ADDRESS": cluster.address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(cluster.token)}
    return run_rerank("score", *args, "--engine", "ray", env={**extra, **(env or {})}, timeout=timeout)


@pytest.fixture(scope="module")
def local_engine(tmp_path_factory, pairs_parquet, ce_model):
    """The local engine's output for pairs_parquet with a given --sort-window (windows decide batches,
    and batches decide padding: the same windows give the same fp32 scores)."""
    cache: dict[int, pa.Table] = {}

    def run(window: int = 4096) -> pa.Table:
        if window not in cache:
            out = tmp_path_factory.mktemp("local") / "local.parquet"
            score_file(str(pairs_parquet), str(out), model=ce_model, dtype="fp32", sort_window=window)
            cache[window] = pq.read_table(out)
        return cache[window]

    return run


def assert_same_scores(got: pa.Table, want: pa.Table) -> None:
    assert got.schema.names == want.schema.names
    assert got.schema.field("score").type == pa.float32()
    assert got.drop_columns(["score"]).equals(want.drop_columns(["score"]))  # every column, in order
    # Same batches, but an actor may run another thread count than the local engine, and oneDNN's
    # reductions then sum in another order: equal to the project's fp32 tolerance, not to the bit.
    np.testing.assert_allclose(got["score"].to_numpy(), want["score"].to_numpy(), rtol=0, atol=1e-5)


def test_parquet_matches_local_engine(ray_cluster, pairs_parquet, ce_model, local_engine, tmp_path):
    local_parquet = local_engine(32)
    out = tmp_path / "out.parquet"
    proc = ray_score(ray_cluster, str(pairs_parquet), "-o", str(out), "-m", ce_model, "--dtype", "fp32",
                     "--sort-window", "32", "--ray-workers", "2")
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert f"connected to Ray at {ray_cluster.address}" in err
    assert "2 CPU scoring actor(s)" in err
    assert "cpu: cross-encoder in fp32" in err
    assert f"scored {local_parquet.num_rows} pairs" in err and "ray:2xcpu, fp32" in err
    assert_same_scores(pq.read_table(out), local_parquet)


def test_jsonl_on_its_own_local_cluster(pairs_jsonl, ce_model, local_engine, tmp_path):
    # Default settings, as in "rerank score small.jsonl -o out.jsonl --engine ray --dtype fp32", by a
    # user with an empty home: nothing set up beforehand, and nothing left in ~ (no ~/.ray/auth_token).
    local_parquet = local_engine()
    out = tmp_path / "out.jsonl"
    home = tmp_path / "home"
    home.mkdir()
    proc = ray_score(None, str(pairs_jsonl), "-o", str(out), "-m", ce_model, "--dtype", "fp32",
                     env={"HOME": str(home)})
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "started a local Ray cluster" in err
    assert not list(home.iterdir())
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert_same_scores(pa.Table.from_pylist(rows).cast(local_parquet.schema), local_parquet)


def test_killed_actor_is_restarted_and_every_row_comes_once(ray_cluster, pairs_parquet, ce_model, local_engine):
    local_parquet = local_engine(20)
    # -o -: Ray's "worker died" console message must not land in our data on stdout.
    proc = ray_score(ray_cluster, str(pairs_parquet), "-o", "-", "-m", ce_model, "--dtype", "fp32",
                     "--sort-window", "20", "--ray-workers", "2", env={"RERANK_FAULT_RAY_KILL": "1"})
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "1 scoring actor restart(s)" in err
    rows = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert [r["pid"] for r in rows] == local_parquet["pid"].to_pylist()  # each row once, in order
    assert_same_scores(pa.Table.from_pylist(rows).cast(local_parquet.schema), local_parquet)


def test_scoring_error_is_the_local_one_line_error(ray_cluster, pairs_parquet, ce_model, tmp_path):
    # Every batch "runs out of memory", so the back-off ends at one pair that cannot fit: a
    # PairTooLargeError raised inside the actor, which must reach the user as one clean line.
    out = tmp_path / "out.parquet"
    proc = ray_score(ray_cluster, str(pairs_parquet), "-o", str(out), "-m", ce_model,
                     env={"RERANK_FAULT_OOM_TOKENS": "1"})
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: row ") and "does not fit in memory on cpu even alone" in last
    assert "Traceback" not in err and "RayTaskError" not in err
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def holey_parquet(tmp_path_factory, pairs_parquet) -> Path:
    table = pq.read_table(pairs_parquet)
    passages = table["passage"].to_pylist()
    passages[49] = passages[100] = None
    path = tmp_path_factory.mktemp("holey") / "holey.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("passage"), "passage",
                                    pa.array(passages, pa.string())), path)
    return path


def test_null_passage_is_named_by_row_like_local(ray_cluster, holey_parquet, ce_model, tmp_path):
    # --sort-window 16: the pre-check before Ray starts reads only the first window, so rows 50 and
    # 101 reach the actors, and the driver numbers them as the windows come back.
    out = tmp_path / "out.parquet"
    proc = ray_score(ray_cluster, str(holey_parquet), "-o", str(out), "-m", ce_model, "--sort-window", "16")
    assert proc.returncode == 2
    assert proc.stderr.decode().strip().splitlines()[-1] == f"error: {holey_parquet}: row 50: 'passage' is null"
    assert not out.exists()

    proc = ray_score(ray_cluster, str(holey_parquet), "-o", str(out), "-m", ce_model, "--sort-window", "16",
                     "--on-bad-row", "skip", "--dtype", "fp32")
    assert proc.returncode == 0, proc.stderr.decode()
    rejects = [json.loads(line) for line in Path(f"{out}.rejects.jsonl").read_text().splitlines()]
    assert [r["where"] for r in rejects] == ["row 50", "row 101"]
    assert pq.read_table(out).num_rows == 118


def test_output_dir_parts_sort_in_input_order(ray_cluster, pairs_parquet, ce_model, local_engine, tmp_path):
    local_parquet = local_engine(40)
    out = tmp_path / "scored"
    proc = ray_score(ray_cluster, str(pairs_parquet), "--output-dir", str(out), "-m", ce_model,
                     "--dtype", "fp32", "--sort-window", "40", "--ray-workers", "2")
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert f"scored {local_parquet.num_rows} pairs" in err
    parts = sorted(out.glob("*.parquet"))
    assert len(parts) >= 2
    assert_same_scores(pa.concat_tables(pq.read_table(p) for p in parts), local_parquet)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


@pytest.mark.parametrize("mode", [None, "token"])
def test_joining_without_the_token_is_one_line_naming_the_fix(ray_cluster, pairs_parquet, ce_model, tmp_path, mode):
    # Without RAY_AUTH_MODE the client tries without a token and the cluster refuses it (Ray retries for
    # about 20 s); with RAY_AUTH_MODE=token and no token anywhere, Ray refuses before trying.
    home = tmp_path / "home"
    home.mkdir()  # no ~/.ray/auth_token
    env = {"RAY_ADDRESS": ray_cluster.address, "HOME": str(home), **({"RAY_AUTH_MODE": mode} if mode else {})}
    out = tmp_path / "out.parquet"
    proc = run_rerank("score", str(pairs_parquet), "-o", str(out), "-m", ce_model, "--engine", "ray", env=env,
                      timeout=180)
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert err.strip().splitlines() == [err.strip()], err  # one line, nothing else
    assert err.startswith(f"error: the Ray cluster at '{ray_cluster.address}' uses token authentication and "
                          "refused this client")
    assert err.strip().endswith(": set RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN, or the path "
                                "of a file holding it in RAY_AUTH_TOKEN_PATH (`ray get-auth-token` on the head "
                                "node prints it)")
    assert not out.exists() and not list(home.iterdir())


def test_window_mode_matches_local_with_bad_rows_skipped(ray_cluster, holey_parquet, ce_model, tmp_path):
    # Long passages in windows: Ray's actors flatten and aggregate them exactly as the local engine does,
    # the `windows` column comes back null-free for scored rows, and the actors' counters reach the summary.
    window = ["--long-passages", "window", "--max-length", "128", "--max-windows", "4", "--sort-window", "16",
              "--on-bad-row", "skip", "--dtype", "fp32"]
    local_out = tmp_path / "local.parquet"
    local = score_file(str(holey_parquet), str(local_out), model=ce_model, dtype="fp32", sort_window=16,
                       long_passages="window", max_length=128, max_windows=4, on_bad_row="skip",
                       rejects=str(tmp_path / "local-rejects.jsonl"))
    out = tmp_path / "out.parquet"
    proc = ray_score(ray_cluster, str(holey_parquet), "-o", str(out), "-m", ce_model, "--ray-workers", "2", *window)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    got, want = pq.read_table(out), pq.read_table(local_out)
    assert got.schema.names == want.schema.names and got.schema.names[-2:] == ["score", "windows"]
    assert got["windows"].to_pylist() == want["windows"].to_pylist() and got["windows"].null_count == 0
    assert_same_scores(got.drop_columns(["windows"]), want.drop_columns(["windows"]))
    assert local.split > 0 and local.truncated > 0
    assert local.truncation_text() in err.strip().splitlines()[-1]
    assert [json.loads(line)["where"] for line in Path(f"{out}.rejects.jsonl").read_text().splitlines()] == \
        ["row 50", "row 101"]
