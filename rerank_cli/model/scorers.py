"""A loaded reranker's forward pass: cross-encoders and causal-LM yes/no rerankers, one batch at a time.

Owns collation (right padding for encoders, left for causal LMs), the fp16 overflow re-run, and the
lean LLM head: only the last position's hidden state times the one or two lm_head rows the score
needs, in fp32 (`head.py`), never full-vocabulary logits. `lean.py` trims the final layer to the one
position the score reads; `prefix.py` runs a prefix that a causal LM's pairs share once per batch;
`load.py` builds a scorer from a model path. Batching, back-off and order live in `memory/batching.py`.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from rerank_cli.model.precision import Precision
from rerank_cli.model.templates import Encoded

CROSS, LLM = "cross-encoder", "llm"
COUNTED = ("batches", "pairs", "real_tokens", "padded_tokens", "backoffs", "fp32_reruns", "windows", "truncated",
           "queries_cut", "passages_cut", "capped", "split", "split_windows", "prefix_saved")


@dataclass
class Stats:
    """Counters a scorer keeps for the run summary.

    A scorer counts the model inputs it scores as `pairs`; a `Reranker` reports the input pairs there
    instead, the model inputs as `windows`, and what was cut or split (see reranker.py)."""

    batches: int = 0
    pairs: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    backoffs: int = 0
    fp32_reruns: int = 0
    windows: int = 0  # model inputs: one per pair, more for passages scored in windows
    truncated: int = 0  # pairs whose query or passage lost tokens
    queries_cut: int = 0
    passages_cut: int = 0
    capped: int = 0  # passages whose windows reached --max-windows (the rest was cut)
    split: int = 0  # passages scored in more than one window
    split_windows: int = 0  # the windows of those
    prefix_saved: int = 0  # tokens not computed because their pair's shared prefix was (prefix.py)
    extra: dict = field(default_factory=dict)

    def add(self, other: Stats) -> None:
        for name in COUNTED:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class BaseScorer:
    """What every scorer shares: encode pairs with its template, collate, guard, count."""

    kind: str
    left_pad: bool

    def __init__(self, model, tokenizer, template, device: str, precision: Precision, normalize: bool):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.device, self.precision, self.normalize = device, precision, normalize
        self.pad_id = _pad_id(tokenizer)
        self.stats = Stats()
        fault = os.environ.get("RERANK_FAULT_OOM_TOKENS")
        self.fault_oom_tokens = int(fault) if fault else None

    def encode(self, queries, passages, instructions=None) -> list[Encoded]:
        return self.template.encode(queries, passages, instructions)

    def forward(self, batch: list[Encoded]) -> np.ndarray:
        """Scores (float32) for one batch; raises torch.OutOfMemoryError if it does not fit."""
        import torch

        inputs = self._collate(batch)
        shape = _shape(inputs)
        self._inject_oom(shape)
        with torch.inference_mode():
            scores = self._scores(self.model, inputs)
            if self.precision.name == "fp16" and not torch.isfinite(scores).all():
                with upcast(self.model, torch.float32):
                    scores = self._scores(self.model, inputs)
                self.stats.fp32_reruns += 1
            if self.normalize:
                scores = torch.sigmoid(scores)
        self._count(batch, shape, getattr(inputs, "saved", 0))
        return scores.float().cpu().numpy()

    def plan(self, encoded: list[Encoded], tokens: int | None = None) -> tuple[list[int], list[Encoded]] | None:
        """The order to batch `encoded` in (batches of about `tokens` padded tokens), with each item as the
        batches should see it (None: longest first)."""
        return None

    def _inject_oom(self, shape) -> None:
        if self.fault_oom_tokens is not None and shape[0] * shape[1] > self.fault_oom_tokens:
            import torch

            raise torch.OutOfMemoryError(
                f"RERANK_FAULT_OOM_TOKENS: {shape[0] * shape[1]} padded tokens > {self.fault_oom_tokens}"
            )

    def _count(self, batch: list[Encoded], shape, saved: int = 0) -> None:
        self.stats.batches += 1
        self.stats.prefix_saved += saved
        self.stats.pairs += len(batch)
        self.stats.real_tokens += sum(len(e.ids) for e in batch)
        self.stats.padded_tokens += shape[0] * shape[1]

    def _collate(self, batch: list[Encoded]) -> dict:
        import torch

        n, width = len(batch), max(len(e.ids) for e in batch)
        ids = np.full((n, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        types = np.zeros((n, width), dtype=np.int64) if batch[0].type_ids is not None else None
        for i, e in enumerate(batch):
            span = slice(width - len(e.ids), width) if self.left_pad else slice(0, len(e.ids))
            ids[i, span] = e.ids
            mask[i, span] = 1
            if types is not None:
                types[i, span] = e.type_ids
        out = {"input_ids": ids, "attention_mask": mask}
        if types is not None:
            out["token_type_ids"] = types
        return {k: torch.from_numpy(v).to(self.device) for k, v in out.items()}


@contextmanager
def upcast(model, dtype):
    """Run `model` in `dtype` for a moment: floating weights and buffers are cast in place and each is
    cast back to its own dtype after. fp16 -> fp32 -> fp16 is exact, and no second copy of the model
    is kept (a deep copy in fp32 would keep three times the fp16 weights in memory for the rest of the run)."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    saved = [t.dtype for t in tensors]
    for t in tensors:
        t.data = t.data.to(dtype)
    try:
        yield model
    finally:
        for t, original in zip(tensors, saved):
            t.data = t.data.to(original)


def _shape(inputs) -> tuple[int, int]:
    """Rows x padded width, as the token budget counts a batch (a shared prefix counted in every row)."""
    return tuple(inputs.shape) if hasattr(inputs, "shape") else tuple(inputs["input_ids"].shape)


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if tid is not None:
            return int(tid)
    return 0


class CrossEncoderScorer(BaseScorer):
    """...ForSequenceClassification: the logit (one label) or the log-odds of label 1 (two labels)."""

    kind, left_pad = CROSS, False

    def _scores(self, model, inputs):
        logits = model(**inputs).logits.float()
        return logits[:, 0] if logits.shape[1] == 1 else logits[:, -1] - logits[:, 0]


class LLMScorer(BaseScorer):
    """Causal LM yes/no reranker: decoder body, then last hidden state x the needed lm_head rows.

    With `share_prefix`, a prefix the pairs of a batch share is computed once (`prefix.py`)."""

    kind, left_pad = LLM, True

    def __init__(self, *args, share_prefix: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        from rerank_cli.model.head import LeanHead
        from rerank_cli.model.prefix import sliding_window
        from rerank_cli.model.prefix_cache import PrefixStore

        self.head = LeanHead(self.model, self.template, fold=self.precision.name != "fp32")
        self.share_prefix = share_prefix
        self.window = sliding_window(self.model.config)
        self.prefixes = PrefixStore() if share_prefix else None

    def plan(self, encoded: list[Encoded], tokens: int | None = None) -> tuple[list[int], list[Encoded]] | None:
        """Pairs grouped by shared prefix (`prefix.plan`); the kept prefixes hold at most half a batch's tokens,
        so their keys and values take at most half of what one batch's take."""
        from rerank_cli.model import prefix

        if not self.share_prefix:
            return None
        self.prefixes.limit = tokens // 2 if tokens else None
        return prefix.plan(encoded, self.prefixes.limit)

    def _collate(self, batch: list[Encoded]):
        if self.share_prefix:
            from rerank_cli.model import prefix

            shared = prefix.collate(batch, self.pad_id, self.device, self.window, self.prefixes.kept)
            if shared is not None:
                return shared
        return super()._collate(batch)

    def _scores(self, model, inputs):
        body = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
        if not isinstance(inputs, dict):
            return self.head(self.prefixes.run(body, inputs))
        mask = inputs["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = body(**inputs, position_ids=positions, use_cache=False).last_hidden_state[:, -1, :]
        return self.head(hidden)
