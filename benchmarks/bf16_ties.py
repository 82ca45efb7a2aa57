"""How many bf16 scores tie, and how well bf16 ranks as fp32 does, on the bench models (CPU).

For the bench-size BERT cross-encoder and the bench-size Qwen2 LLM reranker (both templates) that
`benchmarks/run.py` builds, this scores the same --pairs pairs with `--dtype fp32` and `--dtype bf16`
in one process and reports, per model: the scores tied with another score (bf16 and fp32), the
Spearman rank correlation of bf16 with fp32 (ties given their average rank, and "as sorted": ties
in input order, the ranking a sort by score gives), and the largest score difference. The scoring head runs
in fp32 (`rerank_cli/model/head.py`); to measure code without it, put that code first on PYTHONPATH:

    python benchmarks/bf16_ties.py [--pairs 500] [--only ce|llm] [--no-share-prefix]
    PYTHONPATH=/path/to/other/checkout python benchmarks/bf16_ties.py   # "before"

Prints a table and writes bench-out/bf16_ties-{all,ce,llm}.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # appended: a checkout on PYTHONPATH is the one measured
from run import OUT, prepare  # noqa: E402  (benchmarks/run.py: the same models and pairs)

MODELS = {"cross-encoder": ("ce", None), "LLM bge": ("llm", "bge"), "LLM qwen3": ("llm", "qwen3")}


def tied(scores: np.ndarray) -> int:
    """How many scores are equal to at least one other score."""
    _, counts = np.unique(scores, return_counts=True)
    return int(counts[counts > 1].sum())


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 0, ties given their average rank (as Spearman's rho needs)."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=r) / counts)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def spearman_as_sorted(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho of the orders a sort by score gives (ties in input order, as `rerank rank` and a
    stable sort leave them): the ranking a user gets. Tie-averaged ranks are no order a user can get,
    and they credit a tie with half of each way it could go."""
    def order_ranks(x):
        r = np.empty(len(x))
        r[np.argsort(-x, kind="stable")] = np.arange(len(x))
        return r

    return float(np.corrcoef(order_ranks(a), order_ranks(b))[0, 1])


def scores(model: str, template: str | None, dtype: str, queries: list[str], passages: list[str],
           options: dict) -> np.ndarray:
    from rerank_cli import Reranker

    r = Reranker(model, "cpu", dtype=dtype, template=template, **(options if template else {}))
    return np.asarray(r.score(list(zip(queries, passages))), dtype=np.float32)


def measure(model: str, template: str | None, pairs: str, options: dict) -> dict:
    import pyarrow.parquet as pq

    table = pq.read_table(pairs)
    queries, passages = table.column("query").to_pylist(), table.column("passage").to_pylist()
    fp32, bf16 = (scores(model, template, d, queries, passages, options) for d in ("fp32", "bf16"))
    return {"pairs": len(fp32), "bf16_ties": tied(bf16), "fp32_ties": tied(fp32),
            "spearman": round(spearman(bf16, fp32), 6), "spearman_as_sorted": round(spearman_as_sorted(bf16, fp32), 6),
            "max_abs_diff": float(np.abs(bf16 - fp32).max())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=500)
    ap.add_argument("--only", choices=["ce", "llm"])
    ap.add_argument("--no-share-prefix", action="store_true", help="LLMs: the bf16 body without prefix reuse")
    a = ap.parse_args()
    options = {"share_prefix": False} if a.no_share_prefix else {}
    work = prepare(a.pairs, a.pairs)
    import rerank_cli

    results = {"code": str(Path(rerank_cli.__file__).parent.parent)}
    names = [name for name, (kind, _) in MODELS.items() if a.only in (None, kind)]
    for name in names:
        kind, template = MODELS[name]
        model, pairs = work[kind]
        results[name] = measure(model, template, pairs, options)
    (OUT / f"bf16_ties-{a.only or 'all'}.json").write_text(json.dumps(results, indent=2))
    print(f"bf16 vs fp32 on CPU, {a.pairs} pairs, code from {results['code']}")
    print(f"{'model':16} {'bf16 ties':>10} {'fp32 ties':>10} {'Spearman':>10} {'as sorted':>10} {'max |diff|':>11}")
    for name in names:
        r = results[name]
        print(f"{name:16} {r['bf16_ties']:10} {r['fp32_ties']:10} {r['spearman']:10.6f} {r['spearman_as_sorted']:10.6f} "
              f"{r['max_abs_diff']:11.4g}")


if __name__ == "__main__":
    main()
