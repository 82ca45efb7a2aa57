"""Time one contender on the `make gpu-check` pairs, in this process (a job of benchmarks/gpu_jobs.py).

- ours: rerank's `Reranker.score` at its defaults (bf16 chosen by itself, batch rows 256, the token
  budget it works out), then a sweep of `--batch-size` on a subset and the best of it on every pair.
- st: sentence-transformers' `CrossEncoder.predict` in bf16, best of a batch-size sweep. For the LLM it
  uses its causal-LM support (a ...ForCausalLM loads as Transformer + LogitScore(yes, no), left
  padding, logits for the last position only), with each pair written in Qwen3-Reranker's prompt.
- card: Qwen3-Reranker's model-card loop with transformers (tokenizer padding_side left, prefix and
  suffix tokens, `model(**inputs).logits[:, -1, [no, yes]]`, log_softmax), best of a sweep.

Every contender scores the same pairs after a warm-up, with torch.cuda.synchronize around the timed
region and the peak memory counted from a reset. Real tokens are each contender's own count (its
attention mask); padding share = 1 - real / padded.
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from gpu_jobs import load_columns, read_json, sync

SUBSET, WARM = 4000, 512
SWEEPS = {("ours", "ce"): [256, 512, 1024], ("ours", "llm"): [256, 512, 1024],
          ("st", "ce"): [64, 128, 256, 512], ("st", "llm"): [32, 64, 128, 256], ("card", "llm"): [16, 32, 64, 128]}
SMOKE_SWEEPS = {("ours", "ce"): [256, 32], ("ours", "llm"): [256, 32], ("st", "ce"): [16, 64], ("st", "llm"): [16, 64],
                ("card", "llm"): [8, 32]}


def run_contender(a) -> dict:
    """Warm up, sweep the batch size on a subset, then time on every pair (as many as the deadline allows):
    ours at its default batch size (the headline) and at the best of the sweep; a peer at its best."""
    work = Path(a.work)
    prep = read_json(work / "prepare.json")
    q, p = load_columns(prep["pairs"]["path"])
    pairs = list(zip(q, p))
    device = "cpu" if a.smoke else "cuda:0"
    make = {"ours": Ours, "st": SentenceTransformers, "card": ModelCard}[a.job]
    t = time.perf_counter()
    contender = make(prep["models"][a.kind]["path"], a.kind, device)
    sweep = (SMOKE_SWEEPS if a.smoke else SWEEPS)[(a.job, a.kind)]
    out = {"contender": a.job, "kind": a.kind, "device": device, "load_s": round(time.perf_counter() - t, 2),
           **contender.describe(), "skipped": []}
    contender.run(pairs[:16 if a.smoke else WARM], sweep[0])  # warm-up: kernels chosen, caches filled
    deadline, subset = a.deadline - 5, pairs[:SUBSET]
    out["sweep"], scored = [], {}
    for rows in sweep:
        if out["sweep"] and time.time() + out["sweep"][-1]["seconds"] * 1.5 > deadline:
            out["skipped"].append(f"batch {rows} on {len(subset)} pairs: out of time")
            continue
        m, scored[rows] = timed(contender, subset, rows, device)
        out["sweep"].append(m)
    best = max(out["sweep"], key=lambda r: r["pairs_per_s"])
    finals = [("default", sweep[0]), ("tuned", best["batch"])] if a.job == "ours" else [("best", best["batch"])]
    for name, rows in finals:
        if name == "tuned" and rows == sweep[0]:
            out["tuned"] = None  # the default is the best of the sweep
            continue
        m, scores = next(r for r in out["sweep"] if r["batch"] == rows), scored[rows]
        if len(subset) < len(pairs):  # else the sweep already scored every pair
            fit = int((deadline - time.time()) * m["pairs_per_s"] * 0.8)
            if fit >= len(subset):
                m, scores = timed(contender, pairs[:fit], rows, device)
            else:
                out["skipped"].append(f"{name} (batch {rows}) on all pairs: out of time; the sweep figure stands")
                m = {**m, "note": f"sweep figure ({len(subset)} pairs)"}
        out[name] = m
        if name != "tuned":
            np.save(work / f"scores-{a.job}-{a.kind}.npy", scores)
    return out


def timed(contender, pairs: list, rows: int, device: str) -> tuple[dict, np.ndarray]:
    """One synchronized, timed pass over `pairs` at `rows` per batch: (figures, scores)."""
    import torch

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t = time.perf_counter()
    scores, counts = contender.run(pairs, rows)
    sync(device)
    seconds = time.perf_counter() - t
    scores = np.asarray(scores, dtype=np.float64)
    real, padded = counts.pop("real_tokens"), counts.pop("padded_tokens")
    return {"batch": rows, "pairs": len(pairs), "seconds": round(seconds, 3),
            "pairs_per_s": round(len(pairs) / seconds, 1),
            "real_tokens": real, "padded_tokens": padded, "tokens_per_s": round(real / seconds),
            "padding_share": round(1 - real / padded, 4) if padded else None,
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "finite": bool(np.isfinite(scores).all()), **counts}, scores


class Ours:
    def __init__(self, model: str, kind: str, device: str):
        from rerank_cli.memory.budget import set_allocator_env

        set_allocator_env()  # as `rerank score` does, before CUDA starts
        from rerank_cli import Reranker

        self.reranker = Reranker(model, device, template="qwen3" if kind == "llm" else None)
        self.encode_s = 0.0
        scorer, encode = self.reranker.scorer, self.reranker.scorer.encode

        def timed_encode(*args, **kwargs):
            t = time.perf_counter()
            try:
                return encode(*args, **kwargs)
            finally:
                self.encode_s += time.perf_counter() - t

        scorer.encode = timed_encode

    def describe(self) -> dict:
        r = self.reranker
        return {"dtype": r.precision.name, "dtype_reason": r.precision.reason, "budget_tokens": r.budget.tokens,
                "budget_reason": r.budget_reason, "default_batch_size": r.budget.max_rows}

    def run(self, pairs: list, rows: int):
        r = self.reranker
        r.budget.max_rows = rows
        before, self.encode_s = asdict(r.stats), 0.0
        scores = r.score(pairs)
        after = asdict(r.stats)
        counted = ("batches", "real_tokens", "padded_tokens", "backoffs", "fp32_reruns")
        delta = {k: after[k] - before[k] for k in counted}
        return scores, {**delta, "tokenize_s": round(self.encode_s, 3), "budget_tokens_after": r.budget.tokens}


class _Counted:
    """Counts real (attention mask) and padded tokens of every forward pass, without a device sync.

    Wraps the model's `forward` itself: sentence-transformers calls `model.forward`, not the module,
    so forward hooks would not fire."""

    def __init__(self, net):
        self.real, self.padded, self.batches = None, 0, 0
        original = net.forward

        @functools.wraps(original)  # keeps the signature sentence-transformers inspects
        def forward(*args, **kwargs):
            self._count(kwargs.get("input_ids", args[0] if args else None), kwargs.get("attention_mask"))
            return original(*args, **kwargs)

        net.forward = forward

    def _count(self, ids, mask) -> None:
        if ids is None:
            return
        self.padded += ids.numel()
        self.batches += 1
        total = mask.sum() if mask is not None else ids.numel()
        self.real = total if self.real is None else self.real + total

    def take(self) -> dict:
        out = {"real_tokens": int(self.real) if self.real is not None else 0, "padded_tokens": self.padded,
               "batches": self.batches}
        self.real, self.padded, self.batches = None, 0, 0
        return out


class SentenceTransformers:
    def __init__(self, model: str, kind: str, device: str):
        import torch
        from sentence_transformers import CrossEncoder

        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        self.kind = kind
        self.model = CrossEncoder(model, device=device, max_length=512 if kind == "ce" else 1024,
                                  model_kwargs={"dtype": dtype})
        self.counter = _Counted(self.model[0].model)

    def describe(self) -> dict:
        import sentence_transformers

        return {"dtype": str(self.model[0].model.dtype).replace("torch.", ""),
                "version": sentence_transformers.__version__, "modules": [type(m).__name__ for m in self.model]}

    def run(self, pairs: list, rows: int):
        import torch

        if self.kind == "llm":
            pairs = [qwen3_pair(q, p) for q, p in pairs]
        scores = self.model.predict(pairs, batch_size=rows, show_progress_bar=False, activation_fn=torch.nn.Identity())
        return scores, self.counter.take()


def qwen3_pair(query: str, passage: str) -> tuple[str, str]:
    """A pair in Qwen3-Reranker's prompt, split where its tokens split (checked equal to rerank's ids)."""
    from rerank_cli.model.templates import QWEN3_INSTRUCTION, QWEN3_PREFIX, QWEN3_SUFFIX

    return (f"{QWEN3_PREFIX}<Instruct>: {QWEN3_INSTRUCTION}\n<Query>: {query}\n",
            f"<Document>: {passage}{QWEN3_SUFFIX}")


class ModelCard:
    """Qwen3-Reranker-0.6B's model-card code, as written there (bf16 and sdpa: no flash-attn here)."""

    def __init__(self, model: str, kind: str, device: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rerank_cli.model.templates import QWEN3_PREFIX, QWEN3_SUFFIX

        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        self.tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device).eval()
        self.device, self.max_length = device, 8192
        self.true_id = self.tokenizer.convert_tokens_to_ids("yes")
        self.false_id = self.tokenizer.convert_tokens_to_ids("no")
        self.prefix = self.tokenizer.encode(QWEN3_PREFIX, add_special_tokens=False)
        self.suffix = self.tokenizer.encode(QWEN3_SUFFIX, add_special_tokens=False)

    def describe(self) -> dict:
        return {"dtype": str(self.model.dtype).replace("torch.", ""),
                "attention": getattr(self.model.config, "_attn_implementation", None)}

    def run(self, pairs: list, rows: int):
        from rerank_cli.model.templates import QWEN3_INSTRUCTION

        texts = [f"<Instruct>: {QWEN3_INSTRUCTION}\n<Query>: {q}\n<Document>: {p}" for q, p in pairs]
        scores, counts = [], {"real_tokens": 0, "padded_tokens": 0, "batches": 0}
        for i in range(0, len(texts), rows):
            inputs = self.process_inputs(texts[i:i + rows])
            counts["real_tokens"] += int(inputs["attention_mask"].sum())
            counts["padded_tokens"] += inputs["input_ids"].numel()
            counts["batches"] += 1
            scores += self.compute_logits(inputs)
        return scores, counts

    def process_inputs(self, pairs):
        inputs = self.tokenizer(pairs, padding=False, truncation="longest_first", return_attention_mask=False,
                                max_length=self.max_length - len(self.prefix) - len(self.suffix))
        for i, ele in enumerate(inputs["input_ids"]):
            inputs["input_ids"][i] = self.prefix + ele + self.suffix
        inputs = self.tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=self.max_length)
        return {key: value.to(self.device) for key, value in inputs.items()}

    def compute_logits(self, inputs) -> list[float]:
        import torch

        with torch.no_grad():
            batch_scores = self.model(**inputs).logits[:, -1, :]
            true_vector = batch_scores[:, self.true_id]
            false_vector = batch_scores[:, self.false_id]
            batch_scores = torch.stack([false_vector, true_vector], dim=1)
            batch_scores = torch.nn.functional.log_softmax(batch_scores, dim=1)
            return batch_scores[:, 1].exp().tolist()
