"""Peak memory does not grow with the number of pairs (streaming read, score, write)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _peak_rss_kb(args: list[str]) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rerank_cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, proc.stderr.read().decode()
    return usage.ru_maxrss


@pytest.mark.slow
def test_peak_memory_flat_from_2k_to_200k_pairs(ce_model, tmp_path):
    big = tmp_path / "big.jsonl"
    with open(big, "w") as fh:
        for i in range(200_000):
            fh.write(json.dumps({"id": i, "query": f"what is ka {i % 97}", "passage": "ri to an el " * (1 + i % 4)})
                     + "\n")
    small = tmp_path / "small.jsonl"
    with open(big) as src, open(small, "w") as dst:
        dst.writelines(line for _, line in zip(range(2000), src))
    peaks = {}
    for name, path in (("small", small), ("big", big)):
        peaks[name] = _peak_rss_kb(["score", str(path), "-o", str(tmp_path / f"{name}.parquet"),
                                    "-m", ce_model, "-q"])
    assert peaks["big"] <= 1.3 * peaks["small"], peaks
    import pyarrow.parquet as pq

    ids = pq.read_table(tmp_path / "big.parquet", columns=["id"]).column("id").to_pylist()
    assert ids == list(range(200_000))
