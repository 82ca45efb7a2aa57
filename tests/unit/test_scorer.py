"""Scorer details that the end-to-end tests cannot reach: fp16 overflow re-runs, empty inputs."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import torch

from rerank_cli import Reranker
from rerank_cli.precision import Precision


def test_fp16_batch_with_non_finite_scores_is_rerun_in_fp32(ce_model):
    r = Reranker(ce_model, "cpu", dtype="fp32")
    pairs = [("what is ka", "ka ri to an"), ("ri", "mo su ne la")]
    expected = r.score(pairs)
    scorer = r.scorer
    scorer.precision = Precision("fp16", "test")
    real = scorer._scores
    calls = []

    def overflowing(model, inputs):
        calls.append(model)
        out = real(model, inputs)
        return out if model is scorer._fp32_model else out * float("inf")

    scorer._scores = overflowing
    got = r.score(pairs)
    assert scorer.stats.fp32_reruns == 1 and len(calls) == 2
    assert calls[1] is scorer._fp32_model and next(calls[1].parameters()).dtype == torch.float32
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_empty_input_gives_an_empty_valid_output(cli, ce_model, tmp_path):
    src = tmp_path / "empty.jsonl"
    src.write_text("")
    for out in (tmp_path / "o.parquet", tmp_path / "o.jsonl"):
        code, _, err = cli("score", str(src), "-o", str(out), "-m", ce_model)
        assert code == 0, err
        assert "scored 0 pairs" in err
    assert pq.read_table(tmp_path / "o.parquet").num_rows == 0
    assert (tmp_path / "o.jsonl").read_text() == ""


def test_score_api_keeps_order_across_windows(ce_model, monkeypatch):
    import rerank_cli.reranker as mod

    monkeypatch.setattr(mod, "WINDOW", 7)
    pairs = [(f"query {i}", "ka ri " * (1 + i % 9)) for i in range(30)]
    r = Reranker(ce_model, "cpu", batch_tokens=64)
    windowed = r.score(pairs)
    one_by_one = [r.score([p])[0] for p in pairs]
    np.testing.assert_allclose(windowed, one_by_one, atol=1e-5)


def test_score_api_rejects_what_is_not_a_pair_of_strings(ce_model):
    import pytest

    from rerank_cli.errors import InputError

    r = Reranker(ce_model, "cpu")
    with pytest.raises(InputError, match="pair 2 is not a"):
        r.score([("q", "p"), ("q", None)])
