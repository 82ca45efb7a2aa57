"""Load a reranker and run its forward pass: cross-encoders and causal-LM yes/no rerankers.

Owns `from_pretrained`, the choice of kind (from the config's architectures, or --kind), collation
(right padding for encoders, left for causal LMs) and the lean LLM head: only the last position's
hidden state times the one or two lm_head rows the score needs, never full-vocabulary logits.
`lean.py` trims the final layer to the one position the score reads.
Batching, back-off and order live in `batching.py`; this module scores one batch at a time.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from rerank_cli.errors import ModelError, first_line
from rerank_cli.precision import Precision, check_device, choose_dtype
from rerank_cli.templates import Encoded, make_template

CROSS, LLM = "cross-encoder", "llm"


@dataclass
class Stats:
    """Counters a scorer keeps for the run summary."""

    batches: int = 0
    pairs: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    backoffs: int = 0
    fp32_reruns: int = 0
    extra: dict = field(default_factory=dict)

    def add(self, other: Stats) -> None:
        for name in ("batches", "pairs", "real_tokens", "padded_tokens", "backoffs", "fp32_reruns"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def detect_kind(config, requested: str, model: str) -> str:
    """cross-encoder for ...ForSequenceClassification, llm for ...ForCausalLM, unless --kind says."""
    if requested != "auto":
        return requested
    archs = list(getattr(config, "architectures", None) or [])
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return CROSS
    if any(a.endswith(("ForCausalLM", "ForConditionalGeneration")) for a in archs):
        return LLM
    found = ", ".join(archs) or "none listed"
    raise ModelError(
        f"{model}: not a reranker this tool knows (architectures: {found}); expected "
        "...ForSequenceClassification or ...ForCausalLM, or pass --kind"
    )


def load_config(model: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        where = "is not a model folder" if os.path.isdir(model) else "not found (no folder, not on the hub)"
        raise ModelError(f"model {model!r} {where}: {first_line(exc)}") from None


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
        self._inject_oom(inputs["input_ids"].shape)
        with torch.inference_mode():
            scores = self._scores(self.model, inputs)
            if self.precision.name == "fp16" and not torch.isfinite(scores).all():
                with upcast(self.model, torch.float32):
                    scores = self._scores(self.model, inputs)
                self.stats.fp32_reruns += 1
            if self.normalize:
                scores = torch.sigmoid(scores)
        self._count(batch, inputs["input_ids"].shape)
        return scores.float().cpu().numpy()

    def _inject_oom(self, shape) -> None:
        if self.fault_oom_tokens is not None and shape[0] * shape[1] > self.fault_oom_tokens:
            import torch

            raise torch.OutOfMemoryError(
                f"RERANK_FAULT_OOM_TOKENS: {shape[0] * shape[1]} padded tokens > {self.fault_oom_tokens}"
            )

    def _count(self, batch: list[Encoded], shape) -> None:
        self.stats.batches += 1
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
    """Causal LM yes/no reranker: decoder body, then last hidden state x the needed lm_head rows."""

    kind, left_pad = LLM, True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None)

    def _scores(self, model, inputs):
        import torch

        mask = inputs["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        body = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
        hidden = body(**inputs, position_ids=positions, use_cache=False).last_hidden_state[:, -1, :]
        head = model.get_output_embeddings()
        rows = head.weight[self.template.head_ids]
        logits = hidden @ rows.T
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[self.template.head_ids]
        logits = logits.float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return self.template.combine(logits)


def load_scorer(
    model: str,
    device: str = "cpu",
    *,
    kind: str = "auto",
    dtype: str = "auto",
    template: str | None = None,
    max_length: int = 512,
    instruction: str | None = None,
    normalize: bool = False,
    trust_remote_code: bool = False,
    device_map: dict | str | None = None,
) -> BaseScorer:
    """Load tokenizer and weights once for `device`, at the dtype `choose_dtype` picks."""
    check_device(device)
    precision = choose_dtype(dtype, device)
    quiet_transformers()
    config = load_config(model, trust_remote_code)
    kind = detect_kind(config, kind, model)
    tokenizer = _load_tokenizer(model, trust_remote_code)
    tmpl = make_template(kind, template, tokenizer, max_length, instruction)
    net = _load_weights(model, kind, precision, device, trust_remote_code, device_map)
    if device_map is None:  # a layer split across devices keeps its stock forward (and accelerate's hooks)
        from rerank_cli.lean import prune_last_layer

        prune_last_layer(net, kind)
    cls = CrossEncoderScorer if kind == CROSS else LLMScorer
    return cls(net, tokenizer, tmpl, device, precision, normalize)


def quiet_transformers() -> None:
    """Our progress and messages only: no per-load progress bars or advisory warnings."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _load_tokenizer(model: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model {model!r}: cannot load its tokenizer: {first_line(exc)}") from None
    if not hasattr(tok, "backend_tokenizer"):
        raise ModelError(f"model {model!r}: needs a fast (tokenizers) tokenizer")
    return tok


def _load_weights(model: str, kind: str, precision: Precision, device: str, trust_remote_code: bool,
                  device_map):
    import transformers

    auto = transformers.AutoModelForSequenceClassification, transformers.AutoModelForCausalLM
    cls = auto[0] if kind == CROSS else auto[1]
    kwargs = {"dtype": precision.torch_dtype, "trust_remote_code": trust_remote_code}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        net = cls.from_pretrained(model, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model {model!r}: cannot load {kind} weights: {first_line(exc)}") from None
    if device_map is None:
        net = net.to(device)
    return net.eval()
