"""Scorer details that the end-to-end tests cannot reach: fp16 overflow re-runs, empty inputs."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import torch

from rerank_cli import Reranker


def test_fp16_batch_with_non_finite_scores_is_rerun_in_fp32(ce_model):
    pairs = [("what is ka", "ka ri to an"), ("ri", "mo su ne la")]
    expected = Reranker(ce_model, "cpu", dtype="fp32").score(pairs)
    r = Reranker(ce_model, "cpu", dtype="fp16")
    scorer = r.scorer
    real = scorer._scores
    seen = []

    def overflowing(model, inputs):
        dtypes = {p.dtype for p in model.base_model.encoder.parameters()}  # the body (the head is fp32: head.py)
        seen.append(dtypes)
        out = real(model, inputs)
        return out * float("inf") if dtypes == {torch.float16} else out

    scorer._scores = overflowing
    got = r.score(pairs)
    assert seen == [{torch.float16}, {torch.float32}]  # the fp16 pass, then the re-run with fp32 weights
    assert scorer.stats.fp32_reruns == 1
    assert {p.dtype for p in scorer.model.base_model.encoder.parameters()} == {torch.float16}  # cast back
    assert {p.dtype for p in scorer.model.classifier.parameters()} == {torch.float32}  # the head stays fp32
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, atol=2e-2)  # fp32 arithmetic on fp16-rounded weights


def test_upcast_restores_every_tensor_to_its_own_dtype():
    from rerank_cli.model.scorers import upcast

    model = torch.nn.Linear(4, 2).half()
    model.register_buffer("inv_freq", torch.arange(3, dtype=torch.float32))
    model.register_buffer("steps", torch.arange(3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with upcast(model, torch.float32):
        assert model.weight.dtype == torch.float32 and model.inv_freq.dtype == torch.float32
    after = model.state_dict()
    assert {k: v.dtype for k, v in after.items()} == {k: v.dtype for k, v in before.items()}
    assert all(torch.equal(after[k], before[k]) for k in before)  # fp16 -> fp32 -> fp16 is exact


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
