"""Benchmarks of long passages (issue: windows), on CPU.

(a) Cost per pair: `--long-passages window` against truncation, on long passages (1,000 to 3,000
    words each), with the bench-size BERT cross-encoder at --max-length 512, fp32, in one process (the
    model loaded once per mode, a warm-up first, then the best of --rounds timings of the same pairs):
    seconds per pair, windows per pair, seconds per window.
(b) Memory of one huge passage: peak RSS of a process that scores one pair whose passage is --mb MB of
    text with the tiny BERT cross-encoder (tokenization, not the model, is what a huge passage costs),
    truncating and in window mode, and with the text tokenized whole (what rerank did before
    tokenization was bounded: the same score, measured by patching the first cut to the whole text).

    python benchmarks/bench_windows.py [--pairs 24] [--rounds 1] [--mb 20]

Prints a table and writes bench-out/windows/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench-out" / "windows"
sys.path.insert(0, str(ROOT))


def setup(size: str) -> Path:
    from rerank_cli.model.tiny import build_cross_encoder

    OUT.mkdir(parents=True, exist_ok=True)
    model = OUT / f"{size}-ce"
    if not (model / "config.json").exists():
        build_cross_encoder(model, size=size)
    return model


def long_pairs(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    from rerank_cli.model.tiny import lexicon, sentence

    rng = random.Random(seed)
    words = lexicon(6000, seed)
    queries = [sentence(rng, words, rng.randint(3, 10)) + "?" for _ in range(n)]
    passages = [sentence(rng, words, rng.randint(1000, 3000)) for _ in range(n)]
    return queries, passages


def bench_cost(model: Path, pairs: int, rounds: int) -> dict:
    from rerank_cli import Reranker

    queries, passages = long_pairs(pairs)
    result = {"pairs": pairs, "max_length": 512}
    for mode in ("truncate", "window"):
        r = Reranker(str(model), "cpu", dtype="fp32", long_passages=mode)
        r.score_chunk(queries[:4], passages[:4])  # warm-up
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            scored = r.score_chunk(queries, passages)
            times.append(time.perf_counter() - started)
        best, windows = min(times), int(scored.windows.sum())
        result[mode] = {"seconds": round(best, 2), "runs": [round(t, 2) for t in times], "windows": windows,
                        "s_per_pair": round(best / pairs, 4), "windows_per_pair": round(windows / pairs, 2),
                        "s_per_window": round(best / windows, 4), "load": round(os.getloadavg()[0], 1)}
        print(f"  {mode:8} {best:7.2f} s for {pairs} pairs, {windows} windows "
              f"({best / pairs * 1000:.1f} ms/pair, {best / windows * 1000:.1f} ms/window), "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
    result["cost_ratio"] = round(result["window"]["seconds"] / result["truncate"]["seconds"], 2)
    result["per_window_ratio"] = round(result["window"]["s_per_window"] / result["truncate"]["s_per_window"], 2)
    return result


def rss_mib(field: str) -> float:
    """VmHWM (this process's peak RSS) or VmRSS from /proc/self/status, in MiB. Not getrusage's
    ru_maxrss: Linux carries the parent's peak at fork into it, which would hide a small child's."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def huge_child(model: str, mode: str, mb: int) -> None:
    """In a fresh process: score one pair with an `mb` MB passage; print JSON with peak RSS."""
    from rerank_cli import Reranker
    from rerank_cli.model import bounded
    from rerank_cli.model.tiny import lexicon

    rng, words = random.Random(0), lexicon(6000)
    # 1 MB of text, repeated: building the passage must not raise the peak that scoring is measured by
    base = " ".join(words[int(len(words) * rng.random() ** 3)] for _ in range(170_000))[:1_000_000] + " "
    passage = base * mb
    del base
    if mode == "whole":
        bounded.first_cut = lambda need: 10**12  # tokenize the whole text, as before
    r = Reranker(model, "cpu", dtype="fp32", long_passages="window" if mode == "window" else "truncate")
    before = rss_mib("VmHWM")
    started = time.perf_counter()
    scored = r.score_chunk(["what is ka"], [passage])
    seconds = time.perf_counter() - started
    peak = rss_mib("VmHWM")
    print(json.dumps({"mode": mode, "mb": round(len(passage) / 1e6, 1), "score": float(scored.scores[0]),
                      "windows": int(scored.windows[0]), "seconds": round(seconds, 2),
                      "peak_rss_mib": round(peak), "rss_before_scoring_mib": round(before)}))


def bench_huge(model: Path, mb: int) -> list[dict]:
    out = []
    for mode in ("whole", "truncate", "window"):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([sys.executable, __file__, "--child", str(model), mode, str(mb)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"child failed:\n{proc.stderr[-3000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        out.append(row)
        print(f"  {mode:8} {row['mb']} MB passage: peak RSS {row['peak_rss_mib']} MiB "
              f"({row['rss_before_scoring_mib']} MiB before scoring), {row['seconds']} s, "
              f"{row['windows']} window(s), score {row['score']:.5f}", flush=True)
    assert out[0]["score"] == out[1]["score"], "bounded tokenization changed the truncated score"
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        huge_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--mb", type=int, default=20)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = setup("bench")
    print(f"(a) window mode against truncation, {a.pairs} passages of 1,000-3,000 words, bench-size BERT, "
          "--max-length 512, fp32", flush=True)
    cost = bench_cost(model, a.pairs, a.rounds)
    print(f"  window mode: {cost['cost_ratio']}x the time of truncation for "
          f"{cost['window']['windows_per_pair']} windows a pair ({cost['per_window_ratio']}x per window)")
    print(f"(b) one {a.mb} MB passage, tiny BERT, peak RSS of the whole process", flush=True)
    huge = bench_huge(setup("tiny"), a.mb)
    (OUT / "results.json").write_text(json.dumps({"cost": cost, "huge_passage": huge}, indent=1) + "\n")
    print(f"wrote {OUT / 'results.json'}")


if __name__ == "__main__":
    main()
