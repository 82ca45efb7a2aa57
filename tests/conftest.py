"""Shared fixtures: tiny models built once per session, pair files, and a CLI runner.

The whole suite runs offline (HF_HUB_OFFLINE=1) on CPU. Tests drive the real CLI, either in-process
(`cli`) or as a subprocess (`rerank_proc`) when process behaviour matters (exit codes, stdin, signals).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# The suite sees none of the caller's settings that steer a run, whatever their shell exports: no Ray
# address or credentials, no thread counts, no allocator settings, no RERANK_* (fault injection, debug,
# caches, presets). CUDA_VISIBLE_DEVICES stays: on a GPU machine it is how a user picks the GPU the
# GPU tests may use, and no CPU test depends on it.
CALLER_STATE = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "OMP_NUM_THREADS",
                "MKL_NUM_THREADS", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
for _name in [n for n in os.environ if n in CALLER_STATE or n.startswith("RERANK_")]:
    del os.environ[_name]
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
os.environ["RERANK_CACHE_DIR"] = tempfile.mkdtemp(prefix="rerank-test-cache-")  # never the user's probe cache
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    from rerank_cli.model.tiny import build_cross_encoder, build_llm

    d = tmp_path_factory.mktemp("models")
    build_cross_encoder(d / "ce")
    build_llm(d / "llm")
    return d


@pytest.fixture(scope="session")
def xlmr_model(models_dir) -> str:
    """bge-reranker-v2-m3's family: XLM-RoBERTa, Unigram tokenizer, no token types."""
    from rerank_cli.model.tiny import build_cross_encoder

    return str(build_cross_encoder(models_dir / "ce-xlmr", arch="xlm-roberta"))


@pytest.fixture(scope="session")
def gemma_model(models_dir) -> str:
    """bge-reranker-v2-gemma's family: Gemma, tied head."""
    from rerank_cli.model.tiny import build_llm

    return str(build_llm(models_dir / "llm-gemma", arch="gemma"))


@pytest.fixture(scope="session")
def ce_model(models_dir) -> str:
    return str(models_dir / "ce")


@pytest.fixture(scope="session")
def llm_model(models_dir) -> str:
    return str(models_dir / "llm")


@pytest.fixture(scope="session")
def pairs_parquet(tmp_path_factory) -> Path:
    from rerank_cli.model.tiny import write_pairs

    return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs.parquet", 120, seed=3)


@pytest.fixture(scope="session")
def pairs_jsonl(tmp_path_factory) -> Path:
    from rerank_cli.model.tiny import write_pairs

    return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", 120, seed=3)


def run_rerank(*args: str, input: bytes | None = None, env: dict | None = None, timeout: float = 240,
               cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run `python -m rerank_cli ARGS` as a user would; returns the completed process (bytes)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "rerank_cli", *args], input=input, capture_output=True,
                          env=full_env, timeout=timeout, cwd=cwd)


@pytest.fixture
def rerank_proc():
    return run_rerank


@pytest.fixture
def cli(capsys):
    """Run the real CLI entry point in-process: returns (exit code, stdout, stderr)."""
    from rerank_cli.cli import main

    def invoke(*args: str):
        capsys.readouterr()  # what this call writes, not what fixtures built before it printed
        code = 0
        try:
            main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


class ShardInterrupter:
    """Makes the local engine's Nth shard raise KeyboardInterrupt, as Ctrl-C during it would."""

    def __init__(self, monkeypatch):
        import rerank_cli.engines.local.worker as shard_worker

        self.monkeypatch, self.module, self.real, self.calls = monkeypatch, shard_worker, shard_worker.score_table, 0

    def arm(self, on_call: int = 3) -> None:
        self.calls = 0

        def interrupting(*args, **kwargs):
            self.calls += 1
            if self.calls == on_call:
                raise KeyboardInterrupt
            return self.real(*args, **kwargs)

        self.monkeypatch.setattr(self.module, "score_table", interrupting)

    def disarm(self) -> None:
        self.monkeypatch.setattr(self.module, "score_table", self.real)


@pytest.fixture
def interrupt_shards(monkeypatch) -> ShardInterrupter:
    return ShardInterrupter(monkeypatch)
