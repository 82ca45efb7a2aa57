"""Throughput and start-up overhead of `--engine ray` against the local engine, on one CPU job.

    python benchmarks/bench_ray.py [--pairs 1000] [--size bench] [--repeats 2] [--work bench-out/ray]

Every run is a whole `rerank score` process (load, read, score, write) on the same model and pairs,
the three set-ups alternated in each round:

  local          the local engine (one device, inline)
  ray-new        --engine ray with no address: starts a local Ray cluster for the run, stops it after
  ray-running    --engine ray joining a cluster that is already up (`ray start --head --block`)

Per run: wall seconds and pairs/s over the whole process, the seconds Ray took to start or connect
(its `ray: ... in X s` line), and the seconds until the first scored row reached stdout (`-o -`,
windows of --window pairs), which for Ray includes Ray Data's start and the actors' model loads.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = re.compile(r"scored (\d+) pairs in ([\d.]+) s")
RAY_UP = re.compile(r"ray: (?:started a local Ray cluster|connected to Ray at \S+) in ([\d.]+) s")


def prepare(work: Path, size: str, pairs: int) -> tuple[Path, Path]:
    """The model and the pair file (built once with rerank_cli.model.tiny, then reused)."""
    model, data = work / f"{size}-ce", work / f"pairs-{pairs}.parquet"
    if not model.exists() or not data.exists():
        sys.path.insert(0, str(ROOT))
        from rerank_cli.model.tiny import build_cross_encoder, write_pairs

        work.mkdir(parents=True, exist_ok=True)
        build_cross_encoder(model, size)
        write_pairs(data, pairs, seed=7)
    return model, data


def run_once(args: list[str], env: dict) -> dict:
    """One `rerank score ... -o -` process: wall time, time to the first output row, its stderr."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "rerank_cli", "score", *args, "-o", "-"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    err: list[bytes] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()))
    reader.start()
    first, rows = None, 0
    for _ in proc.stdout:
        first = first or time.perf_counter() - started
        rows += 1
    proc.wait()
    reader.join()
    wall = time.perf_counter() - started
    text = err[0].decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"rerank {' '.join(args)} failed ({proc.returncode}):\n{text}")
    up = RAY_UP.search(text)
    return {"wall": wall, "rows": rows, "first_row": first or wall, "ray_up": float(up.group(1)) if up else None}


class Head:
    """A Ray head node for the run (`ray start --head --block`), stopped by its pid."""

    def __init__(self, cpus: int, env: dict):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = open(os.devnull, "wb")
        ray = Path(sys.executable).with_name("ray")
        self.proc = subprocess.Popen(
            [str(ray), "start", "--head", "--block", f"--port={self.port}", "--node-ip-address=127.0.0.1",
             f"--num-cpus={cpus}", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})
        for line in self.proc.stdout:
            if b"Ray runtime started" in line:
                break
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--size", choices=["tiny", "bench"], default="bench")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--window", type=int, default=256, help="--sort-window for every run")
    ap.add_argument("--work", type=Path, default=ROOT / "bench-out" / "ray")
    a = ap.parse_args(argv)
    model, data = prepare(a.work, a.size, a.pairs)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "RAY_USAGE_STATS_ENABLED": "0"}
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    common = [str(data), "-m", str(model), "--dtype", "fp32", "--sort-window", str(a.window)]
    cpus = os.cpu_count() or 2
    # The head runs with a token of its own and ray-running joins with it, as a user joins a cluster:
    # nothing in ~/.ray is read or written (a fresh HOME has no token there).
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    head = Head(cpus, {**env, **auth})
    setups = {
        "local": (common, env),
        "ray-new": ([*common, "--engine", "ray"], env),
        "ray-running": ([*common, "--engine", "ray"], {**env, "RAY_ADDRESS": head.address, **auth}),
    }
    results: dict[str, list[dict]] = {name: [] for name in setups}
    try:
        for round_ in range(a.repeats):
            for name, (args, run_env) in setups.items():
                r = run_once(args, run_env)
                assert r["rows"] == a.pairs, (name, r)
                results[name].append(r)
                print(f"round {round_ + 1} {name:12} wall {r['wall']:6.2f} s  first row {r['first_row']:6.2f} s"
                      + (f"  ray up {r['ray_up']:.2f} s" if r["ray_up"] is not None else ""), flush=True)
    finally:
        head.stop()
    report(results, a, cpus)


def report(results: dict[str, list[dict]], a, cpus: int) -> None:
    """Medians; "after first row" is the rate once scoring runs (rows after the first window over the
    seconds after it), which separates throughput from start-up."""
    print(f"\n{a.pairs} pairs, {a.size} cross-encoder, fp32, --sort-window {a.window}, {cpus} CPUs; "
          f"median of {a.repeats} whole-process runs")
    print("| set-up       | wall s | pairs/s | first row s | pairs/s after first row | ray start/connect s |")
    print("|--------------|--------|---------|-------------|-------------------------|---------------------|")
    for name, runs in results.items():
        wall = statistics.median(r["wall"] for r in runs)
        first = statistics.median(r["first_row"] for r in runs)
        after = a.pairs - a.window  # rows after the first window: none when one window holds them all
        steady = f"{statistics.median(after / max(1e-9, r['wall'] - r['first_row']) for r in runs):.1f}" \
            if after > 0 else "-"
        ups = [r["ray_up"] for r in runs if r["ray_up"] is not None]
        up = f"{statistics.median(ups):.2f}" if ups else "-"
        print(f"| {name:12} | {wall:6.2f} | {a.pairs / wall:7.1f} | {first:11.2f} | {steady:>23} | {up:>19} |")


if __name__ == "__main__":
    main()
