"""`rerank eval` numbers on a small example checked by hand, baselines, qrels formats, and bad input."""

from __future__ import annotations

import json
from math import log2

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rerank_cli.errors import ConfigError, InputError
from rerank_cli.rank.evaluation import evaluate_files
from rerank_cli.rank.runs import RunColumns, is_trec, read_qrels

# q1: d1 (grade 2), d3 and d4 relevant, d2 judged not; q2: d5; q3: nothing relevant; q4: d7 (never retrieved).
QRELS = """q1 0 d1 2
q1 0 d2 0
q1 0 d3 1
q1 0 d4 1
q2 0 d5 1
q3 0 d9 0
q4 0 d7 1
"""
# Input order is the first stage. Reranked by score, q1 is d2 d1 d3 dx: d1 and d3 tie at 0.5 and d1
# came first in the input (trec_eval would put d3 first: it breaks ties by docid, descending).
SCORED = [
    {"qid": "q1", "pid": "dx", "score": 0.1},
    {"qid": "q2", "pid": "d6", "score": 0.3},
    {"qid": "q1", "pid": "d2", "score": 0.9},
    {"qid": "q1", "pid": "d1", "score": 0.5},
    {"qid": "q5", "pid": "d8", "score": 0.2},
    {"qid": "q1", "pid": "d3", "score": 0.5},
    {"qid": "q2", "pid": "d5", "score": 0.8},
]

# By hand. Reranked: q1 = d2(0) d1(2) d3(1) dx; q2 = d5(1) d6; q4 missing (0); q3 has no relevant: left out.
IDCG_Q1 = 2 / log2(2) + 1 / log2(3) + 1 / log2(4)
RUN_Q1 = {"nDCG@10": (2 / log2(3) + 1 / log2(4)) / IDCG_Q1, "MRR@10": 1 / 2, "MAP": (1 / 2 + 2 / 3) / 3,
          "Recall@10": 2 / 3, "Recall@100": 2 / 3}
RUN_Q2 = {"nDCG@10": 1.0, "MRR@10": 1.0, "MAP": 1.0, "Recall@10": 1.0, "Recall@100": 1.0}
# Input order: q1 = dx d2 d1(2) d3(1); q2 = d6 d5(1).
BASE_Q1 = {"nDCG@10": (2 / log2(4) + 1 / log2(5)) / IDCG_Q1, "MRR@10": 1 / 3, "MAP": (1 / 3 + 2 / 4) / 3,
           "Recall@10": 2 / 3, "Recall@100": 2 / 3}
BASE_Q2 = {"nDCG@10": 1 / log2(3), "MRR@10": 1 / 2, "MAP": 1 / 2, "Recall@10": 1.0, "Recall@100": 1.0}
ZERO = dict.fromkeys(RUN_Q1, 0.0)


@pytest.fixture
def files(tmp_path):
    qrels = tmp_path / "qrels.trec"
    qrels.write_text(QRELS)
    scored = tmp_path / "scored.jsonl"
    scored.write_text("".join(json.dumps(r) + "\n" for r in SCORED))
    return qrels, scored


def mean(*per_query: dict) -> dict:
    return {k: sum(q[k] for q in per_query) / len(per_query) for k in per_query[0]}


def close(got: dict, want: dict) -> bool:
    return got.keys() == want.keys() and all(abs(got[k] - want[k]) < 1e-9 for k in want)


def test_metrics_of_a_scored_file_match_the_hand_computed_values(files):
    qrels, scored = files
    report = evaluate_files(str(scored), str(qrels))
    assert report.queries == ["q1", "q2", "q4"]
    assert close(report.run["q1"], RUN_Q1) and close(report.run["q2"], RUN_Q2) and close(report.run["q4"], ZERO)
    assert close(report.mean(report.run), mean(RUN_Q1, RUN_Q2, ZERO))
    notes = " | ".join(report.notes)
    assert "1 judged queries have no ranking and count as 0" in notes
    assert "1 queries have no judgements and are left out" in notes
    assert "1 judged queries have no relevant document" in notes


def test_input_order_baseline_and_difference(files):
    qrels, scored = files
    report = evaluate_files(str(scored), str(qrels), baseline_input_order=True)
    assert report.baseline_name.endswith("(input order)")
    assert close(report.baseline["q1"], BASE_Q1) and close(report.baseline["q2"], BASE_Q2)
    want_diff = {k: v - w for (k, v), w in zip(mean(RUN_Q1, RUN_Q2, ZERO).items(),
                                                mean(BASE_Q1, BASE_Q2, ZERO).values())}
    assert close(report.diff(), want_diff)
    assert report.wins("MRR@10") == (2, 1, 0)  # q1 and q2 better, q4 tied at 0
    assert report.wins("Recall@10") == (0, 3, 0)
    data = report.to_json(per_query=True)
    assert close(data["metrics"]["diff"], want_diff)
    assert [q["qid"] for q in data["per_query"]] == ["q1", "q2", "q4"]
    assert close(data["per_query"][0]["baseline"], BASE_Q1)


def test_a_trec_run_is_evaluated_as_trec_eval_would_and_serves_as_baseline(files, tmp_path):
    qrels, scored = files
    run = tmp_path / "first.run"
    run.write_text("".join(f"{r['qid']} Q0 {r['pid']} {i} {r['score']} bm25\n" for i, r in enumerate(SCORED, 1)))
    report = evaluate_files(str(run), str(qrels))
    # The tie d1/d3 goes to d3 (docid, descending) as in trec_eval: d2 d3(1) d1(2).
    assert abs(report.run["q1"]["nDCG@10"] - (1 / log2(3) + 2 / log2(4)) / IDCG_Q1) < 1e-9
    assert abs(report.run["q1"]["MAP"] - RUN_Q1["MAP"]) < 1e-9
    against = evaluate_files(str(scored), str(qrels), baseline=str(run))
    assert against.baseline_name == str(run)
    assert abs(against.diff()["nDCG@10"] - (RUN_Q1["nDCG@10"] - report.run["q1"]["nDCG@10"]) / 3) < 1e-9


def test_qrels_as_tables(tmp_path, files):
    _, scored = files
    rows = [line.split() for line in QRELS.splitlines()]
    jsonl = tmp_path / "qrels.jsonl"
    jsonl.write_text("".join(json.dumps({"qid": q, "docid": d, "relevance": int(r)}) + "\n" for q, _, d, r in rows))
    parquet = tmp_path / "qrels.parquet"
    pq.write_table(pa.table({"qid": [r[0] for r in rows], "pid": [r[2] for r in rows],
                             "label": [int(r[3]) for r in rows]}), parquet)
    assert read_qrels(str(jsonl)) == read_qrels(str(parquet)) == read_qrels(str(files[0]))
    assert read_qrels(str(jsonl))["q1"] == {"d1": 2, "d2": 0, "d3": 1, "d4": 1}
    assert close(evaluate_files(str(scored), str(parquet)).run["q1"], RUN_Q1)


def test_trec_files_are_recognised_by_extension_or_first_line(tmp_path):
    txt = tmp_path / "qrels.txt"
    txt.write_text(QRELS)
    tsv = tmp_path / "qrels.tsv"
    tsv.write_text(QRELS.replace(" ", "\t"))
    table_tsv = tmp_path / "table.tsv"
    table_tsv.write_text("qid\tdocid\trelevance\nq1\td1\t1\n")
    assert is_trec(str(txt), None, 4) and is_trec(str(tsv), None, 4)
    assert not is_trec(str(table_tsv), None, 4)
    assert is_trec("x.run", None, 6) and not is_trec("x.parquet", None, 6) and is_trec("-", "trec", 6)
    assert read_qrels(str(tsv)) == read_qrels(str(txt))
    assert read_qrels(str(table_tsv)) == {"q1": {"d1": 1}}


def test_scored_file_columns_can_be_named(tmp_path, files):
    qrels, _ = files
    scored = tmp_path / "s.jsonl"
    scored.write_text("".join(json.dumps({"topic": r["qid"], "doc": r["pid"], "ce": r["score"]}) + "\n"
                              for r in SCORED))
    report = evaluate_files(str(scored), str(qrels), columns=RunColumns(score="ce", group="topic", doc="doc"))
    assert close(report.run["q1"], RUN_Q1)


def test_bad_runs_and_qrels_fail_with_the_line(tmp_path, files):
    qrels, scored = files
    bad_run = tmp_path / "bad.trec"
    bad_run.write_text("q1 Q0 d1 1 0.5 tag\nq1 Q0 d2 2 0.4\n")
    with pytest.raises(InputError, match=r"bad.trec:2: expected 6 fields"):
        evaluate_files(str(bad_run), str(qrels))
    dup = tmp_path / "dup.trec"
    dup.write_text("q1 Q0 d1 1 0.5 tag\nq1 Q0 d1 2 0.4 tag\n")
    with pytest.raises(InputError, match=r"dup.trec:2: document 'd1' appears twice for query 'q1'"):
        evaluate_files(str(dup), str(qrels))
    bad_qrels = tmp_path / "bad.qrels"
    bad_qrels.write_text("q1 0 d1 1\nq1 0 d2 yes\n")
    with pytest.raises(InputError, match=r"bad.qrels:2: relevance 'yes' is not an integer"):
        evaluate_files(str(scored), str(bad_qrels))
    with pytest.raises(InputError, match="no such file"):
        evaluate_files(str(tmp_path / "nope.trec"), str(qrels))


def test_mismatched_ids_and_conflicting_options_are_user_errors(tmp_path, files):
    qrels, scored = files
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"query": "what is x", "pid": "d1", "score": 1.0}) + "\n")
    with pytest.raises(InputError, match="none of its 1 query ids appear in .*--group-col"):
        evaluate_files(str(other), str(qrels))
    with pytest.raises(InputError, match="no column 'docno' for the document id.*--doc-col"):
        evaluate_files(str(scored), str(qrels), columns=RunColumns(doc="docno"))
    run = tmp_path / "r.trec"
    run.write_text("q1 Q0 d1 1 0.5 tag\n")
    with pytest.raises(ConfigError, match="TREC run, which has no input order"):
        evaluate_files(str(run), str(qrels), baseline_input_order=True)
    with pytest.raises(ConfigError, match="not both"):
        evaluate_files(str(scored), str(qrels), baseline=str(run), baseline_input_order=True)
    no_rel = tmp_path / "none.qrels"
    no_rel.write_text("q1 0 d1 0\n")
    with pytest.raises(InputError, match="no relevant judgements"):
        evaluate_files(str(scored), str(no_rel))
