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


_READ_PEAK = """
import resource, sys
from rerank_cli.io.readers import Columns, read_chunks
rows = sum(c.num_rows for c in read_chunks(sys.argv[1], Columns()))
print(rows, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def _reader_peak_mib(path) -> tuple[int, int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _READ_PEAK, str(path)], env=env, capture_output=True, check=True)
    rows, peak = out.stdout.split()
    return int(rows), int(peak)


def test_one_huge_parquet_row_group_is_streamed_in_record_batches(tmp_path):
    """200,000 rows of 1 KB passages written as ONE row group (about 200 MiB decoded) read in about the
    memory of 2,000 rows: the reader streams record batches, it does not decode the row group whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def write(path, n):
        passages = pa.array([f"{i} " + "lorem ipsum dolor sit amet " * 38 for i in range(n)])
        pq.write_table(pa.table({"query": pa.array(["q"] * n), "passage": passages}), path, row_group_size=n)

    write(tmp_path / "big.parquet", 200_000)
    write(tmp_path / "small.parquet", 2_000)
    assert pq.ParquetFile(tmp_path / "big.parquet").metadata.num_row_groups == 1
    rows_big, big = _reader_peak_mib(tmp_path / "big.parquet")
    rows_small, small = _reader_peak_mib(tmp_path / "small.parquet")
    assert (rows_big, rows_small) == (200_000, 2_000)
    assert big <= small + 64, (big, small)  # decoding the group whole would add about 200 MiB
