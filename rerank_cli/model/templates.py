"""Turn (query, passage[, instruction]) into token ids, exactly as each model family expects.

- `cross-encoder`: FlagReranker's pair encoding (query truncated to 3/4 of max length, then the
  passage truncated `only_second`, special tokens from the tokenizer's own post-processor).
- `bge`: FlagLLMReranker's prompt (bos unless it is the pad token, "A: {query}" capped at 3/4 of max
  length, "\\n", "B: {passage}" cut so both fit max length + len(sep) + len(prompt), "\\n", prompt); the
  score is the logit of the first token of "Yes" at the last position.
- `qwen3`: the Qwen3-Reranker chat format with an instruction; the score is the yes/no log-odds
  (sigmoid of it is p(yes)).

`pairs()` gives each pair's windows (`windows.py` says where they start): window 0 is the pair as
truncated above, and with a `WindowPolicy` of more than one window a passage longer than its room is
covered by more windows, each the same pair with another stretch of the passage's tokens. Each pair
also says whether its query or its passage was cut. Texts are tokenized only as far as the windows
reach (`bounded.py`). Works on the fast tokenizer's Rust backend in batches; no torch here.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field

from rerank_cli.model.bounded import encode_bounded
from rerank_cli.model.windows import TRUNCATE, WindowPolicy

BGE_PROMPT = (
    "Given a query A and a passage B, determine whether the passage contains an answer to the query "
    "by providing a prediction of either 'Yes' or 'No'."
)
BGE_QUERY, BGE_PASSAGE = "A: ", "B: "
QWEN3_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
QWEN3_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN3_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


@dataclass(frozen=True)
class Encoded:
    """One pair as model input: token ids and (for BERT-style models) token type ids; `shared`: how many
    leading ids it shares with the pairs of its prefix group (`prefix.plan`; 0: none)."""

    ids: list[int]
    type_ids: list[int] | None = None
    shared: int = 0


@dataclass
class PairWindows:
    """One pair's model inputs (window 0 first) and what was cut from what they hold."""

    windows: list[Encoded] = field(default_factory=list)
    query_cut: bool = False
    passage_cut: bool = False
    capped: bool = False  # the passage's tail was cut because its windows reached the policy's cap

    @property
    def truncated(self) -> bool:
        return self.query_cut or self.passage_cut


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


def label_length(offsets: list[tuple[int, int]], chars: int) -> int:
    """How many leading tokens lie within the first `chars` characters of the text they came from:
    where a label ("B: ", the qwen3 head) ends and the passage's own tokens begin."""
    return bisect_right([end for _, end in offsets], chars)


def window_ids(head: list[int], body: list[int], tail: list[int], width: int, starts: list[int]) -> list[list[int]]:
    """head + body[start:start + width] + tail for each start (window 0 is the truncated pair)."""
    return [head + body[s:s + width] + tail for s in starts]


class CrossEncoderTemplate:
    """FlagReranker's encoding for `...ForSequenceClassification` rerankers.

    Room for the passage: max_length - (query tokens, at most 3/4 of max_length) - the special tokens
    of a pair. Window k is the same post-processed pair with passage tokens [start_k, start_k + room).
    """

    name = "cross-encoder"

    def __init__(self, tokenizer, max_length: int):
        self.tok = backend(tokenizer)
        self.max_length = max_length
        self.query_max = max_length * 3 // 4
        self.n_special = self.tok.num_special_tokens_to_add(True)
        self.with_types = "token_type_ids" in getattr(tokenizer, "model_input_names", ())

    def encode(self, queries, passages, instructions=None) -> list[Encoded]:
        return [pair.windows[0] for pair in self.pairs(queries, passages, instructions)]

    def pairs(self, queries, passages, instructions=None, policy: WindowPolicy = TRUNCATE) -> list[PairWindows]:
        qs = encode_bounded(self.tok, queries, [self.query_max + 1] * len(queries))
        rooms = [self.max_length - min(len(q.ids), self.query_max) - self.n_special for q in qs]
        ps = encode_bounded(self.tok, passages, [policy.need(r) if r >= 1 else self.max_length + 1 for r in rooms])
        return [self._pair(q, p, room, policy) for q, p, room in zip(qs, ps, rooms)]

    def _pair(self, q, p, room: int, policy: WindowPolicy) -> PairWindows:
        query_cut = len(q.ids) > self.query_max
        if query_cut:
            q.truncate(self.query_max)
        passage = p.ids
        if room < 1:  # even an empty passage does not fit: transformers keeps it whole (to max_length)
            if len(passage) > self.max_length:
                p.truncate(self.max_length)
            return PairWindows([self._post(q, p)], query_cut, len(passage) > self.max_length)
        starts, capped = policy.starts(len(passage), room)
        width = min(room, len(passage))
        if len(passage) > width:
            p.truncate(width)
        enc = self.tok.post_process(q, p, add_special_tokens=True)
        first = Encoded(enc.ids, enc.type_ids if self.with_types else None)
        if len(starts) == 1:
            return PairWindows([first], query_cut, capped, capped)
        at = _passage_span(enc.sequence_ids, width)
        windows = [first] + [Encoded(first.ids[:at] + passage[s:s + width] + first.ids[at + width:], first.type_ids)
                             for s in starts[1:]]
        return PairWindows(windows, query_cut, capped, capped)

    def _post(self, q, p) -> Encoded:
        enc = self.tok.post_process(q, p, add_special_tokens=True)
        return Encoded(enc.ids, enc.type_ids if self.with_types else None)


def _passage_span(sequence_ids: list, width: int) -> int:
    """Where a post-processed pair holds its `width` passage tokens (sequence 1). Window k is window 0
    with those replaced: a post-processor adds the same special tokens and token types whichever
    tokens a passage of that length holds."""
    at = sequence_ids.index(1)
    if sequence_ids[at:at + width] != [1] * width or sequence_ids.count(1) != width:
        from rerank_cli.errors import ModelError

        raise ModelError("this tokenizer's pair template does not keep the passage's tokens together; "
                         "use --long-passages truncate")
    return at


class BgeTemplate:
    """FlagLLMReranker's prompt for bge-reranker-v2-gemma style causal rerankers.

    The passage is tokenized as "B: {passage}"; its label is the leading tokens within "B: ". Room for
    it: min(max_length, max_length + len(prompt) - len(bos + query)) tokens of "B: {passage}", the
    label included. Window k: bos + query + "\\n" + label + passage tokens [start_k, start_k + room -
    len(label)) + "\\n" + prompt.
    """

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
        return [pair.windows[0] for pair in self.pairs(queries, passages, instructions)]

    def pairs(self, queries, passages, instructions=None, policy: WindowPolicy = TRUNCATE) -> list[PairWindows]:
        qs = encode_bounded(self.tok, [f"{BGE_QUERY}{q}" for q in queries], [self.query_max + 1] * len(queries))
        prompts = self._prompts(instructions, len(qs))
        firsts = [self.bos + q.ids[:self.query_max] for q in qs]
        # FlagLLMReranker's budget counts the separator and prompt on top of max_length.
        rooms = [min(self.max_length, self.max_length + len(prompt) - len(first))
                 for first, prompt in zip(firsts, prompts)]
        ps = encode_bounded(self.tok, [f"{BGE_PASSAGE}{p}" for p in passages],
                            [policy.need(r) if r >= 1 else self.max_length + 1 for r in rooms])
        return [self._pair(first, len(q.ids) > self.query_max, p, prompt, room, policy)
                for q, first, p, prompt, room in zip(qs, firsts, ps, prompts, rooms)]

    def _pair(self, first, query_cut: bool, p, prompt, room: int, policy: WindowPolicy) -> PairWindows:
        tail = self.sep + prompt
        passage = p.ids
        if len(passage) <= room:  # it fits: nothing to cut, nothing to find
            return PairWindows([Encoded(first + self.sep + passage + tail)], query_cut)
        label = label_length(p.offsets[:8], len(BGE_PASSAGE))
        width = room - label
        if width < 1:  # no room past the label: exactly the reference's rule, one window
            second = truncate_second(first, self.sep + passage[:self.max_length],
                                     self.max_length + len(self.sep) + len(prompt))
            cut = len(second) - len(self.sep) < len(passage)
            return PairWindows([Encoded(first + second + tail)], query_cut, cut)
        body = passage[label:]
        starts, capped = policy.starts(len(body), width)
        ids = window_ids(first + self.sep + passage[:label], body, tail, width, starts)
        return PairWindows([Encoded(w) for w in ids], query_cut, capped, capped)

    def _prompts(self, instructions, n: int) -> list[list[int]]:
        if instructions is None:
            return [self.prompt_ids] * n
        return [self.prompt_ids if not i else _ids(self.tok, [i])[0] for i in instructions]

    @staticmethod
    def combine(logits):
        """[B, 1] head logits -> the "Yes" logit."""
        return logits[:, 0]


class Qwen3Template:
    """The Qwen3-Reranker chat format; score = logit(yes) - logit(no), sigmoid = p(yes).

    The body "<Instruct>: {instruction}\\n<Query>: {query}\\n<Document>: {passage}" is tokenized as one
    text and cut to max_length - len(prefix) - len(suffix) tokens. Its head is the leading tokens
    within the text before the passage; room for the passage: that budget minus the head. Window k:
    prefix + head + passage tokens [start_k, start_k + room) + suffix.
    """

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
        return [pair.windows[0] for pair in self.pairs(queries, passages, instructions)]

    def pairs(self, queries, passages, instructions=None, policy: WindowPolicy = TRUNCATE) -> list[PairWindows]:
        inst = instructions or [None] * len(queries)
        heads = [f"<Instruct>: {i or self.instruction}\n<Query>: {q}\n<Document>: " for q, i in zip(queries, inst)]
        bodies = encode_bounded(self.tok, [h + p for h, p in zip(heads, passages)],
                                [policy.need(self.body_max)] * len(heads))
        return [self._pair(len(h), b, bool(p), policy) for h, b, p in zip(heads, bodies, passages)]

    def _pair(self, head_chars: int, b, has_passage: bool, policy: WindowPolicy) -> PairWindows:
        ids = b.ids
        if len(ids) <= self.body_max:  # it fits: nothing to cut, nothing to find
            return PairWindows([Encoded(self.prefix + ids + self.suffix)])
        head = label_length(b.offsets, head_chars)
        width = self.body_max - head
        if width < 1:  # the instruction and query fill the body: cut as one text, one window
            passage_cut = has_passage if head > self.body_max else len(ids) > head  # none of it fits
            return PairWindows([Encoded(self.prefix + ids[:self.body_max] + self.suffix)],
                               head > self.body_max, passage_cut)
        body = ids[head:]
        starts, capped = policy.starts(len(body), width)
        windows = window_ids(self.prefix + ids[:head], body, self.suffix, width, starts)
        return PairWindows([Encoded(w) for w in windows], False, capped, capped)

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
