"""`make parity`: rerank's fp32 scores against FlagEmbedding's own code, one model family at a time.

Builds tiny models of the four families the bge rerankers come in (BERT and XLM-RoBERTa
cross-encoders; Qwen2 and Gemma LLM rerankers), scores the same pairs (varied lengths, passages past
512 tokens, queries past 3/4 of it) with `rerank score` and with FlagReranker / FlagLLMReranker at
their defaults, and prints the largest absolute difference per family. Exits 1 if any is over the
tolerance (1e-5 cross-encoders, 1e-4 LLM rerankers). FlagEmbedding runs from its own venv (it needs
transformers<5), found or created as benchmarks/run.py does.
    python benchmarks/parity.py [--pairs 300]
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from run import OUT, peer_python, peer_script

FAMILIES = {  # name: (kind: ce or llm, arch for rerank_cli.model.tiny, tolerance)
    "bert": ("ce", "bert", 1e-5),
    "xlm-roberta": ("ce", "xlm-roberta", 1e-5),
    "qwen2": ("llm", "qwen2", 1e-4),
    "gemma": ("llm", "gemma", 1e-4),
}


def build(root, pairs: int):
    from rerank_cli.model.tiny import build_cross_encoder, build_llm, write_pairs

    root.mkdir(parents=True, exist_ok=True)
    models = {}
    for name, (kind, arch, _) in FAMILIES.items():
        path = root / name
        if not (path / "config.json").exists():
            (build_cross_encoder if kind == "ce" else build_llm)(path, arch=arch, seed=3)
        models[name] = str(path)
    return models, str(write_pairs(root / f"pairs-{pairs}.parquet", pairs, seed=9))


def ours(model: str, pairs: str, out) -> list[float]:
    import pyarrow.parquet as pq

    quiet([sys.executable, "-m", "rerank_cli", "score", pairs, "-o", str(out), "-m", model, "--dtype", "fp32",
           "--overwrite", "-q"])
    return pq.read_table(out).column("score").to_pylist()


def flag(kind: str, model: str, pairs: str, out) -> list[float]:
    import numpy as np

    quiet([peer_python("flag"), peer_script("flag_score.py"), kind, model, pairs, str(out)])
    return np.load(out).tolist()


def quiet(cmd: list[str]) -> None:
    """Run `cmd`; its output (progress bars, warnings) is shown only if it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")


def main() -> None:
    import numpy as np

    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=300)
    a = ap.parse_args()
    root = OUT / "parity"
    models, pairs = build(root, a.pairs)
    failed = False
    print(f"{'family':12} {'pairs':>6} {'max |rerank - FlagEmbedding|':>30} {'tolerance':>10} {'score spread':>13}")
    for name, (kind, _, tol) in FAMILIES.items():
        mine = np.array(ours(models[name], pairs, root / f"ours-{name}.parquet"))
        theirs = np.array(flag(kind, models[name], pairs, root / f"flag-{name}.npy"))
        diff = float(np.abs(mine - theirs).max())
        failed |= not diff <= tol
        print(f"{name:12} {len(mine):6d} {diff:30.2e} {tol:10.0e} {float(mine.std()):13.3f}"
              f"{'' if diff <= tol else '  OVER'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
