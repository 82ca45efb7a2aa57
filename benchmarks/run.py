"""`make bench`: rerank against its peers, whole process each, alternated in one run.

For each workload (bench-size BERT cross-encoder vs sentence-transformers' CrossEncoder.predict, the
same on its ONNX Runtime and OpenVINO backends (model exported once beforehand), and FlagEmbedding's
FlagReranker; bench-size Qwen2 LLM reranker vs FlagLLMReranker at its default batch
size) this times the whole command (import, load, read, score, write) with the peak RSS of the
process, checks that the scores agree in fp32, and prints a table plus JSON (bench-out/results.json).

Peers run from their own virtual environments (FlagEmbedding needs transformers<5), as
../shared/peers/README.md describes; missing ones are created under bench-out/venvs (minutes, once).
    python benchmarks/run.py [--pairs 2000] [--llm-pairs 1000] [--rounds 2] [--only ce|llm]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench-out"
PEERS = Path(os.environ.get("RERANK_PEERS_DIR", ROOT.parent / "shared" / "peers"))
VENV_SPECS = {
    "flag": ["transformers<5", "datasets<4", "flagembedding", "pyarrow"],
    "st": ["transformers>=5", "sentence-transformers", "pyarrow"],
    "onnx": ["sentence-transformers[onnx,openvino]", "pyarrow"],
}
BACKENDS = ("onnx", "openvino")  # sentence-transformers' fastest CPU backends, as its docs advise CPU users


def peer_script(name: str) -> str:
    """One of ../shared/peers/'s scripts (or $RERANK_PEERS_DIR's, for a checkout that sits elsewhere)."""
    script = PEERS / name
    if not script.exists():
        raise SystemExit(f"make bench: the peers' scripts are not in {PEERS} (the project's ../shared/peers); "
                         "set RERANK_PEERS_DIR to the folder that holds them")
    return str(script)


def peer_python(name: str) -> str:
    """The peer venv's python: $PEER_<NAME>_PY, /tmp/peer-<name>, or one built in bench-out/venvs."""
    env = os.environ.get(f"PEER_{name.upper()}_PY")
    for cand in (env, f"/tmp/peer-{name}/bin/python", str(OUT / "venvs" / name / "bin" / "python")):
        if cand and Path(cand).exists():
            return cand
    venv = OUT / "venvs" / name
    print(f"creating peer venv {venv} (once) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "pip"), "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + VENV_SPECS[name], check=True)
    return str(venv / "bin" / "python")


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Wall seconds and peak RSS (MiB) of one whole process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err[-3000:]}")
    return {"seconds": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "stdout": out}


def prepare(pairs: int, llm_pairs: int) -> dict:
    from rerank_cli.model.tiny import build_cross_encoder, build_llm, write_pairs

    OUT.mkdir(exist_ok=True)
    if not (OUT / "bench-ce" / "config.json").exists():
        build_cross_encoder(OUT / "bench-ce", "bench")
        build_llm(OUT / "bench-llm", "bench")
    return {
        "ce": (str(OUT / "bench-ce"), str(write_pairs(OUT / f"pairs-{pairs}.parquet", pairs, seed=5))),
        "llm": (str(OUT / "bench-llm"), str(write_pairs(OUT / f"pairs-{llm_pairs}.parquet", llm_pairs, seed=5))),
    }


def exported(backend: str, model: str, pairs: str) -> str:
    """The model exported once for a sentence-transformers backend; timed runs load it as a user's would."""
    target = OUT / f"bench-ce-{backend}"
    if not (target / "config.json").exists():
        subprocess.run([peer_python("onnx"), peer_script("st_backend_score.py"), model, pairs, "-",
                        "--backend", backend, "--export", str(target)], check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return str(target)


def ours(model: str, pairs: str, tag: str) -> list[str]:
    return [sys.executable, "-m", "rerank_cli", "score", pairs, "-o", str(OUT / f"ours-{tag}.parquet"),
            "-m", model, "--dtype", "fp32", "--overwrite", "-q"]


def contenders(kind: str, model: str, pairs: str) -> dict[str, list[str]]:
    if kind == "ce":
        return {
            "rerank": ours(model, pairs, "ce"),
            "sentence-transformers CrossEncoder": [peer_python("st"), peer_script("st_score.py"), model, pairs,
                                                   str(OUT / "st-ce.npy")],
            **{f"sentence-transformers {name}": [peer_python("onnx"), peer_script("st_backend_score.py"),
                                                exported(backend, model, pairs), pairs, str(OUT / f"{backend}-ce.npy"),
                                                "--backend", backend]
               for backend, name in zip(BACKENDS, ("ONNX", "OpenVINO"))},
            "FlagEmbedding FlagReranker": [peer_python("flag"), peer_script("flag_score.py"), "ce", model, pairs,
                                           str(OUT / "flag-ce.npy")],
        }
    return {
        "rerank": ours(model, pairs, "llm"),
        "FlagEmbedding FlagLLMReranker": [peer_python("flag"), peer_script("flag_score.py"), "llm", model,
                                          pairs, str(OUT / "flag-llm.npy")],
    }


def parity(kind: str) -> dict[str, float]:
    import numpy as np
    import pyarrow.parquet as pq

    mine = pq.read_table(OUT / f"ours-{kind}.parquet").column("score").to_numpy().astype(np.float64)
    diffs = {}
    for peer in ("st", "flag", *BACKENDS):
        f = OUT / f"{peer}-{kind}.npy"
        if f.exists():
            diffs[peer] = float(np.abs(np.load(f) - mine).max())
    return diffs


def alternate(cmds: dict[str, list[str]], rounds: int) -> dict[str, list[dict]]:
    """`timed` runs of each command, alternated so drift on the machine hits everyone alike."""
    runs: dict[str, list[dict]] = {name: [] for name in cmds}
    for _ in range(rounds):
        for name, cmd in cmds.items():
            runs[name].append(timed(cmd))
    return runs


def bench(kind: str, model: str, pairs: str, rounds: int) -> dict:
    cmds = contenders(kind, model, pairs)
    runs = alternate(cmds, rounds)
    n = int(json.loads(runs[next(n for n in cmds if n != "rerank")][0]["stdout"].strip().splitlines()[-1])["pairs"])
    result = {"pairs": n, "contenders": {}}
    for name, rs in runs.items():
        secs = statistics.median(r["seconds"] for r in rs)
        result["contenders"][name] = {"seconds": round(secs, 2), "pairs_per_s": round(n / secs, 1),
                                      "peak_rss_mb": round(max(r["peak_rss_mb"] for r in rs))}
    result["max_abs_score_diff"] = parity(kind)
    return result


def report(results: dict) -> None:
    for kind, res in results.items():
        base = res["contenders"]["rerank"]
        print(f"\n{kind}: {res['pairs']} pairs, whole process (median of rounds), CPU")
        head = f"{'contender':38} {'seconds':>8} {'pairs/s':>9} {'peak MiB':>9}"
        print(f"{head} {'rerank speed-up':>16} {'rerank mem':>11}")
        for name, r in res["contenders"].items():
            speed = r["seconds"] / base["seconds"]
            mem = base["peak_rss_mb"] / r["peak_rss_mb"]
            print(f"{name:38} {r['seconds']:8.2f} {r['pairs_per_s']:9.1f} {r['peak_rss_mb']:9.0f} "
                  f"{speed:15.2f}x {mem:10.2f}x")
        print(f"max |score difference| vs peers (fp32): {res['max_abs_score_diff']}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--llm-pairs", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", choices=["ce", "llm"])
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = prepare(a.pairs, a.llm_pairs)
    results = {kind: bench(kind, *work[kind], a.rounds) for kind in ("ce", "llm") if a.only in (None, kind)}
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    report(results)


if __name__ == "__main__":
    main()
