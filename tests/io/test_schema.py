"""One schema-merging rule: a column typed by the first chunk widens (int -> float, null -> any type)
or stops with an error naming the line; never a lossy cast, in every engine and in `rerank rank`."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rerank_cli.io.schema import TypeChange, conform, widen
from tests.cli.test_bad_input import _assert_clean_failure, _jsonl


def _rows(n=6, late=7.9):
    rows = [{"query": "q", "passage": f"p {i}", "x": i, "tag": None} for i in range(1, n)]
    return rows + [{"query": "q", "passage": "late", "x": late, "tag": "t"}]


def _read(path):
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    if path.suffix == ".csv":
        import pyarrow.csv as pcsv

        return pcsv.read_csv(path).to_pylist()
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("out_name, extra", [
    ("out.jsonl", []), ("out.parquet", []), ("out.csv", []), ("out.arrow", []),
    ("out.jsonl", ["--work-dir", "WORK", "--shard-rows", "2"]),  # the local engine: shards, parts, merge
    ("out.parquet", ["--devices", "cpu,cpu", "--shard-rows", "2"]),  # spawned workers
])
def test_whole_numbers_then_a_decimal_keep_the_decimal(cli, ce_model, tmp_path, out_name, extra):
    src, out = _jsonl(tmp_path / "in.jsonl", _rows()), tmp_path / out_name
    extra = [str(tmp_path / "work") if e == "WORK" else e for e in extra]
    code, _, err = cli("score", str(src), "-o", str(out), "-m", ce_model, "--sort-window", "2", "-q", *extra)
    assert code == 0, err
    if out.suffix == ".arrow":
        import pyarrow.ipc as ipc

        rows = ipc.open_file(str(out)).read_all().to_pylist()
    else:
        rows = _read(out)
    assert [r["x"] for r in rows] == [1, 2, 3, 4, 5, 7.9]
    assert rows[-1]["tag"] == "t" and rows[0]["tag"] in (None, "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", out_name]


def test_rank_ranks_on_the_real_scores(cli, tmp_path):
    rows = [{"qid": "1", "pid": f"d{i}", "score": i} for i in range(4)] + [{"qid": "1", "pid": "best", "score": 7.9}]
    src = _jsonl(tmp_path / "scored.jsonl", rows)
    out = tmp_path / "ranked.jsonl"
    code, _, err = cli("rank", str(src), "-o", str(out), "--top-k", "2")
    assert code == 0, err
    assert [(r["pid"], r["score"]) for r in _read(out)] == [("best", 7.9), ("d3", 3)]


def test_a_number_that_turns_into_text_names_the_line(cli, ce_model, tmp_path):
    src, out = _jsonl(tmp_path / "in.jsonl", _rows(late="seven")), tmp_path / "out.jsonl"
    code, _, err = cli("score", str(src), "-o", str(out), "-m", ce_model, "--sort-window", "2")
    _assert_clean_failure(code, err, out, "in.jsonl:6: column 'x' changes type here (earlier rows: int64)")


def test_an_integer_too_big_for_a_float_is_not_rounded(cli, ce_model, tmp_path):
    rows = [{"query": "q", "passage": "p", "x": 0.5}, {"query": "q", "passage": "p", "x": 2**53 + 1}]
    src, out = _jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    code, _, err = cli("score", str(src), "-o", str(out), "-m", ce_model, "--sort-window", "1")
    _assert_clean_failure(code, err, out, "in.jsonl:2: column 'x' changes type here (earlier rows: double)")


def test_widen_rule():
    s = lambda t: pa.schema([("a", t)])  # noqa: E731
    assert widen(s(pa.int64()), s(pa.float64())) == s(pa.float64())
    assert widen(s(pa.float64()), s(pa.int64())) == s(pa.float64())
    assert widen(s(pa.null()), s(pa.string())) == s(pa.string())
    assert widen(s(pa.string()), s(pa.null())) == s(pa.string())
    assert widen(s(pa.int32()), s(pa.int64())) == s(pa.int64())
    with pytest.raises(TypeChange):
        widen(s(pa.int64()), s(pa.string()))
    batch = pa.RecordBatch.from_pydict({"a": pa.array([2**53 + 1])})
    with pytest.raises(pa.ArrowInvalid):
        conform(batch, s(pa.float64()))
    assert conform(pa.RecordBatch.from_pydict({"a": [3]}), s(pa.float64())).column(0).to_pylist() == [3.0]


def test_ray_windows_widen_by_the_same_rule():
    from rerank_cli.engines.ray.io import _same_schema
    from rerank_cli.errors import InputError

    first = pa.RecordBatch.from_pydict({"x": pa.array([1, 2]), "t": pa.array([None, None])})
    later = pa.RecordBatch.from_pydict({"x": pa.array([7.9]), "t": pa.array(["s"])})
    batch, schema = _same_schema("in.jsonl", first, None, 1)
    batch, schema = _same_schema("in.jsonl", later, schema, 3)
    assert batch.to_pylist() == [{"x": 7.9, "t": "s"}] and schema.field("x").type == pa.float64()
    text = pa.RecordBatch.from_pydict({"x": pa.array(["seven"]), "t": pa.array(["s"])})
    with pytest.raises(InputError, match="in.jsonl: row 4: columns change"):
        _same_schema("in.jsonl", text, schema, 4)


def test_json_objects_widen_field_by_field(cli, ce_model, tmp_path):
    rows = [{"query": "q", "passage": "p", "x": {"a": 1}}, {"query": "q", "passage": "p", "x": {"a": 1.5}},
            {"query": "q", "passage": "p", "x": {"a": 2.5, "b": 1}}]
    src, out = _jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.parquet"
    code, _, err = cli("score", str(src), "-o", str(out), "-m", ce_model, "--sort-window", "1", "-q")
    assert code == 0, err
    assert [r["x"] for r in _read(out)] == [{"a": 1, "b": None}, {"a": 1.5, "b": None}, {"a": 2.5, "b": 1}]


def test_an_integer_past_64_bits_names_the_line(cli, ce_model, tmp_path):
    rows = [{"query": "q", "passage": "p", "x": 1}, {"query": "q", "passage": "p", "x": 10**24}]
    src, out = _jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    code, _, err = cli("score", str(src), "-o", str(out), "-m", ce_model)
    _assert_clean_failure(code, err, out, "in.jsonl:2: column 'x' holds an integer past 64 bits")


def test_a_compressed_parquet_output_that_cannot_be_rewritten_says_so(cli, ce_model, tmp_path):
    src, out = _jsonl(tmp_path / "in.jsonl", _rows()), tmp_path / "out.parquet.gz"
    code, _, err = cli("score", str(src), "-o", str(out), "-m", ce_model, "--sort-window", "2")
    _assert_clean_failure(code, err, out, f"{out}: column 'x' widens from int64 to double after row 4, and a "
                                          "streamed or compressed file cannot be rewritten")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
