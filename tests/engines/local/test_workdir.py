"""Work dir, manifest and ordered merge: what makes resume and exactly-once output hold."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from rerank_cli.config import build_config
from rerank_cli.engines.local.merge import OrderedMerge
from rerank_cli.engines.local.plan import make_plan
from rerank_cli.engines.local.workdir import WorkDir, compare, fingerprint, left_by_earlier_run, write_arrow, write_part
from rerank_cli.errors import ConfigError, WorkerError


@pytest.fixture
def setup(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"query": "q", "passage": "p"}\n')
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")

    def make(**flags):
        cfg = build_config({"input": str(src), "output": str(tmp_path / "out.jsonl"), "model": str(model),
                            "devices": "cpu,cpu", **flags})
        return cfg, fingerprint(cfg, make_plan(cfg, ["cpu", "cpu"], cpu_count=2))

    return tmp_path, src, model, make


def scored(n: int, start: int = 0) -> pa.Table:
    return pa.table({"i": list(range(start, start + n)), "score": pa.array([0.5] * n, pa.float32())})


def test_default_work_dir_is_hidden_beside_the_output_and_stdout_gets_a_temporary_one(setup):
    tmp_path, _, _, make = setup
    cfg, _ = make()
    assert WorkDir.for_run(cfg).path == tmp_path / ".out.jsonl.rerank-work"
    assert WorkDir.for_run(cfg.replace(work_dir=str(tmp_path / "w"))).path == tmp_path / "w"
    temp = WorkDir.for_run(cfg.replace(output="-"))
    assert temp.temporary and temp.path.is_dir()
    temp.close()
    assert not temp.path.exists()


def test_a_rerun_with_the_same_fingerprint_resumes_from_finished_shards(setup):
    tmp_path, _, _, make = setup
    cfg, fp = make()
    wd = WorkDir.for_run(cfg)
    assert wd.open(fp).message is None
    write_part(wd.path, 0, scored(3), {"device": "cpu"})
    write_part(wd.path, 2, scored(2, 6), {"device": "cpu"})
    write_arrow(wd.input(1), scored(3, 3))
    wd.record_shards(fp, 3)
    wd.close()
    again = WorkDir.for_run(cfg)
    resume = again.open(fp)
    assert resume.done == {0: 3, 2: 2} and resume.total == 3
    assert resume.message == f"resuming: 2 of 3 shards already done ({again.path})"
    assert not again.input(1).exists()  # shard inputs are rewritten by the run that needs them
    again.finish()
    assert not again.path.exists()


def test_an_earlier_runs_work_dir_beside_the_output_is_found(setup):
    _, _, _, make = setup
    cfg, fp = make()
    assert not left_by_earlier_run(cfg)
    wd = WorkDir.for_run(cfg)
    wd.open(fp)
    wd.close()
    assert left_by_earlier_run(cfg)
    assert not left_by_earlier_run(cfg.replace(output="-"))


def test_a_damaged_part_is_not_counted_as_done(setup):
    _, _, _, make = setup
    cfg, fp = make()
    wd = WorkDir.for_run(cfg)
    wd.open(fp)
    write_part(wd.path, 0, scored(3), {})
    write_part(wd.path, 1, scored(3), {})
    write_arrow(wd.part(1), scored(2))  # the part no longer holds what its marker says
    wd.close()
    assert WorkDir.for_run(cfg).peek(fp).done == {0: 3}


def test_a_changed_setting_starts_fresh_and_says_why(setup):
    _, _, _, make = setup
    cfg, fp = make()
    wd = WorkDir.for_run(cfg)
    wd.open(fp)
    write_part(wd.path, 0, scored(3), {})
    wd.close()
    cfg2, fp2 = make(max_length=256)
    wd2 = WorkDir.for_run(cfg2)
    resume = wd2.open(fp2)
    assert resume.done == {}
    assert resume.message == f"starting fresh in {wd2.path}: --max-length changed (512 -> 256)"
    assert not wd2.part(0).exists()
    wd2.close()


def test_fingerprint_notices_input_and_model_changes(setup):
    _, src, model, make = setup
    _, fp = make()
    assert compare(fp, make()[1]) is None
    os.utime(src, ns=(1, 1))
    assert compare(fp, make()[1]) == "the input file changed since the last run (size or modification time)"
    _, fp = make()
    os.utime(model / "config.json", ns=(5, 5))
    assert compare(fp, make()[1]) == f"the model folder {model.resolve()} changed since the last run"
    _, fp = make()
    assert "the dtype changed" in compare(fp, make(dtype="bf16")[1])
    stdin = {**fp, "input": {"path": "-"}}
    assert compare(stdin, stdin) == "the input is stdin, which cannot be checked for changes"


def test_one_run_at_a_time_per_work_dir(setup):
    _, _, _, make = setup
    cfg, fp = make()
    first = WorkDir.for_run(cfg)
    first.open(fp)
    with pytest.raises(ConfigError, match="in use by another rerank run"):
        WorkDir.for_run(cfg).open(fp)
    first.close()


def test_finish_leaves_files_that_are_not_ours(setup):
    tmp_path, _, _, make = setup
    cfg, fp = make(work_dir=str(tmp_path / "mine"))
    wd = WorkDir.for_run(cfg)
    wd.open(fp)
    (wd.path / "notes.txt").write_text("keep me")
    write_part(wd.path, 0, scored(1), {})
    wd.finish()
    assert sorted(p.name for p in wd.path.iterdir()) == ["notes.txt"]


class ListWriter:
    def __init__(self):
        self.batches = []

    def write(self, batch):
        self.batches.append(batch)


def test_ordered_merge_writes_each_part_once_in_input_order(tmp_path):
    for k, start in [(0, 0), (1, 3), (2, 6)]:
        write_part(tmp_path, k, scored(3, start), {})
    writer = ListWriter()
    merge = OrderedMerge(writer, lambda k: tmp_path / f"shard-{k:06d}.out.arrow")
    merge.add(2, 3)
    assert merge.flush() == 0  # waits for 0 and 1
    merge.add(0, 3)
    assert merge.flush() == 1
    merge.add(0, 3)  # a duplicate completion is ignored
    merge.add(1, 3)
    assert merge.flush() == 2 and merge.complete(3) and merge.rows == 9
    assert sum((b.column(0).to_pylist() for b in writer.batches), []) == list(range(9))


def test_merge_refuses_a_part_with_the_wrong_row_count(tmp_path):
    write_part(tmp_path, 0, scored(3), {})
    merge = OrderedMerge(ListWriter(), lambda k: tmp_path / f"shard-{k:06d}.out.arrow")
    merge.add(0, 4)
    with pytest.raises(WorkerError, match="holds 3 rows, expected 4"):
        merge.flush()
