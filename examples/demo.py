"""`make demo`: build two small rerankers and a pair file locally, then use the real CLI on them.

Nothing is downloaded: the models are random-weight BERT and Qwen2 rerankers with tokenizers trained
here (rerank_cli/model/tiny.py), so their scores are meaningless but the whole path is real: loading with
from_pretrained, streaming, batching, scoring, writing, ranking and evaluation.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo"


def sh(*args: str, stdin: str | None = None) -> str:
    """Run `rerank ARGS` exactly as a user would, echoing the command."""
    cmd = [sys.executable, "-m", "rerank_cli", *args]
    shown = "rerank " + " ".join(shlex.quote(a) for a in args)
    print(f"\n$ {shown}" if stdin is None else f"\n$ cat {stdin} | {shown}", flush=True)
    src = open(stdin, "rb") if stdin else None
    try:
        out = subprocess.run(cmd, stdin=src, stdout=subprocess.PIPE, check=True).stdout.decode()
    finally:
        if src:
            src.close()
    return out


def build() -> None:
    from rerank_cli.model.tiny import build_cross_encoder, build_llm, write_pairs, write_qrels

    DEMO.mkdir(exist_ok=True)
    if not (DEMO / "tiny-ce" / "config.json").exists():
        print("building a tiny cross-encoder and a tiny LLM reranker in demo/ ...", flush=True)
        build_cross_encoder(DEMO / "tiny-ce")
        build_llm(DEMO / "tiny-llm")
    pairs = write_pairs(DEMO / "pairs.parquet", 400, seed=7, queries=20)
    write_pairs(DEMO / "pairs.jsonl", 60, seed=8, queries=3)
    write_qrels(DEMO / "qrels.trec", pairs)


def show_top(path: Path, queries: int = 2, k: int = 3) -> None:
    import pyarrow.parquet as pq
    from rich.console import Console
    from rich.table import Table

    rows = pq.read_table(path).to_pylist()
    table = Table(title=f"top {k} passages for the first {queries} queries ({path.name})")
    for col in ("qid", "pid", "score", "label", "passage"):
        table.add_column(col)
    for qid in list(dict.fromkeys(r["qid"] for r in rows))[:queries]:
        group = sorted((r for r in rows if r["qid"] == qid), key=lambda r: -r["score"])[:k]
        for r in group:
            table.add_row(r["qid"], r["pid"], f"{r['score']:.4f}", str(r["label"]), r["passage"][:60] + "...")
    Console().print(table)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    build()
    d = DEMO.relative_to(Path.cwd()) if DEMO.is_relative_to(Path.cwd()) else DEMO
    sh("score", f"{d}/pairs.parquet", "-o", f"{d}/scored-ce.parquet", "-m", f"{d}/tiny-ce", "--overwrite")
    show_top(DEMO / "scored-ce.parquet")
    sh("score", f"{d}/pairs.parquet", "-o", f"{d}/scored-llm.parquet", "-m", f"{d}/tiny-llm", "--overwrite")
    show_top(DEMO / "scored-llm.parquet")
    out = sh("score", "-", "-o", "-", "-m", f"{d}/tiny-ce", "--normalize", "-q", stdin=f"{d}/pairs.jsonl")
    print("".join(out.splitlines(keepends=True)[:3]), end="")
    print(f"... ({len(out.splitlines())} scored JSON lines on stdout)")
    sh("rank", f"{d}/scored-ce.parquet", "-o", f"{d}/top5-ce.trec", "--top-k", "5", "--run-tag", "tiny-ce",
       "--overwrite")
    print(open(DEMO / "top5-ce.trec").read().splitlines()[0], "...")
    print(sh("eval", f"{d}/scored-ce.parquet", "--qrels", f"{d}/qrels.trec", "--baseline-input-order"), end="")
    print("\n(random-weight models: expect no gain over the input order; the numbers show the loop works)")
    print("demo finished: outputs are in demo/")


if __name__ == "__main__":
    main()
