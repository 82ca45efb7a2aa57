"""`--long-passages window` through the real CLI: columns, order, counts, every local engine path.

The reference is the `Reranker` pair by pair (tests/model/test_windows.py checks it against
independent references); here every engine must reproduce it: inline, `--devices cpu,cpu`, the
resumable shard loop, `--top-k`, `--on-bad-row skip`. Truncation counts are checked against the
tokenizer's own counts.
"""

from __future__ import annotations

import glob
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rerank_cli import Reranker
from rerank_cli.config import build_config
from rerank_cli.engines.local.plan import make_plan
from rerank_cli.engines.local.workdir import fingerprint
from rerank_cli.errors import Interrupted
from rerank_cli.pipeline import run
from rerank_cli.progress import Reporter

ML = 128
WINDOW = ["--long-passages", "window", "--max-length", str(ML), "--max-windows", "6"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> str:
    from rerank_cli.model.tiny import write_pairs

    return str(write_pairs(tmp_path_factory.mktemp("win") / "pairs.jsonl", 48, seed=8))


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture(scope="module")
def expected(pairs, ce_model):
    """The Reranker's window scores and counts for every row, and its counters."""
    rows = read_rows(pairs)
    r = Reranker(ce_model, "cpu", dtype="fp32", max_length=ML, long_passages="window", max_windows=6)
    scored = r.score_chunk([x["query"] for x in rows], [x["passage"] for x in rows])
    assert r.stats.split > 10 and r.stats.capped > 0  # the file exercises windows and the cap
    return rows, scored, r.stats


def summary_of(err: str) -> str:
    return [line for line in err.splitlines() if "scored " in line][-1]


def test_window_mode_keeps_every_row_and_column_and_adds_windows(cli, ce_model, pairs, expected, tmp_path):
    rows, scored, stats = expected
    out = tmp_path / "out.parquet"
    code, _, err = cli("score", pairs, "-o", str(out), "-m", ce_model, "--dtype", "fp32", *WINDOW)
    assert code == 0, err
    table = pq.read_table(out)
    assert table.schema.names == [*rows[0], "score", "windows"]
    assert table.schema.field("windows").type == pa.int32()
    assert table.drop_columns(["score", "windows"]).to_pylist() == rows  # every column, every row, in order
    assert table["windows"].to_pylist() == scored.windows.tolist()
    np.testing.assert_allclose(table["score"].to_numpy(), scored.scores, atol=1e-5, rtol=0)
    line = summary_of(err)
    assert f"; {stats.split} long passages scored in {stats.split_windows} windows" in line
    assert (f"; {stats.truncated} pairs still truncated at {ML} tokens ({stats.capped} passages past "
            f"--max-windows 6") in line


def _truncated_by_the_tokenizer(model: str, rows: list[dict]) -> tuple[int, int]:
    """Pairs FlagReranker's rules cut (query past 3/4 of max length, or passage past the room)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    cut = queries = 0
    for row in rows:
        q = len(tok(row["query"], add_special_tokens=False)["input_ids"])
        p = len(tok(row["passage"], add_special_tokens=False)["input_ids"])
        room = ML - min(q, ML * 3 // 4) - tok.num_special_tokens_to_add(pair=True)
        cut += q > ML * 3 // 4 or p > room
        queries += q > ML * 3 // 4
    return cut, queries


def test_truncate_mode_says_how_many_pairs_it_cut(cli, ce_model, pairs, tmp_path):
    rows = read_rows(pairs)
    cut, queries = _truncated_by_the_tokenizer(ce_model, rows)
    assert cut > 10
    out = tmp_path / "out.jsonl"
    code, _, err = cli("score", pairs, "-o", str(out), "-m", ce_model, "--max-length", str(ML))
    assert code == 0, err
    why = "--long-passages window scores them whole" if not queries else \
        f"{queries} with the query cut; --long-passages window scores long passages whole"
    assert summary_of(err).endswith(f"; {cut} pairs truncated at {ML} tokens ({why})")
    assert "windows" not in read_rows(out)[0]  # truncate mode: today's columns


def test_no_truncation_no_word_about_it(cli, ce_model, tmp_path):
    src = tmp_path / "short.jsonl"
    src.write_text('{"query": "ka", "passage": "ri to"}\n')
    code, _, err = cli("score", str(src), "-o", str(tmp_path / "o.jsonl"), "-m", ce_model)
    assert code == 0 and "truncated" not in err and "windows" not in err


def test_two_workers_in_window_mode_score_like_one(cli, ce_model, pairs, expected, tmp_path):
    rows, scored, stats = expected
    out = tmp_path / "out.jsonl"
    code, _, err = cli("score", pairs, "-o", str(out), "-m", ce_model, "--dtype", "fp32", *WINDOW,
                       "--devices", "cpu,cpu", "--shard-rows", "10")
    assert code == 0, err
    got = read_rows(out)
    assert [r["pid"] for r in got] == [r["pid"] for r in rows]
    assert [r["windows"] for r in got] == scored.windows.tolist()
    np.testing.assert_allclose([r["score"] for r in got], scored.scores, atol=1e-5, rtol=0)
    line = summary_of(err)  # the workers' counters reach the parent's summary
    assert f"; {stats.split} long passages scored in {stats.split_windows} windows" in line
    assert f"; {stats.truncated} pairs still truncated" in line


def test_top_k_in_window_mode_ranks_the_aggregated_scores(cli, ce_model, pairs, expected, tmp_path):
    rows, scored, _ = expected
    out = tmp_path / "top.jsonl"
    code, _, err = cli("score", pairs, "-o", str(out), "-m", ce_model, "--dtype", "fp32", *WINDOW, "--top-k", "2")
    assert code == 0, err
    got = read_rows(out)
    by_pid = {r["pid"]: (s, w) for r, s, w in zip(rows, scored.scores.tolist(), scored.windows.tolist())}
    assert all(r["windows"] == by_pid[r["pid"]][1] for r in got)
    for qid in {r["qid"] for r in rows}:
        want = sorted((p for p, r in zip(by_pid, rows) if r["qid"] == qid), key=lambda p: -by_pid[p][0])[:2]
        assert [r["pid"] for r in got if r["qid"] == qid] == want


def test_bad_rows_are_skipped_in_window_mode(cli, ce_model, pairs, expected, tmp_path):
    rows, scored, _ = expected
    src = tmp_path / "bad.jsonl"
    broken = [dict(r) for r in rows]
    broken[4]["passage"] = None
    src.write_text("".join(json.dumps(r) + "\n" for r in broken))
    out = tmp_path / "out.jsonl"
    code, _, err = cli("score", str(src), "-o", str(out), "-m", ce_model, "--dtype", "fp32", *WINDOW,
                       "--on-bad-row", "skip")
    assert code == 0, err
    got = read_rows(out)
    assert [r["pid"] for r in got] == [r["pid"] for i, r in enumerate(rows) if i != 4]
    assert [r["windows"] for r in got] == [w for i, w in enumerate(scored.windows.tolist()) if i != 4]
    assert len((tmp_path / "out.jsonl.rejects.jsonl").read_text().splitlines()) == 1


def test_window_mode_resumes_and_a_changed_setting_starts_fresh(pairs, ce_model, expected, tmp_path,
                                                                interrupt_shards):
    rows, scored, _ = expected
    out, work = tmp_path / "out.jsonl", tmp_path / "work"
    cfg = build_config({"input": pairs, "output": str(out), "model": ce_model, "dtype": "fp32", "max_length": ML,
                        "long_passages": "window", "max_windows": 6, "shard_rows": 20, "work_dir": str(work),
                        "overwrite": True})

    def interrupted(config) -> None:
        interrupt_shards.arm(on_call=3)
        with pytest.raises(Interrupted):
            run(config, Reporter(quiet=True))
        interrupt_shards.disarm()
        assert len(glob.glob(str(work / "*.done"))) == 2

    interrupted(cfg)
    log = io.StringIO()
    summary = run(cfg, Reporter(stream=log, force_plain=True))
    assert "resuming: 2 shards already done" in log.getvalue()
    assert summary.pairs == len(rows) - 40
    got = read_rows(out)
    assert [r["windows"] for r in got] == scored.windows.tolist()
    np.testing.assert_allclose([r["score"] for r in got], scored.scores, atol=1e-5, rtol=0)
    interrupted(cfg)
    log = io.StringIO()
    run(cfg.replace(max_windows=3), Reporter(stream=log, force_plain=True))
    assert "starting fresh" in log.getvalue()
    assert "--long-passages, --window-stride, --aggregate or --max-windows changed" in log.getvalue()
    assert max(r["windows"] for r in read_rows(out)) == 3


def test_fingerprint_has_window_settings_and_truncation_keeps_old_work_dirs(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("{}\n")
    cfg = build_config({"input": str(src), "output": "o.jsonl", "model": "m", "devices": "cpu,cpu"})
    plan = make_plan(cfg, ["cpu", "cpu"], cpu_count=2)
    assert fingerprint(cfg, plan)["long_passages"] is None  # as in manifests written before window mode
    win = cfg.replace(long_passages="window")
    assert fingerprint(win, plan)["long_passages"] == {"mode": "window", "window_stride": None, "aggregate": "max",
                                                       "max_windows": 32}
    for change in ({"aggregate": "mean"}, {"window_stride": 7}, {"max_windows": 4}):
        assert fingerprint(win.replace(**change), plan) != fingerprint(win, plan)


def test_window_settings_without_window_mode_are_errors_reported_together(cli, ce_model, pairs, tmp_path):
    code, _, err = cli("score", pairs, "-o", str(tmp_path / "o.jsonl"), "-m", ce_model, "--aggregate", "median",
                       "--window-stride", "0", "--max-windows", "2")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ")
    for part in ("--window-stride works with --long-passages window", "--aggregate works with --long-passages window",
                 "--max-windows works with --long-passages window", "--aggregate must be one of max, first, mean, sum",
                 "--window-stride must be a whole number of at least 1 (got 0)"):
        assert part in err
    code, _, err = cli("score", pairs, "-o", str(tmp_path / "o.jsonl"), "-m", ce_model, "--long-passages", "split")
    assert code == 2 and "--long-passages must be one of truncate, window (got 'split')" in err


def test_an_input_windows_column_is_an_error_in_window_mode(cli, ce_model, tmp_path):
    src = tmp_path / "w.jsonl"
    src.write_text('{"query": "ka", "passage": "ri", "windows": 3}\n')
    out = tmp_path / "o.jsonl"
    code, _, err = cli("score", str(src), "-o", str(out), "-m", ce_model, "--long-passages", "window")
    assert code == 2 and not out.exists()
    assert err == (f"error: {src} already has a column 'windows', which --long-passages window adds; "
                   "rename that column\n")
    code, _, err = cli("score", str(src), "-o", str(out), "-m", ce_model)  # truncate mode adds no such column
    assert code == 0, err
