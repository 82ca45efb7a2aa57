"""The jobs of `make gpu-check`, each run by benchmarks/gpu_check.py in a fresh process (its own CUDA
context and peak-memory count), each writing one JSON result:

    python benchmarks/gpu_jobs.py env|prepare|probe|cli --work DIR --result FILE [--smoke] [--deadline T]
    python benchmarks/gpu_jobs.py ours|st|card --kind ce|llm --work DIR --result FILE --deadline T [--smoke]

- env: versions, the GPU, a measured bf16 matmul rate, and whether every rerank_cli module imports.
- prepare: random-weight models of bge-reranker-v2-m3's and Qwen3-Reranker-0.6B's shapes (tiny ones
  in a smoke run) and MS MARCO-like pairs, in the work dir.
- ours | st | card: one contender scoring the same pairs in memory (`gpu_timing.py`).
- probe: `rerank probe-memory` on the real shapes, beside the estimate from their configs.
- cli: the whole `rerank score` command, file to file, as a user runs it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SPEC_BF16_DENSE = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                   "L40S": 362e12, "L4": 121e12, "A10": 125e12}  # vendor datasheets, dense (no sparsity)
SMOKE_CE = dict(arch="xlm-roberta", layers=2, hidden=64, heads=4, intermediate=128, vocab=1000, positions=514)
SMOKE_LLM = dict(arch="qwen3", layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=1000,
                 tied=True)


def spec_peak(name: str) -> float | None:
    if "H100" in name and "PCIe" in name:
        return 756e12
    return next((v for k, v in SPEC_BF16_DENSE.items() if k in name), None)


# --- env -----------------------------------------------------------------------------------------------

def job_env(a) -> dict:
    import torch

    out = {"python": sys.version.split()[0], "versions": versions(), "cuda": torch.cuda.is_available(),
           "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "imports": check_imports()}
    out["cpu_count"] = os.cpu_count()
    if out["cuda"]:
        props = torch.cuda.get_device_properties(0)
        out["gpu"] = {"name": props.name, "count": torch.cuda.device_count(),
                      "capability": f"{props.major}.{props.minor}", "memory_bytes": props.total_memory,
                      "multiprocessors": props.multi_processor_count, "driver": nvidia_smi("driver_version"),
                      "torch_cuda": torch.version.cuda, "spec_bf16_flops": spec_peak(props.name)}
        out["gpu"]["measured_bf16_flops"] = matmul_rate("cuda", torch.bfloat16, 8192)
    else:
        out["gpu"] = None
        out["cpu_measured_fp32_flops"] = matmul_rate("cpu", torch.float32, 1024)
    return out


def versions() -> dict:
    from importlib import metadata

    names = ("torch", "transformers", "tokenizers", "accelerate", "sentence-transformers", "pyarrow", "numpy",
             "typer", "rich", "pytest", "cupy-cuda13x", "cupy-cuda12x")
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def check_imports() -> dict:
    """Import every rerank_cli module; the Ray engine's may lack its optional `ray`."""
    import importlib
    import pkgutil

    import rerank_cli

    failed, optional, count = {}, {}, 0
    for mod in pkgutil.walk_packages(rerank_cli.__path__, "rerank_cli."):
        if mod.name.endswith(".__main__"):
            continue  # it runs the CLI; `--help` below covers it
        count += 1
        try:
            importlib.import_module(mod.name)
        except ModuleNotFoundError as exc:
            (optional if exc.name == "ray" else failed)[mod.name] = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001 - any failure is what this check reports
            failed[mod.name] = f"{type(exc).__name__}: {exc}"
    cmd = [sys.executable, "-m", "rerank_cli", "--help"]
    helped = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return {"modules": count, "failed": failed, "optional_missing": optional, "help_exit": helped.returncode,
            "help_error": helped.stderr[-500:] if helped.returncode else ""}


def nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def matmul_rate(device: str, dtype, n: int, reps: int = 10) -> float:
    """FLOP/s of an n x n x n matrix product on random data (the ceiling MFU is also read against)."""
    import torch

    x, y = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        x @ y
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        x @ y
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


# --- prepare -------------------------------------------------------------------------------------------

def job_prepare(a) -> dict:
    import torch

    from rerank_cli.memory.estimate import parameter_count, shape_of
    from rerank_cli.model.load import load_config
    from rerank_cli.model.tiny import SHAPES, build_shaped

    work = Path(a.work)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = {"ce": SMOKE_CE, "llm": SMOKE_LLM} if a.smoke else {
        "ce": SHAPES["bge-reranker-v2-m3"], "llm": SHAPES["qwen3-reranker-0.6b"]}
    out = {"models": {}, "device": device}
    for name, shape in shapes.items():
        t = time.perf_counter()
        path = build_shaped(work / "models" / name, shape, tokenizer_vocab=1000 if a.smoke else 8000, device=device)
        s = shape_of(load_config(str(path)), "llm" if name == "llm" else "cross-encoder")
        out["models"][name] = {"path": str(path), "shape": shape, "params": parameter_count(s),
                               "non_embedding_params": non_embedding_params(s),
                               "build_s": round(time.perf_counter() - t, 1)}
        if device == "cuda":
            torch.cuda.empty_cache()
    n = a.pairs or (200 if a.smoke else 20000)
    out["pairs"] = write_marco_like(work / "pairs.parquet", n)
    out["pairs"]["tokens"] = {name: token_stats(m["path"], name, work / "pairs.parquet")
                              for name, m in out["models"].items()}
    return out


def non_embedding_params(s) -> int:
    """Parameters less the embedding tables (and an untied LM head): what 2 x params x tokens counts."""
    from rerank_cli.memory.estimate import parameter_count

    if s.family == "encoder":
        return parameter_count(s) - (s.vocab + s.positions + s.token_types) * s.hidden
    return parameter_count(s) - s.vocab * s.hidden * (1 if s.tied or s.kind != "llm" else 2)


def write_marco_like(path: Path, n: int, seed: int = 7) -> dict:
    """MS MARCO-like pairs: 20 candidates per query, queries of ~8 words, passages of ~55 (5% of 150-300)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rerank_cli.model.tiny import LEXICON, lexicon, sentence

    rng = random.Random(seed)
    words = lexicon(LEXICON, seed)
    queries = [sentence(rng, words, max(2, min(24, round(rng.gauss(8, 3))))) + "?" for _ in range(max(1, n // 20))]
    cols: dict[str, list] = {"qid": [], "pid": [], "query": [], "passage": []}
    qlen, plen = [], []
    for i in range(n):
        q = i * len(queries) // n
        k = rng.randint(150, 300) if rng.random() < 0.05 else max(8, min(149, round(rng.lognormvariate(math.log(55),
                                                                                                         0.35))))
        cols["qid"].append(f"q{q}")
        cols["pid"].append(f"p{i}")
        cols["query"].append(queries[q])
        cols["passage"].append(sentence(rng, words, k))
        qlen.append(len(queries[q].split()))
        plen.append(k)
    pq.write_table(pa.table(cols), path)
    return {"path": str(path), "n": n, "query_words": describe(qlen), "passage_words": describe(plen)}


def describe(values: list[float]) -> dict:
    v = sorted(values)
    pick = (lambda p: v[min(len(v) - 1, int(p * len(v)))]) if v else (lambda p: 0)
    return {"mean": round(statistics.fmean(v), 1) if v else 0, "p50": pick(0.5), "p90": pick(0.9),
            "p99": pick(0.99), "max": v[-1] if v else 0}


def token_stats(model: str, name: str, pairs: Path) -> dict:
    """Tokens per pair as rerank encodes them (the LLM in the qwen3 template)."""
    from transformers import AutoTokenizer

    from rerank_cli.model.templates import make_template

    q, p = load_columns(pairs)
    template = make_template("llm" if name == "llm" else "cross-encoder", "qwen3" if name == "llm" else None,
                             AutoTokenizer.from_pretrained(model), 512, None)
    return describe([len(e.ids) for e in template.encode(q, p)])


def load_columns(path) -> tuple[list[str], list[str]]:
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=["query", "passage"]).to_pydict()
    return t["query"], t["passage"]


# --- probe and the whole command -------------------------------------------------------------------------

def job_probe(a) -> dict:
    """`rerank probe-memory` on each real shape, and the config estimate at the batch it settled on."""
    from rerank_cli.config import build_config
    from rerank_cli.memory.estimate import CUDA_RESERVE, estimate, peak_bytes, shape_of
    from rerank_cli.memory.probe import probe_memory
    from rerank_cli.model.load import load_config

    prep, out = read_json(Path(a.work) / "prepare.json"), {}
    device = "cuda:0" if not a.smoke else "cpu"
    for name, info in prep["models"].items():
        if time.time() > a.deadline - 20:
            out[name] = {"skipped": "out of time"}
            continue
        kind = "llm" if name == "llm" else "cross-encoder"
        cfg = build_config({"model": info["path"], "template": "qwen3" if name == "llm" else None})
        t = time.perf_counter()
        (r,) = probe_memory(cfg, [device], headroom=0.1, log=lambda m: print(m, flush=True))
        shape = shape_of(load_config(info["path"]), kind)
        at_batch = peak_bytes(shape, r.max_batch_size, r.width, r.dtype)
        alone = estimate(shape, r.dtype, cfg.max_length, r.total_memory_bytes or 0, 0.1, CUDA_RESERVE)
        out[name] = {**r.to_json(), "seconds": round(time.perf_counter() - t, 1), "estimated_peak_bytes": at_batch,
                     "estimate_vs_measured": at_batch / r.peak_memory_bytes - 1 if r.peak_memory_bytes else None,
                     "estimated_max_batch_tokens": alone.max_batch_tokens}
    if all("skipped" in v for v in out.values()):
        return {"skipped": "out of time", **out}
    return out


def job_cli(a) -> dict:
    """`rerank score PAIRS -o OUT -m CE` as a user types it: the whole process, its summary line."""
    prep = read_json(Path(a.work) / "prepare.json")
    out = Path(a.work) / "cli-scored.parquet"
    cmd = [sys.executable, "-m", "rerank_cli", "score", prep["pairs"]["path"], "-o", str(out), "-m",
           prep["models"]["ce"]["path"], "--overwrite"]
    t, left = time.perf_counter(), a.deadline - time.time() - 3
    if left < 10:
        return {"skipped": f"out of time ({left:.0f} s left)"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        return {"skipped": f"out of time: stopped after {left:.0f} s", "command": " ".join(cmd[1:])}
    wall = time.perf_counter() - t
    lines = proc.stderr.strip().splitlines()
    if proc.returncode != 0:
        raise RuntimeError(f"rerank score exited {proc.returncode}: {lines[-1] if lines else ''}")
    return {"command": " ".join(cmd[1:]), "wall_s": round(wall, 2), "pairs": prep["pairs"]["n"],
            "pairs_per_s_wall": round(prep["pairs"]["n"] / wall, 1), "summary": lines[-1] if lines else "",
            "choices": [line for line in lines if "batches of up to" in line]}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def run_job(a) -> dict:
    if a.job == "st" and importlib.util.find_spec("sentence_transformers") is None:
        # A yardstick, not a dependency: the GPU image has it; `make install` does not install it.
        return {"skipped": "sentence-transformers is not installed in this Python (the GPU image has it)"}
    if a.job in ("ours", "st", "card"):
        from gpu_timing import run_contender

        return run_contender(a)
    return {"env": job_env, "prepare": job_prepare, "probe": job_probe, "cli": job_cli}[a.job](a)


def run_chain(a) -> None:
    """Several steps in this one process (a smoke run: starting Python and torch is what costs there),
    each writing WORK/STEP.json: its result, or {"error": ...}; steps past the deadline are not started."""
    for spec in a.steps.split(","):
        step, a.job, a.kind = spec.split(":")
        if time.time() > a.deadline - 8:  # too little left for a step: leave the rest unstarted
            break
        t = time.perf_counter()
        try:
            result = run_job(a)
        except Exception as exc:  # noqa: BLE001 - recorded, and the next step runs
            import traceback

            traceback.print_exc()
            result = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"}
        result["elapsed_s"] = round(time.perf_counter() - t, 1)
        Path(a.work, f"{step}.json").write_text(json.dumps(result, indent=1, default=str))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("job", choices=["env", "prepare", "probe", "cli", "ours", "st", "card", "chain"])
    ap.add_argument("--work", required=True)
    ap.add_argument("--result", required=True)
    ap.add_argument("--kind", choices=["ce", "llm"], default="ce")
    ap.add_argument("--steps", default="", help="chain: STEP:JOB:KIND,...")
    ap.add_argument("--deadline", type=float, default=time.time() + 600)
    ap.add_argument("--pairs", type=int, default=0)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    os.environ.setdefault("RERANK_CACHE_DIR", str(Path(a.work) / "cache"))  # never the user's probe cache
    if a.job == "chain":
        run_chain(a)
        result = {"steps": a.steps}
    else:
        result = run_job(a)
    Path(a.result).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
