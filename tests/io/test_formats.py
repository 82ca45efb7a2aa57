"""Hostile and careless input files, and output formats: each ends in a correct result, or exit 2 with
one line naming the file and line/row, no traceback and nothing left behind."""

from __future__ import annotations

import bz2
import gzip
import json
import os
import subprocess
import sys
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.cli.test_bad_input import GOOD, _assert_clean_failure, _jsonl
from tests.conftest import ROOT


def _score(cli, ce_model, src, out, *flags):
    return cli("score", str(src), "-o", str(out), "-m", ce_model, "-q", *flags)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_csv_quote_that_never_closes_names_the_line_it_opened(cli, ce_model, tmp_path):
    src, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    src.write_text('query,passage\nq1,p1\nq2,"p2 and\nq3,p3\nq4,p4\n')
    code, _, err = _score(cli, ce_model, src, out)
    assert (code, err) == (2, f"error: {src}:3: a quoted field opens here and never closes\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]


def test_csv_quote_across_too_many_lines_is_an_error_fewer_is_a_passage(cli, ce_model, tmp_path, monkeypatch):
    monkeypatch.setattr("rerank_cli.io.readers.MAX_RECORD_LINES", 5)
    src, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    src.write_text('query,passage\nq1,"two\nlines"\nq2,"' + "\n" * 8 + 'closes late"\nq3,p3\n')
    code, _, err = _score(cli, ce_model, src, out)
    assert (code, err) == (2, f"error: {src}:4: a quoted field opens here and does not close within 5 lines "
                              "(an unclosed quote?)\n")
    src.write_text('query,passage\nq1,"two\nlines"\nq3,p3\n')
    code, _, err = _score(cli, ce_model, src, out)
    assert code == 0, err
    assert [r["passage"] for r in _lines(out)] == ["two\nlines", "p3"]


def test_tsv_takes_quotes_literally(cli, ce_model, tmp_path):
    src, out = tmp_path / "in.tsv", tmp_path / "out.jsonl"
    src.write_text('query\tpassage\nq1\t"Hi" she said\nq2\t"unclosed\nq3\tp3\n')
    code, _, err = _score(cli, ce_model, src, out)
    assert code == 0, err
    assert [r["passage"] for r in _lines(out)] == ['"Hi" she said', '"unclosed', "p3"]
    tsv = tmp_path / "out.tsv"  # and written back as it was read: no quoting either
    code, _, err = _score(cli, ce_model, src, tsv)
    assert code == 0, err
    rows = [line.split("\t") for line in tsv.read_text().splitlines()]
    assert rows[0] == ["query", "passage", "score"] and [r[1] for r in rows[1:]] == ['"Hi" she said', '"unclosed', "p3"]
    code, _, err = _score(cli, ce_model, tsv, tmp_path / "again.jsonl", "--score-col", "again")
    assert code == 0 and [r["passage"] for r in _lines(tmp_path / "again.jsonl")] == [r[1] for r in rows[1:]]


def test_a_tab_or_newline_cannot_be_written_as_tsv(cli, ce_model, tmp_path):
    src, out = _jsonl(tmp_path / "in.jsonl", [{"query": "q", "passage": "two\nlines"}]), tmp_path / "out.tsv"
    code, _, err = _score(cli, ce_model, src, out)
    _assert_clean_failure(code, err, out, f"{out}: a value holds a tab or a newline ('two\\nlines'), which TSV "
                                          "cannot hold; write CSV instead")


@pytest.mark.parametrize("name, data", [
    ("in.csv", b"\xef\xbb\xbfquery,passage\nq,p\n"),
    ("in.jsonl", b'\xef\xbb\xbf{"query": "q", "passage": "p"}\n'),
])
def test_byte_order_mark_is_not_part_of_the_first_column(cli, ce_model, tmp_path, name, data):
    src, out = tmp_path / name, tmp_path / "out.jsonl"
    src.write_bytes(data)
    code, _, err = _score(cli, ce_model, src, out)
    assert code == 0, err
    assert list(_lines(out)[0]) == ["query", "passage", "score"]


@pytest.mark.parametrize("suffix, opener", [(".gz", gzip.open), (".bz2", bz2.open)])
def test_compressed_output_is_compressed(cli, ce_model, pairs_jsonl, tmp_path, suffix, opener):
    out = tmp_path / f"out.jsonl{suffix}"
    code, _, err = _score(cli, ce_model, pairs_jsonl, out)
    assert code == 0, err
    with opener(out, "rt") as fh:
        assert len(fh.read().splitlines()) == 120
    out_csv = tmp_path / f"out.csv{suffix}"
    code, _, err = _score(cli, ce_model, pairs_jsonl, out_csv)
    assert code == 0, err
    with opener(out_csv, "rt") as fh:
        assert fh.readline() == '"qid","pid","query","passage","label","score"\n'


@pytest.mark.parametrize("engine", [[], ["--work-dir", "WORK"], ["--devices", "cpu,cpu"]])
def test_header_only_csv_and_zero_row_parquet_keep_their_columns(cli, ce_model, tmp_path, engine):
    engine = [str(tmp_path / "work") if e == "WORK" else e for e in engine]
    src, out = tmp_path / "in.csv", tmp_path / "out.csv"
    src.write_text("id,query,passage\n")
    code, _, err = _score(cli, ce_model, src, out, *engine)
    assert code == 0, err
    assert out.read_text() == '"id","query","passage","score"\n'
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": pa.array([], pa.int64()), "query": pa.array([], pa.string()),
                             "passage": pa.array([], pa.string())}), src)
    out = tmp_path / "out.parquet"
    code, _, err = _score(cli, ce_model, src, out, *engine)
    assert code == 0, err
    schema = pq.read_schema(out)
    assert schema.names == ["id", "query", "passage", "score"] and schema.field("score").type == pa.float32()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "in.parquet", "out.csv", "out.parquet"]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_fifo_input_works_like_stdin(cli, ce_model, pairs_jsonl, pairs_parquet, tmp_path, fmt):
    fifo, out = tmp_path / "pipe", tmp_path / "out.jsonl"
    os.mkfifo(fifo)
    data = (pairs_jsonl if fmt == "jsonl" else pairs_parquet).read_bytes()

    def feed():
        with open(fifo, "wb") as fh:
            fh.write(data)

    writer = threading.Thread(target=feed)
    writer.start()
    flags = [] if fmt == "jsonl" else ["--input-format", "parquet"]  # no extension: JSONL, as for stdin
    code, _, err = _score(cli, ce_model, fifo, out, *flags)
    writer.join(10)
    assert code == 0, err
    assert len(_lines(out)) == 120


def test_dictionary_encoded_strings_are_strings(cli, ce_model, tmp_path):
    src, out = tmp_path / "in.parquet", tmp_path / "out.jsonl"
    table = pa.table({"query": pa.array(["a", "b", "a"]).dictionary_encode(),
                      "passage": pa.array(["x", "y", "z"]).dictionary_encode()})
    pq.write_table(table, src)
    code, _, err = _score(cli, ce_model, src, out)
    assert code == 0, err
    assert [r["query"] for r in _lines(out)] == ["a", "b", "a"]


TRUNCATED = gzip.compress(b"".join(json.dumps({**GOOD, "i": i}).encode() + b"\n" for i in range(20000)))[:20000]


@pytest.mark.parametrize("name, data, where, why", [
    ("in.jsonl.gz", b"this is not gzip\n", ":1:", "cannot be read (zlib inflate failed"),
    ("in.jsonl.gz", TRUNCATED, ":", "cannot be read (Truncated compressed stream)"),
    ("in.jsonl.bz2", b"BZh9 garbage", ":1:", "cannot be read ("),
    ("in.csv.gz", b"\x1f\x8b\x08\x00garbage", ":1:", "cannot be read ("),
])
def test_corrupt_compressed_input_is_one_line(cli, ce_model, tmp_path, name, data, where, why):
    src, out = tmp_path / name, tmp_path / "out.jsonl"
    src.write_bytes(data)
    code, _, err = _score(cli, ce_model, src, out)
    _assert_clean_failure(code, err, out, f"{src}{where}", why)


SURROGATE = b'{"query": "q\\ud800", "passage": "p"}\n'
DEEP = b'{"query": "q", "passage": "p", "d": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"


@pytest.mark.parametrize("bad, why", [(SURROGATE, "a \\u escape that is a lone surrogate"),
                                      (DEEP, "JSON nested too deeply")])
def test_hostile_json_is_a_bad_row(cli, ce_model, tmp_path, bad, why):
    src, out = _jsonl(tmp_path / "in.jsonl", [GOOD, bad, GOOD]), tmp_path / "out.jsonl"
    code, _, err = _score(cli, ce_model, src, out)
    _assert_clean_failure(code, err, out, f"{src}:2: {why}")
    code, _, err = _score(cli, ce_model, src, out, "--on-bad-row", "skip")
    assert code == 0, err
    assert len(_lines(out)) == 2
    assert [(r["where"], r["error"][:20]) for r in _lines(tmp_path / "out.jsonl.rejects.jsonl")] == \
        [("line 2", why[:20])]


def test_two_columns_with_one_name_are_refused(cli, ce_model, tmp_path):
    src, out = tmp_path / "in.parquet", tmp_path / "out.jsonl"
    pq.write_table(pa.Table.from_arrays([pa.array(["q"]), pa.array(["p"]), pa.array(["x"])],
                                        names=["query", "passage", "query"]), src)
    code, _, err = _score(cli, ce_model, src, out)
    assert (code, err) == (2, f"error: {src}: two columns are named 'query'; rename one\n")
    src = tmp_path / "in.csv"
    src.write_text("query,passage,passage\nq,p,x\n")
    code, _, err = _score(cli, ce_model, src, out)
    assert (code, err) == (2, f"error: {src}:1: two columns are named 'passage'; rename one\n")


def test_closed_stdout_stops_quietly(ce_model, tmp_path):
    src = _jsonl(tmp_path / "in.jsonl", [GOOD] * 20000)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rerank_cli", "score", str(src), "-o", "-", "-m", ce_model,
                             "--sort-window", "500"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert json.loads(proc.stdout.readline())["query"] == GOOD["query"]
    proc.stdout.close()  # `| head -1`
    err = proc.stderr.read().decode()
    assert proc.wait(120) == 141, err
    assert "Traceback" not in err and "error" not in err and "Exception ignored" not in err, err


def test_skipped_rows_with_stdout_output_say_where_they_went(cli, ce_model, tmp_path):
    src = _jsonl(tmp_path / "in.jsonl", [GOOD, {"query": "q"}])
    code, out, err = cli("score", str(src), "-o", "-", "-m", ce_model, "--on-bad-row", "skip")
    assert code == 0, err
    assert err.splitlines()[-1].endswith("; 1 bad rows skipped (not kept: pass --rejects PATH to keep them)")
    code, out, err = cli("score", str(src), "-o", "-", "-m", ce_model, "--on-bad-row", "skip",
                         "--rejects", str(tmp_path / "bad.jsonl"))
    assert code == 0 and f"(see {tmp_path / 'bad.jsonl'})" in err
