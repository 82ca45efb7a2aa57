"""The pure planner: CUDA_VISIBLE_DEVICES, device lists, GPU groups, threads and shards (no GPU needed)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from rerank_cli.config import build_config
from rerank_cli.engines.local.plan import (
    MIN_AUTO_SHARD,
    cut_shards,
    group_workers,
    make_plan,
    normalize_device,
    resolve_devices,
    shard_count,
    shard_size,
    visible_gpus,
)
from rerank_cli.errors import ConfigError, DeviceError
from rerank_cli.model.precision import Precision


def cfg(**flags):
    return build_config({"input": "in.jsonl", "output": "out.jsonl", "model": "m", **flags})


# --- CUDA_VISIBLE_DEVICES -------------------------------------------------------------------------


@pytest.mark.parametrize("visible, count, expected", [
    (None, 4, ["0", "1", "2", "3"]),          # unset: every GPU
    ("2,3", 2, ["2", "3"]),                   # torch already counts only the visible ones
    ("2,3", 8, ["2", "3"]),                   # or the caller passes the physical count
    ("3, 1", 2, ["3", "1"]),                  # order is CUDA's numbering order
    ("", 0, []),                              # empty hides every GPU
    ("-1", 4, []),
    ("0,-1,1", 4, ["0"]),                     # CUDA stops at the first invalid entry
    ("0,0", 4, ["0"]),                        # a repeated GPU is invalid too
    ("GPU-8f2a,MIG-1c", 2, ["GPU-8f2a", "MIG-1c"]),
])
def test_visible_gpus_follow_cuda_rules(visible, count, expected):
    assert visible_gpus(count, visible) == expected


def test_default_is_every_visible_gpu_numbered_within_the_visible_set():
    assert resolve_devices(cfg(), cuda_count=2, visible="2,3") == ["cuda:0", "cuda:1"]
    assert resolve_devices(cfg(), cuda_count=8, visible="5") == ["cuda:0"]
    assert resolve_devices(cfg(), cuda_count=3, visible=None) == ["cuda:0", "cuda:1", "cuda:2"]


def test_default_is_one_cpu_without_visible_gpus():
    assert resolve_devices(cfg(), cuda_count=0, visible=None) == ["cpu"]
    assert resolve_devices(cfg(), cuda_count=4, visible="") == ["cpu"]
    assert resolve_devices(cfg(), cuda_count=4, visible="-1") == ["cpu"]


def test_explicit_devices_are_kept_and_normalized():
    assert resolve_devices(cfg(devices="cpu,cpu"), cuda_count=0) == ["cpu", "cpu"]
    assert resolve_devices(cfg(devices="cuda,CUDA:1"), cuda_count=2, visible=None) == ["cuda:0", "cuda:1"]


def test_a_gpu_outside_the_visible_set_is_an_error_that_explains_the_numbering():
    with pytest.raises(DeviceError) as err:
        resolve_devices(cfg(devices="cuda:0,cuda:3"), cuda_count=2, visible="2,3")
    msg = str(err.value)
    assert "cuda:3: only 2 GPU(s) are visible, cuda:0 to cuda:1" in msg
    assert "CUDA_VISIBLE_DEVICES='2,3'" in msg and "cuda:0 is GPU 2" in msg


def test_asking_for_cuda_without_gpus_names_the_fix():
    with pytest.raises(DeviceError) as err:
        resolve_devices(cfg(devices="cuda:0,cuda:1"), cuda_count=0, visible=None)
    assert str(err.value) == "cuda:0,cuda:1: no CUDA device is visible; use --devices cpu"
    with pytest.raises(DeviceError, match=r"visible \(CUDA_VISIBLE_DEVICES=''\)"):
        resolve_devices(cfg(devices="cpu,cuda"), cuda_count=4, visible="")


@pytest.mark.parametrize("bad", ["tpu", "cuda:x", "cpu:1", "gpu0"])
def test_unknown_devices_are_rejected(bad):
    with pytest.raises(DeviceError, match="unknown device"):
        normalize_device(bad)


# --- workers: GPU groups and threads --------------------------------------------------------------


def test_one_worker_per_device_by_default():
    specs, notes = group_workers(["cuda:0", "cuda:1"], 1, cpu_count=16)
    assert [w.devices for w in specs] == [("cuda:0",), ("cuda:1",)]
    assert [w.index for w in specs] == [0, 1] and notes == []
    assert all(not w.is_group and w.physical == () for w in specs)


def test_gpus_per_worker_groups_consecutive_gpus_with_their_physical_ids():
    devices = [f"cuda:{i}" for i in range(4)]
    specs, notes = group_workers(devices, 2, gpu_ids=["4", "5", "6", "7"], cpu_count=16)
    assert [w.devices for w in specs] == [("cuda:0", "cuda:1"), ("cuda:2", "cuda:3")]
    assert [w.physical for w in specs] == [("4", "5"), ("6", "7")]
    assert specs[1].label == "cuda:2+cuda:3" and specs[1].device == "cuda:2" and specs[1].is_group
    assert notes == []


def test_gpus_that_do_not_fill_a_group_stay_idle_and_the_plan_says_so():
    specs, notes = group_workers(["cuda:0", "cuda:1", "cuda:2"], 2, gpu_ids=["0", "1", "2"])
    assert [w.devices for w in specs] == [("cuda:0", "cuda:1")]
    assert notes == ["cuda:2 left idle: 3 GPUs do not divide into groups of 2"]


def test_gpus_per_worker_needs_enough_gpus_and_no_cpu():
    with pytest.raises(DeviceError, match="needs at least 4 GPUs; 2 visible"):
        group_workers(["cuda:0", "cuda:1"], 4)
    with pytest.raises(ConfigError, match="drop cpu"):
        group_workers(["cpu", "cpu"], 2)


def test_cpu_workers_divide_the_cores_unless_omp_num_threads_says():
    specs, _ = group_workers(["cpu", "cpu"], cpu_count=8)
    assert [w.threads for w in specs] == [4, 4]
    specs, _ = group_workers(["cpu", "cpu", "cpu"], cpu_count=2)
    assert [w.threads for w in specs] == [1, 1, 1]
    specs, _ = group_workers(["cpu", "cpu"], cpu_count=8, omp_threads=1)
    assert [w.threads for w in specs] == [1, 1]


def test_plan_shows_grouping_dtypes_and_shards():
    plan = make_plan(cfg(devices="cuda:0,cuda:1", gpus_per_worker=2, shard_rows=100), ["cuda:0", "cuda:1"],
                     total_rows=None, visible="6,7", cuda_count=2, cpu_count=8,
                     dtype_of=lambda requested, device: Precision("bf16", f"{device} supports bf16"), accelerate=True)
    plan.total_rows = 250
    text = "\n".join(plan.lines())
    assert "plan: 1 worker(s) on 2 device(s)" in text
    assert "worker 0 (cuda:0+cuda:1), model spread over 2 GPUs (GPUs 6,7): bf16 (cuda:0 supports bf16)" in text
    assert "250 pairs in 3 shard(s) of up to 100 pairs" in text
    assert plan.headline() == "1 worker on cuda:0+cuda:1; 3 shards of up to 100 pairs, handed out as workers free up"


def test_gpu_groups_need_accelerate_and_say_how_to_get_it():
    with pytest.raises(DeviceError, match="pip install accelerate"):
        make_plan(cfg(gpus_per_worker=2), ["cuda:0", "cuda:1"], visible=None, cuda_count=2, cpu_count=8,
                  dtype_of=lambda requested, device: Precision("bf16", "x"), accelerate=False)


def test_plan_warns_when_workers_differ_in_precision():
    dtypes = {"cuda:0": Precision("bf16", "a100"), "cuda:1": Precision("fp16", "v100")}
    plan = make_plan(cfg(), ["cuda:0", "cuda:1"], visible=None, cuda_count=2, cpu_count=4,
                     dtype_of=lambda requested, device: dtypes[device])
    assert plan.dtype_names() == ["bf16", "fp16"]
    assert any("differ in precision" in n for n in plan.notes)


# --- shards -----------------------------------------------------------------------------------------


def test_shard_size_spreads_a_small_known_input_but_never_exceeds_shard_rows():
    assert shard_size(2048, None, 2) == 2048                   # unknown size: as configured
    assert shard_size(2048, 2000, 2) == 500                    # 2,000 pairs, 2 workers: 4 shards
    assert shard_size(2048, 600, 2) == MIN_AUTO_SHARD          # but not tiny ones
    assert shard_size(2048, 3000, 4) == 375
    assert shard_size(2048, 10_000_000, 8) == 2048
    assert shard_size(20, 120, 2) == 20                        # an explicit small size stays
    assert shard_count(0, 10) == 0 and shard_count(25, 10) == 3


def test_cut_shards_gives_exact_sizes_and_input_positions_across_batches():
    batches = [pa.record_batch({"i": list(range(a, b))}) for a, b in [(0, 7), (7, 8), (8, 8), (8, 23)]]
    out = list(cut_shards(iter(batches), 5))
    assert [(s.id, s.first_row, s.rows) for s, _ in out] == [(0, 1, 5), (1, 6, 5), (2, 11, 5), (3, 16, 5),
                                                              (4, 21, 3)]
    assert [t.column("i").to_pylist() for _, t in out][1] == [5, 6, 7, 8, 9]
    assert sum((t.column("i").to_pylist() for _, t in out), []) == list(range(23))
    assert out[4][0].span == "pairs 21-23"
