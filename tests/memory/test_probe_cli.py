"""Memory end to end through the real CLI: back-off under injected OOM, probe-memory, its cache, --estimate."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

KEYS = {"device", "dtype", "max_length", "max_batch_tokens", "max_batch_size", "peak_memory_bytes"}


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RERANK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("RERANK_FAULT_OOM_TOKENS", raising=False)
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def pairs_500(tmp_path_factory):
    from rerank_cli.model.tiny import write_pairs

    return write_pairs(tmp_path_factory.mktemp("p500") / "pairs.parquet", 500, seed=11)


def test_backoff_under_injected_oom_gives_the_same_scores(cli, ce_model, pairs_500, tmp_path, monkeypatch):
    free, tight = tmp_path / "free.parquet", tmp_path / "tight.parquet"
    code, _, err = cli("score", str(pairs_500), "-o", str(free), "-m", ce_model)
    assert code == 0 and "back-off" not in err, err
    monkeypatch.setenv("RERANK_FAULT_OOM_TOKENS", "1500")
    code, _, err = cli("score", str(pairs_500), "-o", str(tight), "-m", ce_model)
    assert code == 0, err
    assert "cpu: out of memory at 2048 tokens; backing off to 1024" in err
    assert err.count("backing off") == 1  # said once per device
    summary = err.strip().splitlines()[-1]
    assert "scored 500 pairs" in summary and "out-of-memory back-offs" in summary
    src, one, two = pq.read_table(pairs_500), pq.read_table(free), pq.read_table(tight)
    assert two.drop_columns(["score"]).equals(src)  # no row lost, duplicated or reordered
    # Same rows in differently shaped batches: fp32 kernels may round the last bit differently.
    np.testing.assert_allclose(two.column("score").to_numpy(), one.column("score").to_numpy(), rtol=0, atol=1e-5)


def test_a_pair_too_large_alone_is_a_clear_error(cli, llm_model, tmp_path, monkeypatch):
    src = tmp_path / "pairs.jsonl"
    rows = [("short one", "tiny passage"), ("a question", "word " * 400), ("another", "small text")]
    src.write_text("".join(json.dumps({"query": q, "passage": p}) + "\n" for q, p in rows))
    out = tmp_path / "out.jsonl"
    monkeypatch.setenv("RERANK_FAULT_OOM_TOKENS", "300")
    code, _, err = cli("score", str(src), "-o", str(out), "-m", llm_model)
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: row 2 (") and "does not fit in memory on cpu even alone" in last
    assert "--max-length" in last and "--dtype bf16" in last
    assert not out.exists()


def test_probe_memory_json_under_injected_oom_then_score_starts_from_it(cli, ce_model, pairs_jsonl, tmp_path,
                                                                        monkeypatch, cache_dir):
    monkeypatch.setenv("RERANK_FAULT_OOM_TOKENS", "6000")
    code, out, err = cli("probe-memory", "--model", ce_model, "--device", "cpu", "--max-length", "512", "--json")
    assert code == 0, err
    (result,) = json.loads(out)
    assert KEYS <= set(result)
    assert result["device"] == "cpu" and result["dtype"] == "fp32" and result["max_length"] == 512
    assert 3000 <= result["max_batch_tokens"] <= 6000
    assert result["max_batch_size"] == result["max_batch_tokens"] // 512
    assert result["peak_memory_bytes"] > result["weights_bytes"] > 0
    assert "1:ok" in err and "16:oom" in err  # doubled, then searched
    assert (cache_dir / "probe-memory.json").exists()
    code, _, err = cli("score", str(pairs_jsonl), "-o", str(tmp_path / "o.jsonl"), "-m", ce_model)
    assert code == 0, err
    assert f"batches of up to {result['max_batch_tokens']} padded tokens (from probe cache" in err
    assert "backing off" not in err  # the measured budget already fits


def test_probe_memory_table(cli, llm_model, monkeypatch):
    monkeypatch.setenv("RERANK_FAULT_OOM_TOKENS", "4000")
    code, out, err = cli("probe-memory", "-m", llm_model, "--device", "cpu", "--max-length", "128", "--headroom", "0.2")
    assert code == 0, err
    for heading in ("device", "name", "total memory", "dtype", "max batch tokens", "max batch size", "peak memory"):
        assert heading in out
    assert "cpu: dtype fp32: cpu:" in out and "limit: ran out of memory" in out and "torch.profiler" in out
    assert "cpu: llm in fp32" in err


def test_probe_memory_on_cpu_stops_at_its_cap(cli, ce_model, monkeypatch):
    from rerank_cli.memory import probe

    monkeypatch.setattr(probe, "CPU_MAX_TOKENS", 4000)  # 65536 in real runs; smaller keeps the test fast
    code, out, err = cli("probe-memory", "-m", ce_model, "--device", "cpu", "--max-length", "64", "--json")
    assert code == 0, err
    (result,) = json.loads(out)
    assert (result["bound"], result["max_batch_size"], result["max_batch_tokens"]) == ("cap", 62, 62 * 64)
    assert "1:ok 2:ok 4:ok 8:ok 16:ok 32:ok 62:ok;" in err  # doubled, then the cap itself


def test_estimate_from_the_config_alone(cli, llm_model, ce_model):
    code, out, err = cli("probe-memory", "-m", llm_model, "--estimate", "--memory", "80GiB", "--json")
    assert code == 0, err
    (est,) = json.loads(out)
    assert KEYS <= set(est) and est["estimated"] is True
    assert est["device"] == "cuda" and est["dtype"] == "bf16" and est["total_memory_bytes"] == 80 << 30
    assert est["max_batch_tokens"] == est["max_batch_size"] * 512 > 0
    assert est["full_vocab_logits_bytes_per_token"] > 0  # the LLM head cost it does not pay
    code, out, err = cli("probe-memory", "-m", ce_model, "--estimate", "--memory", "24GB")
    assert code == 0, err
    assert "estimated from the config" in out and "assumed: a GPU with bf16" in out


def test_estimate_agrees_with_the_probe(cli, ce_model, monkeypatch):
    """Activation bytes per token: measured by the probe vs worked out from the config (both fp32, CPU)."""
    code, out, _ = cli("probe-memory", "-m", ce_model, "--device", "cpu", "--estimate", "--json")
    (est,) = json.loads(out)
    monkeypatch.setenv("RERANK_FAULT_OOM_TOKENS", "6000")
    code, out, err = cli("probe-memory", "-m", ce_model, "--device", "cpu", "--json")
    assert code == 0, err
    (got,) = json.loads(out)
    measured = (got["peak_memory_bytes"] - got["weights_bytes"]) / got["max_batch_tokens"]
    assert abs(est["activation_bytes_per_token"] / measured - 1) <= 0.10, (est, got)
    assert abs(est["weights_bytes"] / got["weights_bytes"] - 1) <= 0.02  # parameters vs parameters + buffers


@pytest.mark.parametrize("args,message", [
    (["--headroom", "1.5"], "error: --headroom must be at least 0 and below 1"),
    (["--estimate", "--memory", "lots"], "error: --memory must look like 80GiB"),
    (["--memory", "80GiB"], "error: --memory is for --estimate"),
    (["--device", "cpu", "--devices", "cpu"], "error: use --device or --devices, not both"),
    (["--device", "cuda:0", "--dtype", "bf16"], "error: cuda:0: CUDA is not available"),
])
def test_probe_memory_bad_flags(cli, ce_model, args, message):
    import torch

    if "cuda:0" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, out, err = cli("probe-memory", "-m", ce_model, *args)
    assert code == 2 and message in err and out == ""
