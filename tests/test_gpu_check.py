"""`make gpu-check` cannot rot: its smoke run (CPU, tiny shapes) goes end to end and writes every section.

The same script runs the real check on a lent GPU; here `--smoke` hides any GPU, so this test is a CPU
test everywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

HEADINGS = ["# rerank gpu-check", "## Summary", "## Targets", "## Part 1: pytest -m gpu", "## Part 2: benchmarks",
            "### Models and data", "### ce-ours", "### ce-st", "### llm-ours", "### llm-st", "### llm-card",
            "### probe", "### cli", "## Environment", "## Steps", "## Notes"]


@pytest.mark.slow
def test_the_smoke_run_goes_end_to_end_and_writes_every_section(tmp_path):
    from gpu_report import SECTIONS  # benchmarks/ is put on sys.path below

    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", str(out), "--smoke", "--pairs", "48",
                           "--budget", "150", "--work", str(tmp_path / "work")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "smoke run" in proc.stdout
    if not torch.cuda.is_available():
        assert "no CUDA: smoke run" in proc.stdout or "--smoke" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.json", "gpu-check.log", "gpu-check.md",
                                                     "pytest-gpu.xml"]
    report = json.loads((out / "gpu-check.json").read_text())
    assert set(SECTIONS) <= set(report), set(SECTIONS) - set(report)
    steps = {s["step"]: s for s in report["steps"]}
    for step in ("env", "pytest -m gpu", "prepare", "ce-ours"):
        assert steps[step]["status"] == "ok", steps[step]
    assert not [s for s in report["steps"] if s["status"] in ("failed", "timeout")], report["steps"]
    assert report["imports"]["failed"] == {} and report["imports"]["help_exit"] == 0
    assert report["pytest"]["counts"]["skipped"] >= 9 and report["pytest"]["counts"]["failed"] == 0
    assert {t["target"].split(":")[0] for t in report["targets"]} == {"bge-m3 shape", "Qwen3-0.6B shape"}
    assert report["summary"][0]["contender"].startswith("rerank (defaults)")
    markdown = (out / "gpu-check.md").read_text()
    assert [h for h in HEADINGS if h not in markdown] == []
    assert "== rerank gpu-check: " in proc.stdout and "rerank (defaults)" in proc.stdout.split("== rerank")[-1]


@pytest.fixture(autouse=True)
def benchmarks_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))


def fake_measurement(pairs: int, seconds: float, tokens: int, padding: float, **extra) -> dict:
    return {"batch": 256, "pairs": pairs, "seconds": seconds, "pairs_per_s": pairs / seconds, "real_tokens": tokens,
            "padded_tokens": round(tokens / (1 - padding)), "tokens_per_s": tokens / seconds, "padding_share": padding,
            "peak_memory_bytes": 3 << 30, **extra}


def test_a_gpu_report_computes_mfu_and_judges_the_targets(tmp_path):
    """The GPU-only half of the report (a smoke run judges nothing), on made-up figures."""
    from gpu_report import build_report, summary_table, to_markdown

    ce, llm = 303_000_000, 440_000_000
    jobs = {"ce-ours": {"contender": "ours", "dtype": "bf16", "tuned": None,
                        "default": fake_measurement(20000, 4.0, 1_900_000, 0.03, tokenize_s=0.4)},
            "ce-st": {"contender": "st", "dtype": "bfloat16", "best": fake_measurement(20000, 10.0, 1_900_000, 0.05)},
            "llm-ours": {"contender": "ours", "dtype": "bf16", "tuned": None,
                         "default": fake_measurement(20000, 8.0, 3_400_000, 0.12, tokenize_s=0.2)}}
    report = build_report({
        "mode": "GPU run on NVIDIA H200", "smoke": False, "budget_s": 420, "elapsed_s": 401.0, "steps": [],
        "work": str(tmp_path), "pytest": {"status": "ok", "counts": {"passed": 12}, "tests": []},
        "env": {"cuda": True, "gpu": {"name": "NVIDIA H200", "spec_bf16_flops": 989e12, "measured_bf16_flops": 790e12},
                "imports": {"failed": {}}},
        "prepare": {"models": {"ce": {"non_embedding_params": ce}, "llm": {"non_embedding_params": llm}}},
        "jobs": jobs})
    first = report["summary"][0]
    assert first["contender"].startswith("rerank (defaults)") and first["pairs_per_s"] == 5000
    assert abs(first["mfu_spec"] - 2 * ce * 1_900_000 / 4.0 / 989e12) < 1e-12
    assert abs(first["vs_st"] - 2.5) < 1e-9 and abs(first["tokenize_share"] - 0.1) < 1e-9
    met = {t["target"]: t["met"] for t in report["targets"]}
    assert met["bge-m3 shape: rerank (defaults) / sentence-transformers (best batch)"] is True  # 2.5x
    assert met["bge-m3 shape: rerank pairs/s on an H200"] is True  # 5,000
    assert met["bge-m3 shape: rerank MFU (dense bf16 spec)"] is False  # 29%
    assert met["Qwen3-0.6B shape: rerank padding share"] is False  # 12%
    assert any("varlen" in n for n in report["notes"])
    assert "| bge-reranker-v2-m3 shape | rerank (defaults), batch 256 bf16 | 20000 | 5,000 |" in to_markdown(report)
    assert "MISSED" in summary_table(report)
