"""Shared-prefix reuse (LLM rerankers), whole process, on CPU: `--share-prefix` against `--no-share-prefix`.

The bench-size Qwen2 LLM reranker (as `benchmarks/run.py` builds it, but with its tokenizer trained on
the templates' English too, so that the shared prompt is about as long as with Qwen3's tokenizer:
about 72 of 138 tokens a pair for qwen3) scores --queries x --candidates pairs at MS MARCO-like
lengths (queries of about 12 tokens, passages of about 55; the means are measured and printed),
each contender the real `rerank score` command in its own process (import, load, read, score, write),
alternated for --rounds rounds; best and median seconds of each, in fp32:

- qwen3 template (system prompt, instruction and query shared): shared against unshared;
- bge template (bos and "A: {query}" shared): shared and unshared against FlagLLMReranker
  (`../shared/peers/flag_score.py`, its own venv, as `run.py` runs it).

The scores of each pair of contenders are compared (the largest difference is printed).

    python benchmarks/bench_prefix.py [--queries 40] [--candidates 50] [--rounds 3] [--no-peer]

Prints a table and writes bench-out/prefix/results.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.append(str(Path(__file__).resolve().parent.parent))
from run import OUT, alternate, contenders, ours, parity  # noqa: E402  (benchmarks/run.py)

QUERY_WORDS, PASSAGE_WORDS = 11, 55  # about 12 and 55 tokens with "?" (a pseudo-word is about one token)


def bench_model(path: Path) -> str:
    """The bench-size Qwen2 reranker with its tokenizer trained on the templates' English too: run.py's
    spells that text out in bytes, which would make the shared prompt 3-4x Qwen3's."""
    from rerank_cli.model.tiny import build_llm

    if not (path / "config.json").exists():
        build_llm(path, "bench", prompt_words=True)
    return str(path)


def ranking_pairs(path: Path, queries: int, candidates: int, seed: int = 0) -> Path:
    """`queries` x `candidates` pairs, each query's candidates together, as a reranking run's input."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rerank_cli.model.tiny import LEXICON, lexicon, sentence

    rng, words = random.Random(seed), lexicon(LEXICON, seed)
    rows: dict[str, list] = {"qid": [], "query": [], "passage": []}
    for q in range(queries):
        query = sentence(rng, words, rng.randint(QUERY_WORDS - 3, QUERY_WORDS + 3)) + "?"
        for _ in range(candidates):
            rows["qid"].append(f"q{q}")
            rows["query"].append(query)
            rows["passage"].append(sentence(rng, words, rng.randint(PASSAGE_WORDS - 25, PASSAGE_WORDS + 25)))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path)
    return path


def mean_tokens(model: str, path: Path) -> dict[str, float]:
    """Mean tokens of a query, a passage, and for each template a pair and its shared prefix."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from rerank_cli.model import prefix
    from rerank_cli.model.templates import make_template

    tok, table = AutoTokenizer.from_pretrained(model), pq.read_table(path)
    cols = {col: table.column(col).to_pylist() for col in ("query", "passage")}
    out = {col: np.mean([len(ids) for ids in tok(texts, add_special_tokens=False).input_ids])
           for col, texts in cols.items()}
    for template in ("qwen3", "bge"):
        _, tagged = prefix.plan(make_template("llm", template, tok, 512, None).encode(cols["query"], cols["passage"]))
        out[f"{template} pair"] = np.mean([len(e.ids) for e in tagged])
        out[f"{template} shared"] = np.mean([e.shared for e in tagged])
    return {k: round(float(v), 1) for k, v in out.items()}


def figures(runs: list[dict]) -> dict[str, float]:
    secs = [r["seconds"] for r in runs]
    return {"best": round(min(secs), 2), "median": round(statistics.median(secs), 2),
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs))}


def scores_of(tag: str) -> np.ndarray:
    import pyarrow.parquet as pq

    return pq.read_table(OUT / f"ours-{tag}.parquet").column("score").to_numpy().astype(np.float64)


def workload(template: str, model: str, pairs: Path, rounds: int, peer: bool) -> dict:
    tail = ["--template", template]
    cmds = {"rerank": ours(model, str(pairs), f"prefix-{template}") + tail,
            "rerank --no-share-prefix": ours(model, str(pairs), f"plain-{template}") + tail + ["--no-share-prefix"]}
    if peer:
        flag = contenders("llm", model, str(pairs))
        cmds["FlagEmbedding FlagLLMReranker"] = flag["FlagEmbedding FlagLLMReranker"]
        cmds["rerank"] = flag["rerank"]  # writes ours-llm.parquet, which run.parity compares with the peer's
    runs = alternate(cmds, rounds)
    shared = scores_of("llm" if peer else f"prefix-{template}")
    result = {name: figures(rs) for name, rs in runs.items()}
    result["max_abs_diff_shared_vs_unshared"] = float(np.abs(shared - scores_of(f"plain-{template}")).max())
    if peer:
        result["max_abs_diff_vs_peer"] = parity("llm").get("flag")
    return result


def report(results: dict) -> None:
    print(f"\n{results['pairs']} pairs ({results['shape']}), mean tokens {results['tokens']}, whole process, CPU, "
          f"{results['rounds']} rounds alternated")
    for template in ("qwen3", "bge"):
        res = results.get(template)
        if not res:
            continue
        base = res["rerank"]
        print(f"\n{template} template {'contender':32} {'best s':>8} {'median s':>9} {'peak MiB':>9} "
              f"{'rerank speed-up (best / median)':>32}")
        for name, r in res.items():
            if isinstance(r, dict):
                print(f"{'':15}{name:32} {r['best']:8.2f} {r['median']:9.2f} {r['peak_rss_mb']:9.0f} "
                      f"{r['best'] / base['best']:15.2f}x / {r['median'] / base['median']:.2f}x")
        print(f"{'':15}max |score difference|: shared vs unshared {res['max_abs_diff_shared_vs_unshared']:.2g}"
              + (f", vs FlagLLMReranker {res['max_abs_diff_vs_peer']}" if "max_abs_diff_vs_peer" in res else ""))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--candidates", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--peer-rounds", type=int, default=2, help="rounds of the bge workload, with the peer")
    ap.add_argument("--no-peer", action="store_true", help="skip FlagLLMReranker (bge: shared vs unshared only)")
    a = ap.parse_args()
    model = bench_model(OUT / "prefix" / "bench-llm-prompt")
    pairs = ranking_pairs(OUT / "prefix" / f"pairs-{a.queries}x{a.candidates}.parquet", a.queries, a.candidates)
    results = {"pairs": a.queries * a.candidates, "shape": f"{a.queries} queries x {a.candidates} candidates",
               "tokens": mean_tokens(model, pairs), "rounds": a.rounds,
               "qwen3": workload("qwen3", model, pairs, a.rounds, peer=False),
               "bge": workload("bge", model, pairs, a.peer_rounds, peer=not a.no_peer)}
    (OUT / "prefix" / "results.json").write_text(json.dumps(results, indent=2))
    report(results)


if __name__ == "__main__":
    main()
