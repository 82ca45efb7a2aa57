"""`--no-share-prefix` and the summary's saved-tokens count, through the real CLI (inline and workers)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest


@pytest.fixture
def ranking(tmp_path):
    """3 queries x 6 candidates, as a reranking run's input: one query's candidates share its prefix."""
    path = tmp_path / "run.jsonl"
    with path.open("w") as f:
        for q in range(3):
            for p in range(6):
                passage = " ".join(["ka ri to", "an el mo", "su ne la"][p % 3] for _ in range(1 + p))
                f.write(json.dumps({"query": f"query {q}: what is ri to an el {q}?", "passage": passage}) + "\n")
    return path


def _scores(path) -> np.ndarray:
    return np.array([json.loads(line)["score"] for line in path.read_text().splitlines()])


SAVED = re.compile(r"shared prefixes saved ([\d,]+) tokens \((\d+)% of ([\d,]+)\)")


@pytest.mark.parametrize("engine", [[], ["--devices", "cpu,cpu", "--shard-rows", "6"]], ids=["inline", "workers"])
def test_sharing_saves_tokens_says_so_and_scores_as_no_share_prefix(cli, llm_model, ranking, tmp_path, engine):
    runs = {}
    for flag in ("--share-prefix", "--no-share-prefix"):
        out = tmp_path / f"out{flag}.jsonl"
        code, _, err = cli("score", str(ranking), "-o", str(out), "-m", llm_model, "--template", "qwen3", flag,
                           *engine)
        assert code == 0, err
        runs[flag] = (_scores(out), err)
    np.testing.assert_allclose(runs["--share-prefix"][0], runs["--no-share-prefix"][0], atol=1e-4, rtol=0)
    saved = SAVED.search(runs["--share-prefix"][1])
    assert saved, runs["--share-prefix"][1]
    assert 0 < int(saved.group(1).replace(",", "")) < int(saved.group(3).replace(",", ""))
    assert "shared prefixes" not in runs["--no-share-prefix"][1]


def test_share_prefix_in_a_config_file(cli, llm_model, ranking, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("share_prefix = false\n")
    code, _, err = cli("score", str(ranking), "-o", str(tmp_path / "o.jsonl"), "-m", llm_model, "--config",
                       str(config))
    assert code == 0 and "shared prefixes" not in err
    config.write_text('share_prefix = "no"\n')
    code, _, err = cli("score", str(ranking), "-o", str(tmp_path / "o2.jsonl"), "-m", llm_model, "--config",
                       str(config))
    assert code == 2 and "share_prefix must be true or false" in err
