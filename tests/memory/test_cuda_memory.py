"""GPU memory for real (`pytest -m gpu`): a capped process runs out of CUDA memory, backs off and loses
nothing; `rerank probe-memory` measures under the cap, the config estimate agrees with what it measured,
and a run then starts from the probed budget without backing off.

No RERANK_FAULT_OOM_TOKENS here: the out-of-memory errors come from torch's CUDA allocator.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tests.cuda import GPU, memory_cap

pytestmark = GPU

ESTIMATE_TOLERANCE = 0.15  # |estimated peak / measured peak - 1|
OOM_ALLOWANCE = 768 << 20  # what the back-off run may use; its unconstrained first batch needs ~4 GiB
PROBE_ALLOWANCE = 2 << 30


@pytest.fixture(autouse=True)
def no_fault_injection(tmp_path, monkeypatch):
    monkeypatch.delenv("RERANK_FAULT_OOM_TOKENS", raising=False)
    monkeypatch.setenv("RERANK_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def long_pairs(tmp_path_factory):
    """2,000 pairs, one in seven past 512 tokens: the first batch is ~1,950 rows x 512 at 1M tokens."""
    from rerank_cli.model.tiny import write_pairs

    return write_pairs(tmp_path_factory.mktemp("cuda-mem") / "pairs.parquet", 2000, seed=13)


@pytest.fixture(scope="module", params=["bge-reranker-v2-m3", "qwen3-reranker-0.6b"])
def real_width(request, tmp_path_factory):
    """(path, kind): the real model's widths (hidden, heads, MLP) with 4 layers and a small vocabulary,
    so activations per token are the real model's and the build takes a second."""
    from rerank_cli.model.tiny import SHAPES, build_shaped

    path = tmp_path_factory.mktemp("shaped") / request.param
    build_shaped(path, dict(SHAPES[request.param], layers=4, vocab=1024), tokenizer_vocab=1000)
    return str(path), "llm" if request.param.startswith("qwen3") else "cross-encoder"


def scores(path) -> np.ndarray:
    return pq.read_table(path).column("score").to_numpy()


def test_a_real_cuda_oom_backs_off_and_scores_equal_an_unconstrained_run(cli, ce_model, long_pairs, tmp_path):
    args = ["-m", ce_model, "--device", "cuda:0", "--dtype", "fp32", "--batch-tokens", "1000000",
            "--batch-size", "4096"]
    free, tight = tmp_path / "free.parquet", tmp_path / "tight.parquet"
    torch.cuda.reset_peak_memory_stats(0)
    code, _, err = cli("score", str(long_pairs), "-o", str(free), *args)
    assert code == 0, err
    unconstrained_peak = torch.cuda.max_memory_allocated(0)
    assert "backing off" not in err
    with memory_cap(OOM_ALLOWANCE) as cap:
        assert unconstrained_peak > cap.limit, "the cap would not bite: the test would prove nothing"
        code, _, err = cli("score", str(long_pairs), "-o", str(tight), *args)
    assert code == 0, err
    assert re.search(r"rerank: cuda:0: out of memory at \d+ tokens; backing off to \d+", err), err
    summary = err.strip().splitlines()[-1]
    assert "scored 2000 pairs" in summary and "out-of-memory back-offs" in summary, summary
    assert pq.read_table(tight).drop_columns(["score"]).equals(pq.read_table(long_pairs))  # none lost or moved
    # Same rows in differently shaped batches: kernels may round the last bits differently (fp32).
    np.testing.assert_allclose(scores(tight), scores(free), rtol=0, atol=1e-4)


def test_probe_memory_measures_under_a_cap_and_the_estimate_agrees(cli, real_width, tmp_path):
    from rerank_cli.memory.estimate import peak_bytes, shape_of
    from rerank_cli.model.load import load_config
    from rerank_cli.model.tiny import write_pairs

    model, kind = real_width
    pairs = write_pairs(tmp_path / "pairs.parquet", 300, seed=17)
    with memory_cap(PROBE_ALLOWANCE) as cap:
        code, out, err = cli("probe-memory", "-m", model, "--device", "cuda:0", "--max-length", "512", "--json")
        assert code == 0, err
        (probe,) = json.loads(out)
        code, _, scored = cli("score", str(pairs), "-o", str(tmp_path / "out.parquet"), "-m", model,
                              "--device", "cuda:0")
    assert probe["dtype"] == "bf16" and probe["bound"] == "oom", (probe, err)  # the cap, not the search cap, bound it
    measured = probe["peak_memory_bytes"] - cap.baseline
    assert probe["weights_bytes"] < measured and probe["peak_memory_bytes"] <= cap.limit, (probe, cap)
    estimated = peak_bytes(shape_of(load_config(model), kind), probe["max_batch_size"], probe["width"], "bf16")
    assert abs(estimated / measured - 1) <= ESTIMATE_TOLERANCE, (kind, estimated, measured, probe)
    assert code == 0, scored
    assert f"batches of up to {probe['max_batch_tokens']} padded tokens (from probe cache" in scored
    assert "backing off" not in scored  # the probed budget fits under the same cap
