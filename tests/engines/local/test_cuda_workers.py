"""Spawned workers on a real GPU (`pytest -m gpu`): two workers sharing cuda:0, a killed one replaced,
the device-map path of a GPU group, and CUDA_VISIBLE_DEVICES as CUDA itself applies it.

One GPU is enough: `--devices cuda:0,cuda:0` starts two workers on it, and `--gpus-per-worker 2` over
that list makes one worker whose "group" is cuda:0 twice, so the model loads through the balanced
device map (`worker._pin`) on the one GPU. `--gpus-per-worker 1` is plain pinning (no device map),
which the dry-run plan shows. With one GPU in the map, transformers places the weights itself and adds
no accelerate hooks: moving hidden states between GPUs needs a machine with two. Scores are compared
with the CPU in fp32.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch

from rerank_cli import score_file
from tests.cuda import gpu_test

PAIRS, MANY = 240, 2400
# 24 shards of 100 one-pair batches: seconds of GPU work, so the second worker is loaded long before the
# queue runs dry (with 12 small shards the first worker to load could score them all alone).
SHARDS = ["--shard-rows", "100", "--batch-size", "1"]


def pairs_with_reference(n: int, ce_model: str, tmp_path_factory) -> tuple[str, list[dict]]:
    """A pair file of `n` pairs, and its rows as scored inline on the CPU in fp32."""
    from rerank_cli.model.tiny import write_pairs

    folder = tmp_path_factory.mktemp(f"cuda-par-{n}")
    pairs, out = write_pairs(folder / "pairs.parquet", n, seed=5), folder / "cpu.jsonl"
    score_file(str(pairs), str(out), model=ce_model, devices="cpu", dtype="fp32", quiet=True)
    return str(pairs), read_rows(out)


@pytest.fixture(scope="module")
def few(ce_model, tmp_path_factory):
    return pairs_with_reference(PAIRS, ce_model, tmp_path_factory)


@pytest.fixture(scope="module")
def many(ce_model, tmp_path_factory):
    return pairs_with_reference(MANY, ce_model, tmp_path_factory)


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def assert_like_cpu(path, cpu_rows: list[dict]) -> None:
    got = read_rows(path)
    assert [r["pid"] for r in got] == [r["pid"] for r in cpu_rows]  # every row once, in input order
    # fp32 on both, but CUDA's attention kernels may round in TF32: 1e-3, where a wrong row is off by ~1
    np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in cpu_rows], rtol=1e-3, atol=1e-3)


def test_a_group_listing_one_gpu_twice_makes_it_visible_once(monkeypatch):
    from rerank_cli.engines.local.plan import WorkerSpec
    from rerank_cli.engines.local.worker import _pin

    for name in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "RAYON_NUM_THREADS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(name, "0,1")  # restored after: _pin sets them for a worker process
    threads = torch.get_num_threads()
    try:
        assert _pin(WorkerSpec(0, ("cuda:0", "cuda:0"), 1, ("3", "3"))) == ("cuda:0", "balanced")
    finally:
        torch.set_num_threads(threads)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"


@gpu_test
def test_two_workers_share_one_gpu_and_a_killed_one_is_replaced(rerank_proc, many, ce_model, tmp_path):
    pairs, cpu_rows = many
    out = tmp_path / "out.jsonl"
    proc = rerank_proc("score", pairs, "-o", str(out), "-m", ce_model, "--devices", "cuda:0,cuda:0", "--dtype",
                       "fp32", *SHARDS, env={"RERANK_FAULT_KILL": "1:2"})
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    for worker in (0, 1):
        assert f"worker {worker} (cuda:0): cross-encoder in fp32" in err, err
    assert "worker 1 (cuda:0) exited with status 86; shard" in err and "starting a replacement" in err, err
    assert "restarted 1 time(s)" in err
    done = {int(w): int(n) for w, n in re.findall(r"worker (\d) \(cuda:0\): (\d+) pairs in", err)}
    assert sum(done.values()) == MANY and min(done.values(), default=0) > 0, err  # both scored shards
    assert_like_cpu(out, cpu_rows)


@gpu_test
def test_gpus_per_worker_spreads_the_model_with_a_device_map(rerank_proc, cli, few, ce_model, tmp_path):
    pairs, cpu_rows = few
    code, plan, err = cli("score", pairs, "-o", str(tmp_path / "plan.jsonl"), "-m", ce_model, "--devices",
                          "cuda:0,cuda:0", "--gpus-per-worker", "2", "--dry-run")
    assert code == 0, err
    assert re.search(r"worker 0 \(cuda:0\+cuda:0\), model spread over 2 GPUs \(GPUs ([^,]+),\1\): bf16", plan), plan
    code, plan, err = cli("score", pairs, "-o", str(tmp_path / "plan.jsonl"), "-m", ce_model, "--devices",
                          "cuda:0,cuda:0", "--gpus-per-worker", "1", "--dry-run")
    assert code == 0 and "spread" not in plan and "worker 1 (cuda:0): bf16" in plan, plan  # 1: plain pinning
    out = tmp_path / "out.jsonl"
    proc = rerank_proc("score", pairs, "-o", str(out), "-m", ce_model, "--devices", "cuda:0,cuda:0",
                       "--gpus-per-worker", "2", "--dtype", "fp32")
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "worker 0 (cuda:0+cuda:0): cross-encoder in fp32" in err, err
    assert_like_cpu(out, cpu_rows)


@gpu_test
def test_the_device_map_path_places_the_weights_and_keeps_the_stock_layers(ce_model, few):
    import pyarrow.parquet as pq

    from rerank_cli import Reranker

    pairs, cpu_rows = few
    t = pq.read_table(pairs).to_pydict()
    reranker = Reranker(ce_model, "cuda:0", dtype="fp32", device_map="balanced")
    model = reranker.scorer.model
    assert {p.device for p in model.parameters()} == {torch.device("cuda", 0)}  # placed by the map, not .to()
    assert type(model.base_model.encoder.layer[-1]).__name__ != "FirstTokenLayer"  # not pruned under a map
    got = reranker.score(list(zip(t["query"], t["passage"])))
    np.testing.assert_allclose(got, [r["score"] for r in cpu_rows], rtol=1e-3, atol=1e-3)


@gpu_test
def test_cuda_visible_devices_is_respected(rerank_proc, few, ce_model, tmp_path):
    pairs, cpu_rows = few
    hidden = rerank_proc("score", pairs, "-o", str(tmp_path / "a.jsonl"), "-m", ce_model, "--device", "cuda:0",
                         env={"CUDA_VISIBLE_DEVICES": ""})
    assert hidden.returncode == 2
    assert hidden.stderr.decode().strip() == (
        "error: cuda:0: no CUDA device is visible (CUDA_VISIBLE_DEVICES=''); use --devices cpu")
    beyond = rerank_proc("score", pairs, "-o", str(tmp_path / "b.jsonl"), "-m", ce_model, "--device", "cuda:1",
                         env={"CUDA_VISIBLE_DEVICES": "0"})
    assert beyond.returncode == 2
    assert beyond.stderr.decode().strip() == (
        "error: cuda:1: only 1 GPU(s) are visible, cuda:0 to cuda:0 (CUDA_VISIBLE_DEVICES='0'); "
        "they are numbered within that list: cuda:0 is GPU 0")
    uuid = gpu_uuid()
    out = tmp_path / "c.jsonl"
    by_uuid = rerank_proc("score", pairs, "-o", str(out), "-m", ce_model, "--dtype", "fp32",
                          env={"CUDA_VISIBLE_DEVICES": uuid})  # no --devices: every visible GPU
    err = by_uuid.stderr.decode()
    assert by_uuid.returncode == 0, (uuid, err)
    assert "rerank: cuda:0: cross-encoder in fp32" in err and err.strip().endswith("on cuda:0, fp32"), err
    assert_like_cpu(out, cpu_rows)


def gpu_uuid() -> str:
    """CUDA_VISIBLE_DEVICES' name for this process's cuda:0 (GPU-<uuid>)."""
    uuid = str(getattr(torch.cuda.get_device_properties(0), "uuid", "") or "")
    if not uuid:
        pytest.skip("this torch does not report GPU UUIDs")
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
