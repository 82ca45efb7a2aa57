"""Top-k per group: bounded heaps, non-contiguous groups, ties by input order, TREC output."""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path

import pyarrow as pa
import pytest

from rerank_cli.config import build_config
from rerank_cli.errors import InputError, OutputError
from rerank_cli.io.readers import Columns, read_chunks
from rerank_cli.rank.ranking import (
    RankingWriter,
    RankSpec,
    TopK,
    open_ranked_output,
    rank_file,
    run_rank,
    wants_ranking,
)


def table(rows: list[dict]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist(rows)


def batches_of(rows: list[dict], size: int) -> list[pa.RecordBatch]:
    return [table(rows[i:i + size]) for i in range(0, len(rows), size)]


def reference(rows: list[dict], k: int | None, group: str = "qid") -> list[tuple]:
    """The ranking rule spelled out the slow way: group by first appearance, score desc, input order."""
    order: dict = {}
    for seq, row in enumerate(rows):
        order.setdefault(row[group], []).append((seq, row))
    out = []
    for g, members in order.items():
        ranked = sorted(members, key=lambda m: (-m[1]["score"], m[0]))[:k]
        out += [(g, rank, m[1]["pid"]) for rank, m in enumerate(ranked, 1)]
    return out


def run_topk(rows: list[dict], k: int | None, batch_rows: int, **spec) -> tuple[TopK, list[dict]]:
    batches = batches_of(rows, batch_rows)
    topk = TopK(RankSpec(k=k, **spec), batches[0].schema)
    for b in batches:
        topk.add(b)
        assert k is None or all(len(h) <= k for h in topk.heaps.values())  # the memory bound
    out = [r for b in topk.batches(rows=7) for r in b.to_pylist()]
    return topk, out


def random_rows(n: int, groups: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    # Few distinct scores: many ties. Groups interleave at random: not contiguous.
    return [{"qid": f"q{rng.randrange(groups)}", "pid": f"p{i}", "score": float(rng.randrange(5)), "n": i}
            for i in range(n)]


@pytest.mark.parametrize("k,batch_rows", [(1, 1), (3, 7), (3, 1000), (50, 13), (None, 9)])
def test_topk_matches_the_rule_on_interleaved_groups_with_ties(k, batch_rows):
    rows = random_rows(400, 11, seed=k or 0)
    _, out = run_topk(rows, k, batch_rows)
    assert [(r["qid"], r["rank"], r["pid"]) for r in out] == reference(rows, k)
    kept = {r["pid"]: r for r in out}
    for row in rows:  # every kept row is passed through unchanged
        if row["pid"] in kept:
            assert {c: kept[row["pid"]][c] for c in row} == row


def test_non_contiguous_groups_come_out_in_first_appearance_order():
    rows = [{"qid": q, "pid": f"p{i}", "score": s} for i, (q, s) in
            enumerate([("b", 1.0), ("a", 5.0), ("b", 3.0), ("c", 0.0), ("a", 4.0), ("b", 2.0)])]
    _, out = run_topk(rows, 2, 2)
    assert [(r["qid"], r["pid"], r["rank"]) for r in out] == [
        ("b", "p2", 1), ("b", "p5", 2), ("a", "p1", 1), ("a", "p4", 2), ("c", "p3", 1)]


def test_ties_go_to_the_earlier_row_even_across_batches():
    rows = [{"qid": "q", "pid": f"p{i}", "score": 1.0} for i in range(6)]
    for batch_rows in (1, 4, 6):
        _, out = run_topk(rows, 3, batch_rows)
        assert [r["pid"] for r in out] == ["p0", "p1", "p2"]


def test_k_larger_than_a_group_keeps_the_whole_group_ranked():
    rows = [{"qid": "q1", "pid": "a", "score": 0.1}, {"qid": "q2", "pid": "b", "score": 0.9},
            {"qid": "q1", "pid": "c", "score": 0.7}]
    topk, out = run_topk(rows, 10, 2)
    assert [(r["qid"], r["pid"], r["rank"]) for r in out] == [("q1", "c", 1), ("q1", "a", 2), ("q2", "b", 1)]
    assert topk.kept == 3


def test_nan_ranks_last_and_null_score_names_the_row():
    rows = [{"qid": "q", "pid": "a", "score": float("nan")}, {"qid": "q", "pid": "b", "score": -1e30}]
    _, out = run_topk(rows, None, 5)
    assert [r["pid"] for r in out] == ["b", "a"] and math.isnan(out[1]["score"])
    bad = [{"qid": "q", "pid": "a", "score": 1.0}, {"qid": "q", "pid": "b", "score": None}]
    with pytest.raises(InputError, match=r"x.jsonl: row 2: 'score' is null"):
        run_topk(bad, 1, 5, source="x.jsonl")


def test_text_scores_from_csv_are_read_as_numbers_and_bad_ones_name_the_row():
    rows = [{"qid": "q", "pid": "a", "score": "2.5"}, {"qid": "q", "pid": "b", "score": "10"}]
    _, out = run_topk(rows, 1, 5)
    assert out == [{"qid": "q", "pid": "b", "score": "10", "rank": 1}]
    with pytest.raises(InputError, match=r"row 3: 'score' is 'high', not a number"):
        run_topk(rows + [{"qid": "q", "pid": "c", "score": "high"}], 1, 5)


def test_group_defaults_to_qid_else_the_query_text_and_can_be_named():
    spec = RankSpec()
    assert spec.group_column(["qid", "query", "score"]) == "qid"
    assert spec.group_column(["query", "score"]) == "query"
    assert RankSpec(group="topic").group_column(["qid", "topic"]) == "topic"
    rows = [{"query": "x", "pid": "a", "score": 1.0}, {"query": "y", "pid": "b", "score": 2.0},
            {"query": "x", "pid": "c", "score": 3.0}]
    _, out = run_topk(rows, 1, 5)
    assert [r["pid"] for r in out] == ["c", "b"]
    with pytest.raises(InputError, match="no column 'topic' to group by.*--group-col"):
        run_topk(rows, 1, 5, group="topic")


def test_an_existing_rank_column_is_replaced():
    rows = [{"qid": "q", "pid": "a", "rank": 1, "score": 0.0}, {"qid": "q", "pid": "b", "rank": 2, "score": 1.0}]
    _, out = run_topk(rows, None, 5)
    assert out == [{"qid": "q", "pid": "b", "rank": 1, "score": 1.0}, {"qid": "q", "pid": "a", "rank": 2, "score": 0.0}]


def cfg_for(output: str, **flags):
    return build_config({"input": "in.jsonl", "output": output, **flags})


def test_ranking_is_wanted_for_top_k_or_trec_output():
    assert wants_ranking(cfg_for("out.jsonl", top_k=3))
    assert wants_ranking(cfg_for("out.trec"))
    assert wants_ranking(cfg_for("-", output_format="trec"))
    assert not wants_ranking(cfg_for("out.parquet"))


def test_a_failed_run_leaves_no_ranked_output(tmp_path):
    out = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError), open_ranked_output(cfg_for(str(out), top_k=1)) as writer:
        writer.write(table([{"qid": "q", "pid": "a", "score": 1.0}]))
        raise RuntimeError("scoring died")
    assert list(tmp_path.iterdir()) == []


def test_trec_output_is_read_back_by_trec_eval_readers(tmp_path):
    import ir_measures
    import pytrec_eval

    rows = random_rows(60, 4, seed=1)
    out = tmp_path / "run.trec"
    with open_ranked_output(cfg_for(str(out), top_k=5, run_tag="myrun")) as writer:
        for b in batches_of(rows, 8):
            writer.write(b)
    lines = out.read_text().splitlines()
    assert len(lines) == 20 and all(len(line.split()) == 6 for line in lines)
    assert lines[0].split()[1] == "Q0" and lines[0].split()[5] == "myrun"
    expected = reference(rows, 5)
    assert [(f[0], int(f[3]), f[2]) for f in (line.split() for line in lines)] == expected
    parsed = list(ir_measures.read_trec_run(str(out)))
    assert [(d.query_id, d.doc_id) for d in parsed] == [(q, p) for q, _, p in expected]
    score = {r["pid"]: r["score"] for r in rows}
    assert all(d.score == score[d.doc_id] for d in parsed)
    with open(out) as fh:
        assert sum(len(docs) for docs in pytrec_eval.parse_run(fh).values()) == 20


def test_trec_output_needs_the_doc_column_and_clean_ids(tmp_path):
    with pytest.raises(InputError, match="no column 'docno' for the document id.*--doc-col"):
        with open_ranked_output(cfg_for(str(tmp_path / "r.trec"), doc_col="docno")) as writer:
            writer.write(table([{"qid": "q", "pid": "a", "score": 1.0}]))
    with pytest.raises(OutputError, match="column 'pid' has 'a b'"):
        with open_ranked_output(cfg_for(str(tmp_path / "r.trec"))) as writer:
            writer.write(table([{"qid": "q", "pid": "a b", "score": 1.0}]))
    assert list(tmp_path.iterdir()) == []


def test_trec_output_keeps_only_what_a_run_needs():
    rows = [{"qid": "q", "pid": "a", "passage": "long text " * 50, "score": 1.0}]
    writer = RankingWriter(None, RankSpec(doc="pid", trec=True))
    writer.write(table(rows))
    assert writer.topk.keep == ["qid", "pid", "score"]


def test_scored_tables_read_without_query_or_passage_columns(tmp_path):
    path = tmp_path / "scored.jsonl"
    path.write_text('{"qid": 1, "pid": "a", "score": 0.5}\n{"qid": 1, "pid": "b", "score": 0.7}\n')
    chunks = list(read_chunks(str(path), Columns.scored()))
    assert chunks[0].batch.column_names == ["qid", "pid", "score"]


def test_rank_file_writes_ranked_jsonl(tmp_path):
    src = tmp_path / "scored.jsonl"
    rows = random_rows(50, 3, seed=2)
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "top.jsonl"
    logged = []
    summary = run_rank(build_config({"input": str(src), "output": str(out), "top_k": 2, "sort_window": 16}),
                       log=logged.append)
    got = [json.loads(line) for line in io.StringIO(out.read_text())]
    assert [(r["qid"], r["rank"], r["pid"]) for r in got] == reference(rows, 2)
    assert (summary.rows, summary.groups, summary.kept) == (50, 3, 6)
    assert "ranked 50 rows in 3 groups" in summary.line()
    assert Path(out).exists() and not logged


def test_rank_file_python_api_writes_a_trec_run(tmp_path):
    src = tmp_path / "scored.jsonl"
    rows = random_rows(30, 2, seed=4)
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = rank_file(str(src), str(tmp_path / "all.run"), run_tag="x")
    lines = [line.split() for line in (tmp_path / "all.run").read_text().splitlines()]
    assert [(f[0], int(f[3]), f[2]) for f in lines] == reference(rows, None)
    assert summary.kept == 30 and "ranked all of them" in summary.line()


def test_memory_grows_with_groups_times_k_not_with_the_input():
    import tracemalloc

    def peak(batches: int) -> int:
        rng = random.Random(5)
        tracemalloc.start()
        topk = None
        for b in range(batches):  # generated on the fly: the input itself is never held
            batch = table([{"qid": f"q{rng.randrange(20)}", "pid": f"p{b}-{i}", "score": rng.random(),
                            "passage": "x" * 200} for i in range(500)])
            topk = topk or TopK(RankSpec(k=3), batch.schema)
            topk.add(batch)
            del batch
        size = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert topk.kept == 60
        return size

    small, large = peak(4), peak(40)  # 2,000 vs 20,000 rows
    assert large < 1.3 * small, (small, large)
