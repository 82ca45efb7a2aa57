"""`rerank score` end to end through the real CLI: formats, columns, order, pipelines, presets."""

from __future__ import annotations

import json
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rerank_cli import Reranker
from tests.conftest import run_rerank


@pytest.fixture(scope="module")
def reference_scores(ce_model, pairs_parquet):
    t = pq.read_table(pairs_parquet).to_pydict()
    return np.array(Reranker(ce_model, "cpu", dtype="fp32").score(list(zip(t["query"], t["passage"]))))


def test_parquet_to_parquet_keeps_columns_and_order(cli, ce_model, pairs_parquet, tmp_path, reference_scores):
    out = tmp_path / "out.parquet"
    code, _, err = cli("score", str(pairs_parquet), "-o", str(out), "-m", ce_model, "--batch-tokens", "2000")
    assert code == 0, err
    src, got = pq.read_table(pairs_parquet), pq.read_table(out)
    assert got.column_names == src.column_names + ["score"]
    assert got.drop_columns(["score"]).equals(src)
    assert got.schema.field("score").type == pa.float32()
    np.testing.assert_allclose(got.column("score").to_numpy(), reference_scores, atol=1e-5)
    assert "scored 120 pairs" in err and "pairs/s" in err and "cpu, fp32" in err
    assert "fp32 (cpu:" in err  # the precision choice is explained


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv"])
def test_row_formats_round_trip(cli, ce_model, pairs_parquet, tmp_path, reference_scores, fmt):
    rows = pq.read_table(pairs_parquet).to_pylist()
    src = tmp_path / f"in.{fmt}"
    if fmt == "jsonl":
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import csv

        with open(src, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter="\t" if fmt == "tsv" else ",")
            w.writeheader()
            w.writerows({**r, "qid": "00" + r["qid"]} for r in rows)
    out = tmp_path / f"out.{fmt}"
    code, _, err = cli("score", str(src), "-o", str(out), "-m", ce_model)
    assert code == 0, err
    if fmt == "jsonl":
        got = [json.loads(line) for line in out.read_text().splitlines()]
        assert [{k: v for k, v in g.items() if k != "score"} for g in got] == rows
        scores = [g["score"] for g in got]
    else:
        import csv

        with open(out, newline="") as fh:
            got = list(csv.DictReader(fh, delimiter="\t" if fmt == "tsv" else ","))
        assert [g["qid"] for g in got] == ["00" + r["qid"] for r in rows]  # strings stay strings
        assert [g["passage"] for g in got] == [r["passage"] for r in rows]
        scores = [float(g["score"]) for g in got]
    np.testing.assert_allclose(scores, reference_scores, atol=1e-5)


def test_stdin_to_stdout_pipeline(ce_model, pairs_jsonl, reference_scores):
    proc = run_rerank("score", "-", "-o", "-", "-m", ce_model, "-q", input=pairs_jsonl.read_bytes())
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr == b""  # --quiet
    rows = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert [r["pid"] for r in rows] == [json.loads(line)["pid"] for line in pairs_jsonl.read_text().splitlines()]
    np.testing.assert_allclose([r["score"] for r in rows], reference_scores, atol=1e-5)


def test_shell_pipeline_with_cat_and_a_consumer(ce_model, pairs_jsonl):
    import subprocess

    cmd = (f"cat {pairs_jsonl} | {sys.executable} -m rerank_cli score - -o - -m {ce_model} -q "
           f"| {sys.executable} -c \"import sys, json; print(sum(1 for l in sys.stdin if 'score' in json.loads(l)))\"")
    from tests.conftest import ROOT

    out = subprocess.run(cmd, shell=True, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT),
                         "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=240)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "120"


def test_custom_columns_and_score_name(cli, ce_model, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"q": f"question {i}", "doc": "ka ri " * i, "n": i}) + "\n" for i in range(7)))
    out = tmp_path / "out.jsonl"
    code, _, err = cli("score", str(src), "-o", str(out), "-m", ce_model, "--query-col", "q",
                       "--passage-col", "doc", "--score-col", "relevance")
    assert code == 0, err
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["n"] for g in got] == list(range(7))
    assert all(isinstance(g["relevance"], float) for g in got)


def test_input_format_override_and_gzip(cli, ce_model, pairs_jsonl, tmp_path):
    import gzip

    src = tmp_path / "pairs.data.gz"
    src.write_bytes(gzip.compress(pairs_jsonl.read_bytes()))
    out = tmp_path / "o.parquet"
    code, _, err = cli("score", str(src), "--input-format", "jsonl", "-o", str(out), "-m", ce_model)
    assert code == 0, err
    assert pq.read_table(out).num_rows == 120


def test_preset_and_flags_override(cli, ce_model, pairs_parquet, tmp_path, monkeypatch):
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "mine.toml").write_text(f'model = "{ce_model}"\nnormalize = true\nmax_length = 128\n')
    monkeypatch.setenv("RERANK_CONFIG_DIR", str(tmp_path / "cfgs"))
    out = tmp_path / "o.parquet"
    code, _, err = cli("score", str(pairs_parquet), "-o", str(out), "--preset", "mine")
    assert code == 0, err
    s = pq.read_table(out).column("score").to_numpy()
    assert ((s > 0) & (s < 1)).all()  # normalize from the preset
    code, _, err = cli("score", str(pairs_parquet), "-o", str(out), "--preset", "mine", "--no-normalize",
                       "--overwrite")
    assert code == 0, err
    assert (pq.read_table(out).column("score").to_numpy() < 0).any()


def test_config_errors_are_reported_together(cli, ce_model, pairs_parquet, tmp_path):
    code, _, err = cli("score", str(pairs_parquet), "-o", str(tmp_path / "o.jsonl"), "-m", ce_model,
                       "--dtype", "fp8", "--kind", "bi-encoder", "--batch-size", "0")
    assert code == 2
    assert err.count("\n") == 1 and "--dtype" in err and "--kind" in err and "--batch-size" in err


def test_help_does_not_import_torch():
    import subprocess

    code = ("import sys; from rerank_cli.cli import app, main; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True)
    proc = run_rerank("score", "--help")
    assert proc.returncode == 0 and b"--batch-tokens" in proc.stdout


def test_python_api_score_file(ce_model, pairs_parquet, tmp_path, reference_scores):
    from rerank_cli import score_file

    summary = score_file(str(pairs_parquet), str(tmp_path / "api.parquet"), model=ce_model, dtype="fp32")
    assert summary.pairs == 120 and summary.devices == ["cpu"]
    got = pq.read_table(tmp_path / "api.parquet").column("score").to_numpy()
    np.testing.assert_allclose(got, reference_scores, atol=1e-5)


def test_ctrl_c_exits_130_and_leaves_no_output(ce_model, tmp_path):
    import os
    import signal
    import subprocess
    import time

    from rerank_cli.model.tiny import write_pairs
    from tests.conftest import ROOT

    src = write_pairs(tmp_path / "many.parquet", 3000, seed=1)
    out = tmp_path / "out.parquet"
    proc = subprocess.Popen([sys.executable, "-m", "rerank_cli", "score", str(src), "-o", str(out), "-m", ce_model,
                             "--batch-tokens", "64"], stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".out.parquet.rerank-tmp-*")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("error: interrupted") and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".out.parquet*"))
