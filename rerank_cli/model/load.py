"""Build a scorer from a model path or hub id: `from_pretrained` for the config, tokenizer and weights.

Owns the choice of kind (from the config's architectures, or --kind), the dtype the weights load in
(`precision.choose_dtype`), the device placement (or a device map spread over several GPUs), the
final-layer trim (`lean.py`) and the fp32 scoring head (`head.py`). `checks.py` refuses, on the way,
a model that would score silently wrong. What a loaded scorer does with a batch is `scorers.py`'s job.
"""

from __future__ import annotations

import os

from rerank_cli.errors import ModelError, first_line
from rerank_cli.model.checks import check_head_tokens, check_max_length, check_tokenizer, check_weights, kind_for
from rerank_cli.model.precision import Precision, check_device, choose_dtype
from rerank_cli.model.scorers import CROSS, BaseScorer, CrossEncoderScorer, LLMScorer
from rerank_cli.model.templates import make_template


def detect_kind(config, requested: str, model: str) -> str:
    """cross-encoder for ...ForSequenceClassification, llm for ...ForCausalLM; a --kind they contradict
    is an error (`checks.kind_for`)."""
    return kind_for(config, requested, model)


def load_config(model: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    if os.path.exists(model) and not os.path.isdir(model):
        raise ModelError(f"model {model!r} is a file, not a model folder (config.json, weights, tokenizer files)")
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
    share_prefix: bool = True,
    log=None,
) -> BaseScorer:
    """Load tokenizer and weights once for `device`, at the dtype `choose_dtype` picks.

    A model that would score silently wrong is refused on the way (`checks.py`); `log` gets notes.
    `share_prefix`: a causal LM computes a prefix its pairs share once per batch (`prefix.py`).
    """
    check_device(device)
    precision = choose_dtype(dtype, device)
    quiet_transformers()
    config = load_config(model, trust_remote_code)
    kind = detect_kind(config, kind, model)
    check_max_length(config, max_length, model)
    tokenizer = _load_tokenizer(model, trust_remote_code)
    check_tokenizer(tokenizer, config, model)
    tmpl = make_template(kind, template, tokenizer, max_length, instruction)
    check_head_tokens(tmpl, tokenizer, model)
    net = _load_weights(model, kind, precision, device, trust_remote_code, device_map, log)
    if device_map is None:  # a layer split across devices keeps its stock forward (and accelerate's hooks)
        from rerank_cli.model.lean import prune_last_layer

        prune_last_layer(net, kind)
    from rerank_cli.model.head import fp32_head

    fp32_head(net, kind)
    if kind == CROSS:
        return CrossEncoderScorer(net, tokenizer, tmpl, device, precision, normalize)
    return LLMScorer(net, tokenizer, tmpl, device, precision, normalize, share_prefix=share_prefix)


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
                  device_map, log=None):
    import transformers

    auto = transformers.AutoModelForSequenceClassification, transformers.AutoModelForCausalLM
    cls = auto[0] if kind == CROSS else auto[1]
    # Shape mismatches are listed (not raised with a pointer to a silenced report) for check_weights.
    kwargs = {"dtype": precision.torch_dtype, "trust_remote_code": trust_remote_code,
              "output_loading_info": True, "ignore_mismatched_sizes": True}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        net, info = cls.from_pretrained(model, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model {model!r}: cannot load {kind} weights: {first_line(exc)}") from None
    check_weights(info, net, model, log)
    if device_map is None:
        net = net.to(device)
    return net.eval()
