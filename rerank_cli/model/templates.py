"""Turn (query, passage[, instruction]) into token ids, exactly as each model family expects.

- `cross-encoder`: FlagReranker's pair encoding (query truncated to 3/4 of max length, then the
  passage truncated `only_second`, special tokens from the tokenizer's own post-processor).
- `bge`: FlagLLMReranker's prompt (bos unless it is the pad token, "A: {query}" capped at 3/4 of max
  length, "\\n", "B: {passage}" cut so both fit max length + len(sep) + len(prompt), "\\n", prompt); the
  score is the logit of the first token of "Yes" at the last position.
- `qwen3`: the Qwen3-Reranker chat format with an instruction; the score is the yes/no log-odds
  (sigmoid of it is p(yes)).

Works on the fast tokenizer's Rust backend in batches; no torch here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

BGE_PROMPT = (
    "Given a query A and a passage B, determine whether the passage contains an answer to the query "
    "by providing a prediction of either 'Yes' or 'No'."
)
QWEN3_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
QWEN3_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN3_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


@dataclass(frozen=True)
class Encoded:
    """One pair as model input: token ids and (for BERT-style models) token type ids."""

    ids: list[int]
    type_ids: list[int] | None = None


def backend(tokenizer):
    """The tokenizer's Rust backend, with any saved truncation/padding switched off."""
    import copy

    tok = copy.deepcopy(tokenizer.backend_tokenizer)
    tok.no_truncation()
    tok.no_padding()
    return tok


def _ids(tok, texts: Sequence[str], limit: int | None = None) -> list[list[int]]:
    encs = tok.encode_batch(list(texts), add_special_tokens=False)
    return [e.ids[:limit] if limit is not None else e.ids for e in encs]


def truncate_second(first: list[int], second: list[int], max_length: int, extra: int = 0) -> list[int]:
    """transformers' `only_second` truncation: cut the second sequence's tail so the total fits.

    Like transformers, leaves it whole when even an empty second sequence would not fit.
    """
    remove = len(first) + len(second) + extra - max_length
    if remove <= 0 or len(second) <= remove:
        return second
    return second[: len(second) - remove]


class CrossEncoderTemplate:
    """FlagReranker's encoding for `...ForSequenceClassification` rerankers."""

    name = "cross-encoder"

    def __init__(self, tokenizer, max_length: int):
        self.tok = backend(tokenizer)
        self.max_length = max_length
        self.query_max = max_length * 3 // 4
        self.n_special = self.tok.num_special_tokens_to_add(True)
        self.with_types = "token_type_ids" in getattr(tokenizer, "model_input_names", ())

    def encode(self, queries, passages, instructions=None) -> list[Encoded]:
        qs = self.tok.encode_batch(list(queries), add_special_tokens=False)
        ps = self.tok.encode_batch(list(passages), add_special_tokens=False)
        return [self._pair(q, p) for q, p in zip(qs, ps)]

    def _pair(self, q, p) -> Encoded:
        if len(q.ids) > self.query_max:
            q.truncate(self.query_max)
        if len(p.ids) > self.max_length:
            p.truncate(self.max_length)
        keep = len(truncate_second(q.ids, p.ids, self.max_length, self.n_special))
        if keep < len(p.ids):
            p.truncate(keep)
        enc = self.tok.post_process(q, p, add_special_tokens=True)
        return Encoded(enc.ids, enc.type_ids if self.with_types else None)


class BgeTemplate:
    """FlagLLMReranker's prompt for bge-reranker-v2-gemma style causal rerankers."""

    name = "bge"
    head_words = ("Yes",)  # the score is the logit of its first token

    def __init__(self, tokenizer, max_length: int, prompt: str | None = None):
        self.tok = backend(tokenizer)
        self.max_length = max_length
        self.query_max = max_length * 3 // 4
        bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
        self.bos = [bos] if bos is not None and bos != pad else []  # FlagLLMReranker's rule
        self.sep = _ids(self.tok, ["\n"])[0]
        self.default_prompt = prompt or BGE_PROMPT
        self.prompt_ids = _ids(self.tok, [self.default_prompt])[0]
        self.head_ids = (_ids(self.tok, ["Yes"])[0] or [None])[:1]  # None: checked by model/checks.py

    def encode(self, queries, passages, instructions=None) -> list[Encoded]:
        qs = _ids(self.tok, [f"A: {q}" for q in queries], self.query_max)
        ps = _ids(self.tok, [f"B: {p}" for p in passages], self.max_length)
        prompts = self._prompts(instructions, len(qs))
        out = []
        for q, p, prompt in zip(qs, ps, prompts):
            first, second = self.bos + q, self.sep + p
            # FlagLLMReranker's budget counts the separator and prompt on top of max_length.
            second = truncate_second(first, second, self.max_length + len(self.sep) + len(prompt))
            out.append(Encoded(first + second + self.sep + prompt))
        return out

    def _prompts(self, instructions, n: int) -> list[list[int]]:
        if instructions is None:
            return [self.prompt_ids] * n
        return [self.prompt_ids if not i else _ids(self.tok, [i])[0] for i in instructions]

    @staticmethod
    def combine(logits):
        """[B, 1] head logits -> the "Yes" logit."""
        return logits[:, 0]


class Qwen3Template:
    """The Qwen3-Reranker chat format; score = logit(yes) - logit(no), sigmoid = p(yes)."""

    name = "qwen3"
    head_words = ("no", "yes")

    def __init__(self, tokenizer, max_length: int, instruction: str | None = None):
        self.tok = backend(tokenizer)
        self.max_length = max_length
        self.prefix = _ids(self.tok, [QWEN3_PREFIX])[0]
        self.suffix = _ids(self.tok, [QWEN3_SUFFIX])[0]
        self.body_max = max(1, max_length - len(self.prefix) - len(self.suffix))
        self.instruction = instruction or QWEN3_INSTRUCTION
        yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
        self.head_ids = [no, yes]

    def encode(self, queries, passages, instructions=None) -> list[Encoded]:
        inst = instructions or [None] * len(queries)
        texts = [
            f"<Instruct>: {i or self.instruction}\n<Query>: {q}\n<Document>: {p}"
            for q, p, i in zip(queries, passages, inst)
        ]
        return [Encoded(self.prefix + ids + self.suffix) for ids in _ids(self.tok, texts, self.body_max)]

    @staticmethod
    def combine(logits):
        """[B, 2] (no, yes) logits -> log-odds of yes."""
        return logits[:, 1] - logits[:, 0]


LLM_TEMPLATES = {"bge": BgeTemplate, "qwen3": Qwen3Template}


def make_template(kind: str, name: str | None, tokenizer, max_length: int, instruction: str | None):
    if kind == "cross-encoder":
        return CrossEncoderTemplate(tokenizer, max_length)
    name = name or "bge"
    if name not in LLM_TEMPLATES:
        from rerank_cli.errors import ConfigError

        raise ConfigError(f"unknown --template {name!r} (known: {', '.join(LLM_TEMPLATES)})")
    return LLM_TEMPLATES[name](tokenizer, max_length, instruction)
