"""Precision on real devices: bf16 chosen on a GPU that has it (and the run says why), and an fp16 batch
whose activations really overflow re-run in fp32, on the CPU and on CUDA (`pytest -m gpu`).

The overflowing model is the tiny cross-encoder with one weight matrix scaled up: its largest weight
still fits fp16 (under 65504), but the sums it feeds to the first LayerNorm do not, so fp16 gives inf
and NaN where fp32 gives ordinary scores. No monkeypatching: the scores themselves are non-finite.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from rerank_cli.model.precision import choose_dtype
from tests.cuda import GPU, gpu_test

OVERFLOW_SCALE = 20000.0  # tiny CE's first FFN output weights x this: max |w| ~ 1.4e4, pre-norm sums > 65504


def rows(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def score_column(path) -> np.ndarray:
    return np.array([r["score"] for r in rows(path)])


@pytest.fixture(scope="module")
def overflowing_ce(ce_model, tmp_path_factory) -> str:
    from transformers import AutoModelForSequenceClassification

    out = tmp_path_factory.mktemp("overflow") / "ce"
    shutil.copytree(ce_model, out)
    model = AutoModelForSequenceClassification.from_pretrained(ce_model)
    with torch.no_grad():
        model.base_model.encoder.layer[0].output.dense.weight.mul_(OVERFLOW_SCALE)
    assert model.base_model.encoder.layer[0].output.dense.weight.abs().max() < torch.finfo(torch.float16).max
    model.save_pretrained(out)
    return str(out)


def plain_fp16_forward_is_finite(model_path: str, device: str) -> bool:
    """The premise, checked with transformers alone: this model overflows in fp16 on `device`."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    net = AutoModelForSequenceClassification.from_pretrained(model_path, dtype=torch.float16).to(device).eval()
    batch = tok(["what is ka", "ri to"], ["ka ri to an el mo", "su ne la vi"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = net(**batch.to(device)).logits
    return bool(torch.isfinite(logits).all())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda:0", marks=GPU)])
def test_an_fp16_batch_that_overflows_is_rerun_in_fp32(cli, overflowing_ce, pairs_jsonl, tmp_path, device):
    assert not plain_fp16_forward_is_finite(overflowing_ce, device)
    ref, half = tmp_path / "fp32.jsonl", tmp_path / "fp16.jsonl"
    code, _, err = cli("score", str(pairs_jsonl), "-o", str(ref), "-m", overflowing_ce, "--device", device,
                       "--dtype", "fp32")
    assert code == 0, err
    code, _, err = cli("score", str(pairs_jsonl), "-o", str(half), "-m", overflowing_ce, "--device", device,
                       "--dtype", "fp16")
    assert code == 0, err
    summary = err.strip().splitlines()[-1]
    assert f"on {device}, fp16" in summary and "batches re-run in fp32" in summary, summary
    got, want = score_column(half), score_column(ref)
    assert np.isfinite(got).all()
    assert [r["pid"] for r in rows(half)] == [r["pid"] for r in rows(ref)]
    np.testing.assert_allclose(got, want, atol=2e-2)  # fp32 arithmetic on fp16-rounded weights (CPU: 3e-3)


@gpu_test
def test_bf16_is_chosen_on_this_gpu_and_the_run_says_why(cli, ce_model, pairs_jsonl, tmp_path):
    major, _ = torch.cuda.get_device_capability(0)
    if major < 8:
        pytest.skip(f"{torch.cuda.get_device_name(0)} has no bf16 (compute capability {major}.x)")
    precision = choose_dtype("auto", "cuda:0")
    assert precision.name == "bf16" and torch.cuda.get_device_name(0) in precision.reason
    gpu, cpu = tmp_path / "gpu.jsonl", tmp_path / "cpu.jsonl"
    code, _, err = cli("score", str(pairs_jsonl), "-o", str(gpu), "-m", ce_model, "--device", "cuda:0")
    assert code == 0, err
    assert f"rerank: cuda:0: cross-encoder in bf16 ({precision.reason}); batches of up to" in err, err
    assert err.strip().splitlines()[-1].endswith("on cuda:0, bf16"), err
    code, _, err = cli("score", str(pairs_jsonl), "-o", str(cpu), "-m", ce_model, "--device", "cpu")
    assert code == 0, err
    got, want = score_column(gpu), score_column(cpu)
    assert np.corrcoef(got, want)[0, 1] > 0.99 and np.abs(got - want).max() < 0.1  # bf16 vs fp32 (CPU: 2e-2)
