"""Bad input: one line naming the file and line/row, exit status 2, no traceback, no output file."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_rerank

GOOD = {"query": "what is ka", "passage": "ka ri to"}


def _jsonl(path, rows):
    path.write_bytes(b"".join(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode() for r in rows))
    return path


def _assert_clean_failure(code, err, out_path, *needles):
    assert code == 2, err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err  # one error line, last; info lines may precede
    assert "Traceback" not in err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert not out_path.exists()
    assert not list(out_path.parent.glob(f".{out_path.name}.rerank-tmp-*"))


@pytest.mark.parametrize("rows, needles", [
    ([GOOD, b'{"query": "x", "passage": \n'], ["in.jsonl:2:", "malformed JSON"]),
    ([GOOD, GOOD, {"query": "x"}], ["in.jsonl:3:", "missing key 'passage'"]),
    ([GOOD, b'{"query": "\xff\xfe", "passage": "p"}\n'], ["in.jsonl:2:", "not UTF-8"]),
    ([GOOD, {"query": None, "passage": "p"}], ["in.jsonl:2:", "'query' is null"]),
    ([{"query": "q", "passage": 7}], ["in.jsonl:1:", "'passage' is int, not a string"]),
    ([GOOD, b"[1, 2]\n"], ["in.jsonl:2:", "expected a JSON object"]),
])
def test_bad_jsonl(cli, ce_model, tmp_path, rows, needles):
    src, out = _jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.parquet"
    _assert_clean_failure(*cli("score", str(src), "-o", str(out), "-m", ce_model)[::2], out, *needles)


def test_bad_row_late_in_a_big_file_leaves_no_output(cli, ce_model, tmp_path):
    rows = [GOOD] * 5000 + [{"query": "q", "passage": None}]
    src, out = _jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    _assert_clean_failure(*cli("score", str(src), "-o", str(out), "-m", ce_model, "--sort-window", "1000")[::2],
                          out, "in.jsonl:5001:", "'passage' is null")


def test_bad_csv(cli, ce_model, tmp_path):
    src, out = tmp_path / "in.csv", tmp_path / "out.csv"
    src.write_text("query,passage\nq1,p1\nq2\n")
    _assert_clean_failure(*cli("score", str(src), "-o", str(out), "-m", ce_model)[::2], out,
                          "in.csv:3:", "expected 2 fields, got 1")
    src.write_text("query,text\nq1,p1\n")
    _assert_clean_failure(*cli("score", str(src), "-o", str(out), "-m", ce_model)[::2], out,
                          "in.csv:1:", "missing column 'passage'")
    src.write_bytes(b"query,passage\nq1,p1\nq2,\xff\n")
    _assert_clean_failure(*cli("score", str(src), "-o", str(out), "-m", ce_model)[::2], out, "in.csv:", "UTF-8")


def test_bad_parquet(cli, ce_model, tmp_path):
    out = tmp_path / "out.parquet"
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"query": ["a", "b", None], "passage": ["x", "y", "z"]}), src)
    _assert_clean_failure(*cli("score", str(src), "-o", str(out), "-m", ce_model)[::2], out,
                          "in.parquet: row 3:", "'query' is null")
    pq.write_table(pa.table({"query": ["a"], "doc": ["x"]}), src)
    _assert_clean_failure(*cli("score", str(src), "-o", str(out), "-m", ce_model)[::2], out,
                          "in.parquet", "missing column 'passage'")
    pq.write_table(pa.table({"query": ["a"], "passage": [3]}), src)
    _assert_clean_failure(*cli("score", str(src), "-o", str(out), "-m", ce_model)[::2], out,
                          "'passage' holds int64, not strings")
    src.write_bytes(b"PAR1 this is not really parquet PAR1")
    _assert_clean_failure(*cli("score", str(src), "-o", str(out), "-m", ce_model)[::2], out,
                          "in.parquet", "not a readable Parquet file")


def test_missing_input_file(cli, ce_model, tmp_path):
    out = tmp_path / "o.jsonl"
    _assert_clean_failure(*cli("score", str(tmp_path / "nope.jsonl"), "-o", str(out), "-m", ce_model)[::2],
                          out, "nope.jsonl", "no such file")


def test_model_that_does_not_exist_or_is_not_a_reranker(cli, tmp_path, pairs_jsonl, ce_model):
    out = tmp_path / "o.jsonl"
    _assert_clean_failure(*cli("score", str(pairs_jsonl), "-o", str(out), "-m", str(tmp_path / "no-model"))[::2],
                          out, "no-model", "not found")
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "encoder")
    _assert_clean_failure(*cli("score", str(pairs_jsonl), "-o", str(out), "-m", str(tmp_path / "encoder"))[::2],
                          out, "not a reranker", "BertModel")
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    _assert_clean_failure(*cli("score", str(pairs_jsonl), "-o", str(out), "-m", str(empty))[::2], out,
                          "is not a model folder")


def test_unknown_output_format_and_output_equal_to_input(cli, ce_model, pairs_jsonl, tmp_path):
    out = tmp_path / "o.xlsx"
    _assert_clean_failure(*cli("score", str(pairs_jsonl), "-o", str(out), "-m", ce_model)[::2], out,
                          "output format")
    _assert_clean_failure(*cli("score", str(pairs_jsonl), "-o", str(out), "-m", ce_model,
                               "--output-format", "xlsx")[::2], out, "unknown output format 'xlsx'")
    before = pairs_jsonl.read_bytes()
    code, _, err = cli("score", str(pairs_jsonl), "-o", str(pairs_jsonl), "-m", ce_model, "--overwrite")
    assert code == 2 and "refusing to write over the input" in err
    assert pairs_jsonl.read_bytes() == before


def test_existing_output_is_not_overwritten_by_accident(cli, ce_model, pairs_jsonl, tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text("precious\n")
    code, _, err = cli("score", str(pairs_jsonl), "-o", str(out), "-m", ce_model)
    assert code == 2 and "already exists; pass --overwrite" in err
    assert out.read_text() == "precious\n"
    code, _, err = cli("score", str(pairs_jsonl), "-o", str(out), "-m", ce_model, "--overwrite")
    assert code == 0, err
    assert out.read_text().count("\n") == 120


def test_subprocess_exit_status_and_debug_traceback(ce_model, tmp_path):
    src = _jsonl(tmp_path / "in.jsonl", [GOOD, b"{oops\n"])
    proc = run_rerank("score", str(src), "-o", str(tmp_path / "o.jsonl"), "-m", ce_model)
    assert proc.returncode == 2
    assert proc.stderr.decode().startswith("error: ") and b"Traceback" not in proc.stderr
    proc = run_rerank("score", str(src), "-o", str(tmp_path / "o.jsonl"), "-m", ce_model,
                      env={"RERANK_DEBUG": "1"})
    assert proc.returncode != 0 and b"Traceback" in proc.stderr and b"InputError" in proc.stderr


def test_skip_bad_rows_into_a_rejects_file(cli, ce_model, tmp_path):
    rows = [GOOD, b"{oops\n", {"query": "q", "passage": None}, GOOD, {"query": "q2"}, GOOD]
    src, out = _jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    code, _, err = cli("score", str(src), "-o", str(out), "-m", ce_model, "--on-bad-row", "skip")
    assert code == 0, err
    assert len(out.read_text().splitlines()) == 3
    rejects = [json.loads(line) for line in (tmp_path / "out.jsonl.rejects.jsonl").read_text().splitlines()]
    assert [r["where"] for r in rejects] == ["line 2", "line 3", "line 5"]
    assert rejects[0]["raw"] == "{oops" and "malformed JSON" in rejects[0]["error"]
    assert "3 bad rows skipped" in err


def test_skip_bad_parquet_rows(cli, ce_model, tmp_path):
    src, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "query": ["a", None, "c", "d"],
                             "passage": ["x", "y", None, "w"]}), src)
    code, _, err = cli("score", str(src), "-o", str(out), "-m", ce_model, "--on-bad-row", "skip",
                       "--rejects", str(tmp_path / "bad.jsonl"))
    assert code == 0, err
    assert pq.read_table(out).column("id").to_pylist() == [1, 4]
    rejects = [json.loads(line) for line in (tmp_path / "bad.jsonl").read_text().splitlines()]
    assert [r["where"] for r in rejects] == ["row 2", "row 3"]
