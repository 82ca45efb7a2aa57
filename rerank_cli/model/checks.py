"""Refuse a model that would score silently wrong: each check names what is missing or mismatched.

transformers loads a great deal that cannot rerank without complaint (its warnings are silenced in
`load.py`): a folder without tokenizer files gets a tokenizer of nothing but special tokens (every
word `[UNK]`); a cross-encoder asked to be an LLM gets a random language-model head; weights that
do not fit the config are "newly initialized" at random. Here, in load order:

- `kind_for`: the config's architectures against `--kind`;
- `check_max_length`: `--max-length` against the position embeddings, before any weights load;
- `check_tokenizer`: a vocabulary beyond the special tokens, and no id past the embedding;
- `check_head_tokens`: the template's answer tokens ("Yes", or "yes"/"no") exist in the vocabulary;
- `check_weights`: no weight missing or of the wrong shape; no layer the config does not have.

Every failure is a one-line `ModelError`. Loading itself is `load.py`'s job.
"""

from __future__ import annotations

import os
import re

from rerank_cli.errors import ModelError
from rerank_cli.model.scorers import CROSS, LLM

ARCHITECTURE_KINDS = (("ForSequenceClassification", CROSS), ("ForCausalLM", LLM), ("ForConditionalGeneration", LLM))
# Position ids counted from the padding id + 1 (RoBERTa's scheme): that many positions are never used.
PADDING_OFFSET_TYPES = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "mpnet",
                        "roberta-prelayernorm", "longformer", "ibert", "luke", "xmod"}
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
                   "sentencepiece.bpe.model", "spiece.model")
SHOWN = 4  # names per list in a message


def kind_for(config, requested: str, model: str) -> str:
    """cross-encoder for ...ForSequenceClassification, llm for ...ForCausalLM; --kind must agree.

    A --kind the architectures contradict is refused (a causal LM has no trained classifier, a
    classifier no trained language-model head); with architectures that name neither, --kind decides
    and `check_weights` refuses a head the checkpoint does not have.
    """
    archs = list(getattr(config, "architectures", None) or [])
    kinds = list(dict.fromkeys(kind for a in archs for suffix, kind in ARCHITECTURE_KINDS if a.endswith(suffix)))
    listed = ", ".join(archs) or "none listed"
    if requested == "auto":
        if kinds:
            return CROSS if CROSS in kinds else kinds[0]  # both listed: the classifier, as before
        raise ModelError(
            f"{model}: not a reranker this tool knows (architectures: {listed}); expected "
            "...ForSequenceClassification or ...ForCausalLM, or pass --kind"
        )
    if kinds and requested not in kinds:
        raise ModelError(f"model {model!r} is {_a(kinds[0])} (architectures: {listed}), not {_a(requested)}: "
                         f"drop --kind {requested} (auto detects it) or pass --kind {kinds[0]}")
    return requested


def _a(kind: str) -> str:
    return "a cross-encoder" if kind == CROSS else "an LLM reranker"


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def max_positions(config) -> tuple[int, str] | None:
    """The longest input the position embeddings take, and how that was worked out; None: no limit known."""
    text = text_config(config)
    n = getattr(text, "max_position_embeddings", None)
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        return None
    if getattr(text, "position_biased_input", True) is False:  # DeBERTa: relative positions only
        return None
    if getattr(text, "model_type", None) in PADDING_OFFSET_TYPES:
        offset = (getattr(text, "pad_token_id", None) or 1) + 1
        return n - offset, f"max_position_embeddings {n}, less {offset} for RoBERTa's padding offset"
    return n, f"max_position_embeddings {n}"


def check_max_length(config, max_length: int, model: str) -> None:
    """Refuse (before the weights load) a --max-length the model has no positions for."""
    limit = max_positions(config)
    if limit is not None and max_length > limit[0]:
        raise ModelError(f"--max-length {max_length} is more than model {model!r} reads: {limit[0]} tokens "
                         f"({limit[1]}); use --max-length {limit[0]} or less")


def check_tokenizer(tokenizer, config, model: str) -> None:
    """A vocabulary of real tokens, and no token id the model's embedding has no row for."""
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_ids)
    if not any(i not in special for i in vocab.values()):
        where = ""
        if os.path.isdir(model) and not any(os.path.exists(os.path.join(model, f)) for f in TOKENIZER_FILES):
            where = f"; the folder has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)"
        raise ModelError(f"model {model!r}: its tokenizer has no vocabulary, only {len(vocab)} special "
                         f"token(s){where}: every word would be unknown")
    rows = getattr(text_config(config), "vocab_size", None)
    top = max(vocab.values())
    if isinstance(rows, int) and top >= rows:
        raise ModelError(f"model {model!r}: its tokenizer has token ids up to {top} but the model's embedding "
                         f"has {rows} rows (vocab_size): the tokenizer belongs to another model")


def check_head_tokens(template, tokenizer, model: str) -> None:
    """The answer tokens an LLM template scores must be real tokens, not the unknown token or nothing."""
    words = getattr(template, "head_words", ())
    for word, tid in zip(words, getattr(template, "head_ids", ())):
        if tid is None or (tid == tokenizer.unk_token_id and word != tokenizer.unk_token):
            raise ModelError(f"model {model!r}: template {template.name!r} scores the token {word!r}, which its "
                             "tokenizer does not have; pick the template the model was trained with (--template)")


def check_weights(info: dict, net, model: str, log=None) -> None:
    """Every weight of the model loaded from the checkpoint at its shape; a checkpoint that has more
    layers than the config is refused too. Other unused checkpoint tensors (a pooler, another task's
    head) are ignored, as transformers does, and named in a note."""
    cls = type(net).__name__
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(info.get("mismatched_keys") or ())
    unexpected = sorted(info.get("unexpected_keys") or ())
    own = {_layer_pattern(k) for k in net.state_dict()}
    extra_layers = [k for k in unexpected if _layer_pattern(k) in own]
    problems = []
    if missing:
        problems.append(f"no weights for {_names(missing)} (they would be random)")
    if mismatched:
        shown = [f"{k} ({_shape(a)} in the checkpoint, {_shape(b)} in the config)" for k, a, b in mismatched]
        problems.append(f"weights of the wrong shape: {_names(shown)}")
    if extra_layers:
        problems.append(f"weights of layers the config does not have: {_names(extra_layers)}")
    if problems:
        raise ModelError(f"model {model!r}: its weights do not match its config ({cls}): {'; '.join(problems)}")
    if unexpected and log is not None:
        log(f"model {model!r}: checkpoint tensors {cls} does not use were ignored: {_names(unexpected)}")


def _layer_pattern(name: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", ".N", name)


def _shape(size) -> str:
    return "x".join(str(d) for d in size)


def _names(items: list[str]) -> str:
    more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more
