"""`rerank score --top-k`, `rerank rank` and `rerank eval` through the real CLI, with the tiny cross-encoder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rerank_cli.cli import main
from tests.conftest import ROOT


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run `rerank ARGS` in this process; (exit status, stdout, stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def expected_ranking(rows: list[dict], k: int | None) -> list[tuple[str, int, str]]:
    """(qid, rank, pid): per query in first-appearance order, score descending, input order on ties."""
    groups: dict[str, list] = {}
    for seq, row in enumerate(rows):
        groups.setdefault(row["qid"], []).append((-row["score"], seq, row["pid"]))
    return [(q, rank, pid) for q, members in groups.items()
            for rank, (_, _, pid) in enumerate(sorted(members)[:k], 1)]


OPTS = ("--sort-window", "32", "--batch-size", "8")  # several chunks; the same batches in every run


@pytest.fixture(scope="module")
def scored(tmp_path_factory, pairs_parquet, ce_model):
    """A shuffled pair file (queries not contiguous), its qrels, and it scored in full (all rows, input order)."""
    import random

    import pyarrow.parquet as pq

    from rerank_cli.model.tiny import write_qrels

    d = tmp_path_factory.mktemp("scored")
    rows = pq.read_table(pairs_parquet).to_pylist()
    random.Random(7).shuffle(rows)
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_qrels(d / "qrels.trec", pairs_parquet)
    main(["score", str(d / "pairs.jsonl"), "-o", str(d / "scored.jsonl"), "-m", ce_model, "-q", *OPTS])
    return d


def test_score_top_k_keeps_the_k_best_per_query(capsys, scored, ce_model, tmp_path):
    full = read_jsonl(scored / "scored.jsonl")
    out = tmp_path / "top.jsonl"
    code, _, err = cli(capsys, "score", str(scored / "pairs.jsonl"), "-o", str(out), "-m", ce_model,
                       "--top-k", "3", *OPTS)
    assert code == 0, err
    top = read_jsonl(out)
    assert [(r["qid"], r["rank"], r["pid"]) for r in top] == expected_ranking(full, 3)
    by_pid = {r["pid"]: r for r in full}
    assert all({k: v for k, v in r.items() if k != "rank"} == by_pid[r["pid"]] for r in top)
    assert len(top) == 3 * len({r["qid"] for r in full})


def test_score_to_a_trec_run_ranks_every_row(capsys, scored, ce_model, tmp_path):
    import ir_measures

    run = tmp_path / "run.trec"
    code, _, err = cli(capsys, "score", str(scored / "pairs.jsonl"), "-o", str(run), "-m", ce_model,
                       "--run-tag", "tiny", *OPTS)
    assert code == 0, err
    parsed = list(ir_measures.read_trec_run(str(run)))
    lines = [line.split() for line in run.read_text().splitlines()]
    assert [(f[0], int(f[3]), f[2]) for f in lines] == expected_ranking(read_jsonl(scored / "scored.jsonl"), None)
    assert {f[5] for f in lines} == {"tiny"} and len(parsed) == len(lines) == 120


def test_rank_command_on_a_scored_file(capsys, scored, tmp_path):
    out = tmp_path / "top2.parquet"
    code, _, err = cli(capsys, "rank", str(scored / "scored.jsonl"), "-o", str(out), "--top-k", "2")
    assert code == 0, err
    assert "ranked 120 rows in 6 groups (kept the top 2 of each: 12 rows)" in err
    import pyarrow.parquet as pq

    rows = pq.read_table(out).to_pylist()
    assert [(r["qid"], r["rank"], r["pid"]) for r in rows] == expected_ranking(read_jsonl(scored / "scored.jsonl"), 2)
    code, _, err = cli(capsys, "rank", str(scored / "scored.jsonl"), "-o", str(out), "--top-k", "2")
    assert code == 2 and "already exists; pass --overwrite" in err


def test_pipeline_score_rank_eval_over_stdin_and_stdout(scored, ce_model, tmp_path):
    """`rerank score - -o - | rerank rank - -o - --top-k 2`, and a TREC run piped into `rerank eval -`."""
    rerank = f"{sys.executable} -m rerank_cli"
    qrels = scored / "qrels.trec"
    opts = " ".join(OPTS)
    script = (f"set -euo pipefail; {rerank} score - -o - -m {ce_model} -q {opts} < {scored / 'pairs.jsonl'} "
              f"| tee scored.jsonl "
              f"| {rerank} rank - -o - --top-k 2 -q > top2.jsonl; "
              f"{rerank} rank - -o - --output-format trec -q < scored.jsonl "
              f"| {rerank} eval - --input-format trec --qrels {qrels} --json > eval.json")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, timeout=240)
    assert done.returncode == 0, done.stderr.decode()
    full = read_jsonl(tmp_path / "scored.jsonl")
    top2 = read_jsonl(tmp_path / "top2.jsonl")
    assert [(r["qid"], r["rank"], r["pid"]) for r in top2] == expected_ranking(full, 2)
    piped = json.loads((tmp_path / "eval.json").read_text())
    from rerank_cli.rank.evaluation import evaluate_files

    direct = evaluate_files(str(tmp_path / "scored.jsonl"), str(qrels))
    assert piped["queries"] == len(direct.queries)
    for label, value in direct.mean(direct.run).items():  # no ties among model scores: same ranking
        assert abs(piped["metrics"]["run"][label] - value) < 1e-9


def test_eval_prints_a_table_with_the_input_order_baseline(capsys, scored):
    code, out, err = cli(capsys, "eval", str(scored / "scored.jsonl"), "--qrels", str(scored / "qrels.trec"),
                         "--baseline-input-order")
    assert code == 0, err
    for text in ("nDCG@10", "MRR@10", "MAP", "Recall@10", "Recall@100", "baseline", "diff", "(input order)"):
        assert text in out
    code, out, _ = cli(capsys, "eval", str(scored / "scored.jsonl"), "--qrels", str(scored / "qrels.trec"),
                       "--baseline-input-order", "--json", "--per-query")
    data = json.loads(out)
    assert set(data["metrics"]) == {"run", "baseline", "diff"}
    assert len(data["per_query"]) == data["queries"] > 0
    diff = data["metrics"]["diff"]["nDCG@10"]
    assert abs(diff - (data["metrics"]["run"]["nDCG@10"] - data["metrics"]["baseline"]["nDCG@10"])) < 1e-12
    code, out, _ = cli(capsys, "eval", str(scored / "scored.jsonl"), "--qrels", str(scored / "qrels.trec"),
                       "--per-query")
    assert "queries:" in out and "\n q0 " in out and out.count("nDCG@10") == 2


def test_user_errors_are_one_line_and_leave_no_output(capsys, scored, tmp_path):
    out = tmp_path / "run.trec"
    code, _, err = cli(capsys, "rank", str(scored / "scored.jsonl"), "-o", str(out), "--doc-col", "docno")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "--doc-col" in err
    # Checked before the model loads: the model path does not even exist.
    code, _, err = cli(capsys, "score", str(scored / "pairs.jsonl"), "-o", str(out), "-m", str(tmp_path / "no-model"),
                       "--doc-col", "docno")
    assert code == 2 and "no column 'docno'" in err
    code, _, err = cli(capsys, "eval", str(scored / "scored.jsonl"), "--qrels", str(tmp_path / "missing.trec"))
    assert code == 2 and "missing.trec: no such file" in err
    code, _, err = cli(capsys, "rank", str(scored / "scored.jsonl"), "-o", str(out), "--score-col", "nope")
    assert code == 2 and "no score column 'nope'" in err
    assert list(tmp_path.iterdir()) == []


def test_help_lists_rank_and_eval(capsys):
    code, out, _ = cli(capsys, "--help")
    assert code == 0 and "rank" in out and "eval" in out
