"""Build a scorer from a model path or hub id: `from_pretrained` for the config, tokenizer and weights.

Owns the choice of kind (from the config's architectures, or --kind), the dtype the weights load in
(`precision.choose_dtype`), the device placement (or a device map spread over several GPUs), and the
final-layer trim (`lean.py`). What a loaded scorer does with a batch is `scorers.py`'s job.
"""

from __future__ import annotations

import os

from rerank_cli.errors import ModelError, first_line
from rerank_cli.model.precision import Precision, check_device, choose_dtype
from rerank_cli.model.scorers import CROSS, LLM, BaseScorer, CrossEncoderScorer, LLMScorer
from rerank_cli.model.templates import make_template


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
        from rerank_cli.model.lean import prune_last_layer

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
