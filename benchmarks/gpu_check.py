"""`make gpu-check`: verify and measure everything GPU-only in one call of at most 8 minutes.

    python3 benchmarks/gpu_check.py OUT [--budget 420] [--smoke] [--pairs N] [--work DIR]

Runs from a bare checkout with the machine's own python (this file puts the checkout on sys.path and
PYTHONPATH; nothing is installed or fetched). Each step runs in its own process, in priority order,
with a time limit cut from one global budget; a step that fails, times out or does not fit is
recorded as such and the others still run:

1. env: versions, the GPU, a measured bf16 matmul rate, every rerank_cli module imported, `--help`;
2. Part 1, `pytest -m gpu`, while the Part 2 models are built beside it;
3. Part 2, benchmarks on random-weight models of real shapes: rerank and sentence-transformers'
   CrossEncoder on bge-reranker-v2-m3's shape; rerank, sentence-transformers' causal-LM CrossEncoder
   and the model card's transformers loop on Qwen3-Reranker-0.6B's; probe-memory on both; the whole
   `rerank score` command;
4. Part 3, the reports: OUT/gpu-check.json, OUT/gpu-check.md, OUT/gpu-check.log (every step's
   output), OUT/pytest-gpu.xml, and the summary table printed last.

Without CUDA (or with --smoke, which hides it) the same steps run on the CPU with tiny shapes and say
`no CUDA: smoke run`. Exit status 1 if a step failed or timed out; a missed target is reported, not failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from gpu_report import build_report, summary_table, write_reports  # noqa: E402

RESERVE_S = 12  # kept back for the reports
GRACE_S = 10  # a job past its own deadline gets this long before it is killed
# (step, job, kind, most seconds on a GPU, fewest worth starting); in a smoke run a fifth of each
BENCH = [("ce-ours", "ours", "ce", 75, 25), ("ce-st", "st", "ce", 90, 30), ("llm-ours", "ours", "llm", 75, 25),
         ("llm-st", "st", "llm", 90, 30), ("llm-card", "card", "llm", 75, 30), ("probe", "probe", "ce", 60, 25),
         ("cli", "cli", "ce", 50, 25)]


class Runner:
    """Runs steps as child processes against one budget, logging their output, recording each outcome."""

    def __init__(self, out: Path, work: Path, budget: float, env: dict, extra: list[str]):
        self.out, self.work, self.env, self.extra = out, work, env, extra
        self.started = time.monotonic()
        self.end = self.started + budget
        self.log = open(out / "gpu-check.log", "w", encoding="utf-8")
        self.steps: list[dict] = []

    def left(self) -> float:
        return self.end - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def say(self, text: str) -> None:
        print(f"[{self.elapsed():5.0f}s] {text}", flush=True)
        self.log.write(f"\n[{self.elapsed():5.0f}s] {text}\n")
        self.log.flush()

    def limit(self, name: str, max_s: float, min_s: float) -> float | None:
        """Seconds the step may take, or None (recorded as skipped) if fewer than `min_s` are left."""
        limit = min(max_s, self.left() - RESERVE_S - GRACE_S)
        if limit < min_s:
            self.record(name, "skipped", 0.0, f"out of budget: {max(0, self.left()):.0f} s left, needs {min_s:.0f}")
            return None
        return limit

    def start(self, name: str, cmd: list[str], limit: float, env: dict | None = None) -> dict:
        self.say(f"{name}: started (limit {limit:.0f} s)")
        self.log.write(f"$ {' '.join(cmd)}\n")
        self.log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**self.env, **(env or {})}, stdout=self.log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        return {"name": name, "proc": proc, "limit": limit, "t0": time.monotonic()}

    def wait(self, handle: dict | None) -> bool:
        """Wait for a started step (killing it past its limit); True if it exited 0."""
        if handle is None:
            return False
        proc, name = handle["proc"], handle["name"]
        try:
            code = proc.wait(timeout=max(1.0, handle["limit"] + GRACE_S - (time.monotonic() - handle["t0"])))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the step's own process group (start_new_session): it and its workers
            proc.wait()
            self.record(name, "timeout", time.monotonic() - handle["t0"], f"killed after {handle['limit']:.0f} s")
            return False
        seconds = time.monotonic() - handle["t0"]
        self.record(name, "ok" if code == 0 else "failed", seconds, "" if code == 0 else self.last_error(name, code))
        return code == 0

    def job(self, name: str, job: str, max_s: float, min_s: float, kind: str = "ce", env: dict | None = None,
            args: tuple[str, ...] = ()):
        """Start `gpu_jobs.py JOB` -> (handle or None, where its JSON result will be)."""
        result = self.work / f"{name.split()[0]}.json"
        result.unlink(missing_ok=True)
        limit = self.limit(name, max_s, min_s)
        if limit is None:
            return None, result
        cmd = [sys.executable, str(HERE / "gpu_jobs.py"), job, "--work", str(self.work), "--result", str(result),
               "--kind", kind, "--deadline", f"{time.time() + limit:.0f}", *self.extra, *args]
        return self.start(name, cmd, limit, env), result

    def collect(self, started) -> dict | None:
        handle, result = started
        ok = self.wait(handle)
        found = json.loads(result.read_text()) if ok and result.exists() else None
        if found is not None and isinstance(found.get("skipped"), str):  # the job found no time to do its work
            self.steps[-1].update(status="skipped", error=found["skipped"])
        return found

    def record(self, name: str, status: str, seconds: float, error: str = "") -> None:
        self.steps.append({"step": name, "status": status, "seconds": round(seconds, 1), "error": error})
        self.say(f"{name}: {status} in {seconds:.0f} s{': ' + error if error else ''}")

    def last_error(self, name: str, code: int) -> str:
        """The last line of the step's output that looks like an error."""
        self.log.flush()
        lines = (self.out / "gpu-check.log").read_text(encoding="utf-8", errors="replace").splitlines()
        mine = lines[max(i for i, line in enumerate(lines) if f"] {name}: started" in line):]
        errors = [line for line in mine if "Error" in line or "error:" in line or "FAILED" in line]
        return f"exit {code}: {(errors or mine or [''])[-1].strip()[:300]}"


def child_env(smoke: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    if smoke:  # a CPU run, also where there is a GPU; one thread each, as the host may be shared
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return env


def run_pytest(runner: Runner, max_s: float, min_s: float) -> dict:
    """Part 1: `pytest -m gpu` over the suite; per-test outcomes from its JUnit XML."""
    xml = runner.out / "pytest-gpu.xml"
    xml.unlink(missing_ok=True)
    limit = runner.limit("pytest -m gpu", max_s, min_s)
    if limit is None:
        return {"status": "skipped"}
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests", "-q", "-rA", "-p", "no:cacheprovider",
           f"--junitxml={xml}", "--ignore", "tests/test_gpu_check.py",
           "--continue-on-collection-errors"]  # a test module this machine cannot import stops nothing else
    if importlib.util.find_spec("pytest_timeout"):
        cmd += ["--timeout", "150"]
    ok = runner.wait(runner.start("pytest -m gpu", cmd, limit, {"RERANK_GPU_CHECK": "1"}))
    return {"status": "ok" if ok else "failed", **read_junit(xml)}


def read_junit(path: Path) -> dict:
    if not path.exists():
        return {"tests": [], "counts": {}}
    tests, counts = [], {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (node.get("message") or node.text or "").strip().splitlines()[0][:300] if (
                    node.get("message") or node.text) else ""
        counts[outcome] += 1
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": round(float(case.get("time") or 0), 1), "message": message})
    return {"tests": tests, "counts": counts}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="folder for gpu-check.json, gpu-check.md, gpu-check.log, pytest-gpu.xml")
    ap.add_argument("--budget", type=float, default=None, help="seconds for everything (GPU 420, smoke 110)")
    ap.add_argument("--smoke", action="store_true", help="the CPU smoke run, even where there is a GPU")
    ap.add_argument("--pairs", type=int, default=0, help="benchmark pairs (GPU 20000, smoke 200)")
    ap.add_argument("--work", help="folder for the models and pairs (default: a temporary one, removed after)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="rerank-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    extra = (["--pairs", str(a.pairs)] if a.pairs else [])
    budget = a.budget or (110 if a.smoke else 420)
    runner = Runner(out, work, budget, child_env(a.smoke), extra + (["--smoke"] if a.smoke else []))
    env = runner.collect(runner.job("env", "env", 90, 10))
    cuda = bool(env.get("cuda")) if env else (not a.smoke and cuda_here(runner.env))
    smoke = a.smoke or not cuda
    gpu = ((env or {}).get("gpu") or {}).get("name", "a GPU (the env step failed)")
    mode = ("smoke run (--smoke: CUDA hidden), tiny shapes on the CPU" if a.smoke else
            "no CUDA: smoke run, tiny shapes on the CPU" if smoke else f"GPU run on {gpu}")
    runner.say(mode)
    if smoke and not a.smoke:
        runner.env, runner.extra = child_env(True), runner.extra + ["--smoke"]
        runner.end = min(runner.end, runner.started + (a.budget or 110))
    report = run_all(runner, smoke)
    report.update(mode=mode, smoke=smoke, env=env, budget_s=round(runner.end - runner.started),
                  elapsed_s=round(runner.elapsed(), 1), steps=runner.steps, work=str(work))
    try:
        report = build_report(report)
    except Exception as exc:  # noqa: BLE001 - never lose the measurements to a bug in the report
        import traceback

        runner.log.write(traceback.format_exc())
        report.update(report_error=repr(exc), summary=[], targets=[], parity=[], notes=[f"report failed: {exc!r}"])
    write_reports(report, out)
    runner.say(f"reports written to {out}: gpu-check.json, gpu-check.md, gpu-check.log, pytest-gpu.xml")
    runner.log.close()
    if not a.work:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    try:
        print(summary_table(report), flush=True)
    except Exception as exc:  # noqa: BLE001
        print(f"summary table failed ({exc!r}); see {out / 'gpu-check.json'}", flush=True)
        return 1
    return 1 if "report_error" in report or any(s["status"] in ("failed", "timeout") for s in runner.steps) else 0


def cuda_here(env: dict) -> bool:
    """Whether torch sees a GPU, asked on its own (when the env step could not say)."""
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"], env=env,
                           capture_output=True, text=True, timeout=120)
    return probe.stdout.strip().endswith("True")


def run_all(runner: Runner, smoke: bool) -> dict:
    """Part 1 beside the Part 2 build, then the benchmarks in priority order."""
    scale = 0.4 if smoke else 1.0
    prepare = runner.job("prepare", "prepare", 240 * scale, 20 * scale)
    pytest = run_pytest(runner, 200 * scale, 60 * scale)
    prep = runner.collect(prepare)  # also left in the work dir as prepare.json, where the jobs read it
    if prep is None:
        for name, *_ in BENCH:
            runner.record(name, "skipped", 0.0, "no models: prepare did not finish")
        return {"pytest": pytest, "prepare": None, "jobs": {}}
    bench = run_chained(runner) if smoke else {
        name: runner.collect(runner.job(name, job, max_s, min_s, kind, {"TOKENIZERS_PARALLELISM": "true"}))
        for name, job, kind, max_s, min_s in BENCH}
    return {"pytest": pytest, "prepare": prep, "jobs": bench}


def run_chained(runner: Runner) -> dict:
    """A smoke run's benchmarks, in one process (`gpu_jobs.py chain`); each step's own outcome recorded."""
    steps = ",".join(f"{name}:{job}:{kind}" for name, job, kind, *_ in BENCH)
    for name, *_ in BENCH:
        (runner.work / f"{name}.json").unlink(missing_ok=True)
    handle, _ = runner.job("benchmarks (one process)", "chain", 90, 15, env={"TOKENIZERS_PARALLELISM": "true"},
                           args=("--steps", steps))
    runner.wait(handle)
    out = {}
    for name, *_ in BENCH:
        path = runner.work / f"{name}.json"
        found = json.loads(path.read_text()) if path.exists() else None
        if found is None:
            runner.record(name, "skipped", 0.0, "not reached in the smoke run's time")
        elif "error" in found:
            runner.record(name, "failed", found.get("elapsed_s", 0.0), found["error"])
        elif isinstance(found.get("skipped"), str):
            runner.record(name, "skipped", found.get("elapsed_s", 0.0), found["skipped"])
        else:
            runner.record(name, "ok", found.get("elapsed_s", 0.0))
            out[name] = found
    return out


if __name__ == "__main__":
    sys.exit(main())
