"""Nothing the user wrote is changed: every path a run writes is checked against what it reads and
writes, however spelled; the final rename never clobbers a newcomer; devices are written into; stale
temporary files of dead runs are removed, a live run's are not."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rerank_cli.errors import OutputError
from rerank_cli.io.atomic import AtomicFile, remove_stale
from tests.cli.test_bad_input import GOOD, _assert_clean_failure, _jsonl


@pytest.fixture
def src(tmp_path):
    return _jsonl(tmp_path / "in.jsonl", [GOOD, {"query": "q"}, GOOD])


def _only(folder, *names):
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


@pytest.mark.parametrize("spell", ["{d}/in.jsonl", "{d}/./in.jsonl", "{d}/link.jsonl", "{d}/hard.jsonl"])
def test_rejects_or_output_over_the_input_is_refused_however_spelled(cli, ce_model, src, tmp_path, spell):
    os.symlink(src, tmp_path / "link.jsonl")
    os.link(src, tmp_path / "hard.jsonl")
    before = src.read_bytes()
    target = spell.format(d=tmp_path)
    code, _, err = cli("score", str(src), "-o", str(tmp_path / "out.jsonl"), "-m", ce_model, "--on-bad-row", "skip",
                       "--rejects", target, "--overwrite")
    assert code == 2 and err == f"error: {target}: refusing to write over the input file (as the rejects file); " \
                                "choose another path\n"
    code, _, err = cli("score", str(src), "-o", target, "-m", ce_model, "--overwrite")
    assert code == 2 and err == f"error: {target}: refusing to write over the input file (as the output); " \
                                "choose another path\n"
    assert src.read_bytes() == before
    _only(tmp_path, "in.jsonl", "link.jsonl", "hard.jsonl")


def test_output_and_rejects_are_not_the_same_file(cli, ce_model, src, tmp_path):
    out = tmp_path / "out.jsonl"
    code, _, err = cli("score", str(src), "-o", str(out), "-m", ce_model, "--on-bad-row", "skip",
                       "--rejects", f"{tmp_path}/./out.jsonl")
    assert code == 2 and err == (f"error: {tmp_path}/./out.jsonl: the rejects file and the output are the same "
                                 "file; give them different paths\n")
    _only(tmp_path, "in.jsonl")


def test_work_dir_that_is_or_would_clear_an_input_is_refused(cli, ce_model, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    src = _jsonl(work / "shard-000000.in.arrow.jsonl", [GOOD])
    before = src.read_bytes()
    out = tmp_path / "out.jsonl"
    code, _, err = cli("score", str(src), "-o", str(out), "-m", ce_model, "--work-dir", str(work))
    assert code == 2 and err == (f"error: {src}: the input is in the work dir {work} under a name the work dir "
                                 "uses for its own files; choose another --work-dir\n")
    code, _, err = cli("score", str(src), "-o", str(out), "-m", ce_model, "--work-dir", str(src))
    assert code == 2 and err == f"error: work dir {src}: exists and is not a folder\n"
    assert src.read_bytes() == before
    _only(work, src.name)
    assert not out.exists()


def test_rank_refuses_its_input_as_output(cli, tmp_path):
    src = _jsonl(tmp_path / "s.jsonl", [{"query": "q", "passage": "p", "score": 1.0}])
    os.symlink(src, tmp_path / "link.jsonl")
    code, _, err = cli("rank", str(src), "-o", str(tmp_path / "link.jsonl"), "--overwrite")
    assert code == 2 and "refusing to write over the input file" in err
    assert json.loads(src.read_text())["score"] == 1.0


def test_unwritable_output_or_rejects_folder_is_one_line(cli, ce_model, src, tmp_path):
    (tmp_path / "afile").write_text("x")
    for flags, bad in ((["-o", f"{tmp_path}/afile/out.jsonl"], f"{tmp_path}/afile/out.jsonl"),
                       (["-o", f"{tmp_path}/out.jsonl", "--on-bad-row", "skip", "--rejects",
                         f"{tmp_path}/afile/r.jsonl"], f"{tmp_path}/afile/r.jsonl")):
        code, _, err = cli("score", str(src), *flags, "-m", ce_model)
        assert code == 2 and err == f"error: {bad}: '{tmp_path}/afile' is not a folder\n"
    _only(tmp_path, "in.jsonl", "afile")


def test_final_rename_does_not_clobber_a_file_that_appeared(tmp_path):
    target = tmp_path / "out.jsonl"
    atomic = AtomicFile(target)
    atomic.open().close()
    target.write_text("another run's output\n")  # appeared while "we" were writing
    with pytest.raises(OutputError, match="a file appeared there while this run was writing it"):
        atomic.commit()
    assert target.read_text() == "another run's output\n"
    _only(tmp_path, "out.jsonl")
    atomic = AtomicFile(target, overwrite=True)  # --overwrite: replacing is what was asked
    with atomic.open() as fh:
        fh.write(b"new\n")
    atomic.commit()
    assert target.read_text() == "new\n"


def test_output_appearing_during_a_run_is_kept(cli, ce_model, src, tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    from rerank_cli.io import writers

    real = writers.JsonlWriter._write

    def write_then_race(self, batch):  # another process creates the output while we score
        real(self, batch)
        if not out.exists():
            out.write_text("theirs\n")

    monkeypatch.setattr(writers.JsonlWriter, "_write", write_then_race)
    code, _, err = cli("score", str(src), "-o", str(out), "-m", ce_model, "--on-bad-row", "skip", "-q")
    assert code == 2 and err.endswith("a file appeared there while this run was writing it (another run?); it "
                                      "was left as it is; pass --overwrite to replace it\n")
    assert out.read_text() == "theirs\n"
    _only(tmp_path, "in.jsonl", "out.jsonl")  # no temporary file, and no rejects file from a failed run


def test_device_output_is_written_into(cli, ce_model, src, tmp_path):
    code, _, err = cli("score", str(src), "-o", "/dev/null", "-m", ce_model, "--on-bad-row", "skip",
                       "--rejects", "/dev/null")
    assert code == 0, err  # written into, not replaced: two outputs may share a device
    code, _, err = cli("score", str(src), "-o", "/dev/null", "-m", ce_model, "--on-bad-row", "skip",
                       "--rejects", str(tmp_path / "bad.jsonl"))
    assert code == 0, err
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")
    assert len((tmp_path / "bad.jsonl").read_text().splitlines()) == 1
    _only(tmp_path, "in.jsonl", "bad.jsonl")


def test_disk_full_is_one_line_and_leaves_nothing(cli, ce_model, src, tmp_path):
    code, _, err = cli("score", str(src), "-o", "/dev/full", "-m", ce_model, "-q", "--on-bad-row", "skip",
                       "--rejects", str(tmp_path / "bad.jsonl"))
    assert (code, err) == (2, "error: /dev/full: cannot write (no space left on device)\n")
    _only(tmp_path, "in.jsonl")  # the rejects of a failed run are not kept
    out = tmp_path / "out.jsonl"
    code, _, err = cli("score", str(src), "-o", str(out), "-m", ce_model, "-q", "--on-bad-row", "skip",
                       "--rejects", "/dev/full")
    assert (code, err) == (2, "error: /dev/full: cannot write (no space left on device)\n")
    _only(tmp_path, "in.jsonl")


def test_disk_full_on_a_temporary_file_removes_it(cli, ce_model, src, tmp_path, monkeypatch):
    import errno

    from rerank_cli.io import writers

    def full(self, batch):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writers.ParquetWriter, "_write", full)
    out = tmp_path / "out.parquet"
    code, _, err = cli("score", str(src), "-o", str(out), "-m", ce_model, "-q", "--on-bad-row", "skip")
    _assert_clean_failure(code, err, out, f"error: {out}: cannot write (no space left on device)")
    _only(tmp_path, "in.jsonl")


def test_stale_temporary_files_of_dead_runs_are_removed_not_live_ones(cli, ce_model, src, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid in (dead.pid, live.pid):
            (tmp_path / f".out.jsonl.rerank-tmp-{pid}").write_text("partial")
            (tmp_path / f".out.jsonl.rejects.jsonl.rerank-tmp-{pid}").write_text("partial")
        code, _, err = cli("score", str(src), "-o", str(tmp_path / "out.jsonl"), "-m", ce_model, "-q",
                           "--on-bad-row", "skip")
        assert code == 0, err
        _only(tmp_path, "in.jsonl", "out.jsonl", "out.jsonl.rejects.jsonl", f".out.jsonl.rerank-tmp-{live.pid}",
              f".out.jsonl.rejects.jsonl.rerank-tmp-{live.pid}")
    finally:
        live.kill()
        live.wait()
    assert remove_stale(tmp_path / "out.jsonl") == [tmp_path / f".out.jsonl.rerank-tmp-{live.pid}"]


def test_sigkilled_run_leaves_a_temporary_file_that_the_next_run_removes(ce_model, src, tmp_path):
    from tests.conftest import ROOT

    out = tmp_path / "out.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    big = _jsonl(tmp_path / "big.jsonl", [GOOD] * 3000)
    proc = subprocess.Popen([sys.executable, "-m", "rerank_cli", "score", str(big), "-o", str(out), "-m", ce_model,
                             "-q", "--sort-window", "100"], env=env, stderr=subprocess.PIPE)
    import time

    deadline = time.time() + 120
    while not list(tmp_path.glob(".out.jsonl.rerank-tmp-*")) and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert list(tmp_path.glob(".out.jsonl.rerank-tmp-*")), "the run never started writing"
    proc = subprocess.run([sys.executable, "-m", "rerank_cli", "score", str(src), "-o", str(out), "-m", ce_model,
                           "-q", "--on-bad-row", "skip"], env=env, capture_output=True)
    assert proc.returncode == 0, proc.stderr
    _only(tmp_path, "in.jsonl", "big.jsonl", "out.jsonl", "out.jsonl.rejects.jsonl")


def test_ray_output_dir_holding_the_input_is_not_replaced(tmp_path):
    from rerank_cli.engines.ray.io import check_output_dir

    folder = tmp_path / "parts"
    folder.mkdir()
    src = _jsonl(folder / "in.jsonl", [GOOD])
    with pytest.raises(OutputError, match="--output-dir holds .*in.jsonl, which replacing the folder would remove"):
        check_output_dir(f"{tmp_path}/./parts", True, [str(src)])
    check_output_dir(str(tmp_path / "other"), True, [str(src)])  # elsewhere: fine
    assert src.exists()
