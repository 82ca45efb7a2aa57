"""Build small random-weight rerankers and synthetic pair files, locally and deterministically.

Tests, `make demo` and `make bench` use these instead of hub downloads: a BERT cross-encoder
(`BertForSequenceClassification`, WordPiece tokenizer) and a Qwen2 yes/no LLM reranker
(`Qwen2ForCausalLM`, byte-level BPE tokenizer trained with `tokenizers`, with "Yes"/"yes"/"no" single
tokens, a bos token, and the Qwen3 chat markers as special tokens). Both load with `from_pretrained`
in transformers 4 and 5, so FlagEmbedding and sentence-transformers accept them too.
`build_shaped` gives random weights the shape of a real model (`SHAPES`: bge-reranker-v2-m3,
Qwen3-Reranker-0.6B) for GPU benchmarks and memory tests (`make gpu-check`).

    python -m rerank_cli.model.tiny OUT_DIR [--size tiny|bench] [--pairs N]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SIZES = {
    # name: (layers, hidden, heads, intermediate, vocabulary target)
    "tiny": (2, 64, 4, 128, 1000),
    "bench-ce": (6, 384, 6, 1536, 8000),  # ~13M parameters
    "bench-llm": (6, 512, 8, 1408, 8000),  # ~26M parameters
}
SYLLABLES = "ka ri to an el mo su ne la vi or de ta pe lu fi sa go ru bi na co te mi po ha ze yu qu xo".split()
LEXICON = 6000  # pseudo-words: enough for ~8k-token vocabularies at bench size
ANSWER_WORDS = ["Yes", "yes", "no", "No", "Yes.", "no."]
CHAT_SPECIALS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Qwen2's own pre-tokenizer split: transformers 5 rebuilds a Qwen2 tokenizer with it whatever
# tokenizer.json says, transformers 4 reads tokenizer.json as is; using it makes both agree.
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Real rerankers' shapes for `build_shaped`: parameters, embedding size and so memory and FLOPs are theirs.
SHAPES = {
    "bge-reranker-v2-m3": dict(arch="xlm-roberta", layers=24, hidden=1024, heads=16, intermediate=4096,
                               vocab=250002, positions=8194),  # XLM-RoBERTa large: 568M parameters
    "qwen3-reranker-0.6b": dict(arch="qwen3", layers=28, hidden=1024, heads=16, kv_heads=8, head_dim=128,
                                intermediate=3072, vocab=151936, tied=True),  # 596M parameters
}
# Weight init std: large enough that scores spread (0.02 gives near-constant scores on random weights),
# small enough for deeper bench models to stay numerically well-conditioned.
INIT_RANGE = {"tiny": 0.2, "bench": 0.08}


def lexicon(n: int, seed: int = 0) -> list[str]:
    """`n` distinct pseudo-words built from syllables (deterministic)."""
    rng = random.Random(seed)
    words: dict[str, None] = {}
    while len(words) < n:
        words["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4)))] = None
    return list(words)


def sentence(rng: random.Random, words: list[str], k: int) -> str:
    # Skewed like text: low-index words are much more frequent than the rest.
    return " ".join(words[int(len(words) * rng.random() ** 3)] for _ in range(k))


def corpus(seed: int, n: int = 6000) -> list[str]:
    rng = random.Random(seed)
    words = lexicon(LEXICON, seed)
    lines = [sentence(rng, words, rng.randint(3, 30)) + rng.choice([".", "?", "!", ",", ""]) for _ in range(n)]
    lines += [" ".join(rng.sample(words, 40)) for _ in range(200)]
    return lines + ANSWER_WORDS * 200 + ["A: B: \n 0123456789 '\"()-:;<>/|"]


def build_cross_encoder(path: str | Path, size: str = "tiny", seed: int = 0, arch: str = "bert") -> Path:
    """A one-label ...ForSequenceClassification reranker with a tokenizer trained here, saved to `path`.

    `arch="bert"`: BERT with a WordPiece tokenizer and token types ([CLS] A [SEP] B [SEP]).
    `arch="xlm-roberta"` (bge-reranker-v2-m3's family): XLM-RoBERTa with a Unigram tokenizer, no token
    types, RoBERTa's pair format (<s> A </s></s> B </s>) and positions counted from the pad id.
    """
    import torch

    layers, hidden, heads, inter, vocab = SIZES["bench-ce" if size == "bench" else size]
    hf_tok = _wordpiece_tokenizer(seed, vocab) if arch == "bert" else _unigram_tokenizer(seed, vocab)
    out = Path(path)
    hf_tok.save_pretrained(out)
    torch.manual_seed(seed)
    common = dict(vocab_size=len(hf_tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=inter, num_labels=1, pad_token_id=hf_tok.pad_token_id,
                  initializer_range=INIT_RANGE[size[:5]])
    if arch == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        ordered = sorted(hf_tok.backend_tokenizer.get_vocab().items(), key=lambda kv: kv[1])
        (out / "vocab.txt").write_text("".join(t + "\n" for t, _ in ordered), encoding="utf-8")
        model = BertForSequenceClassification(BertConfig(max_position_embeddings=512, **common))
    elif arch == "xlm-roberta":
        from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

        _loadable_by_transformers_4(out / "tokenizer_config.json", "XLMRobertaTokenizer")
        cfg = XLMRobertaConfig(max_position_embeddings=514, type_vocab_size=1, bos_token_id=hf_tok.cls_token_id,
                               eos_token_id=hf_tok.sep_token_id, **common)
        model = XLMRobertaForSequenceClassification(cfg)
    else:
        raise ValueError(f"unknown cross-encoder arch {arch!r}")
    model.eval().save_pretrained(out)
    return out


def _wordpiece_tokenizer(seed: int, vocab: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.train_from_iterator(corpus(seed), trainers.WordPieceTrainer(
        vocab_size=vocab, special_tokens=specials, show_progress=False))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                             cls_token="[CLS]", mask_token="[MASK]", do_lower_case=True, model_max_length=512)


def _unigram_tokenizer(seed: int, vocab: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # XLM-R's ids: <s>=0, <pad>=1, </s>=2
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(corpus(seed), trainers.UnigramTrainer(
        vocab_size=vocab, special_tokens=specials, unk_token="<unk>", show_progress=False))
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")),
                                                      ("<s>", tok.token_to_id("<s>")))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                   cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                                   model_max_length=512, model_input_names=["input_ids", "attention_mask"])


def build_llm(path: str | Path, size: str = "tiny", seed: int = 0, arch: str = "qwen2",
              prompt_words: bool = False) -> Path:
    """A ...ForCausalLM yes/no reranker with a byte-level BPE tokenizer trained here, saved to `path`.

    `arch="qwen2"` (Qwen3-Reranker's lineage, untied head) or `arch="gemma"` (bge-reranker-v2-gemma's
    family: scaled embeddings, GELU MLP, tied head). With `prompt_words` the tokenizer also learns the
    English of the templates' fixed text (system prompts, instructions), so a prompt costs about the
    tokens a real model's tokenizer gives it (without, it is spelled out in bytes: 3-4x as many).
    """
    import torch

    layers, hidden, heads, inter, vocab = SIZES["bench-llm" if size == "bench" else size]
    hf_tok = _byte_bpe_tokenizer(seed, vocab, _prompt_texts() if prompt_words else [])
    out = Path(path)
    hf_tok.save_pretrained(out)
    _loadable_by_transformers_4(out / "tokenizer_config.json")
    torch.manual_seed(seed)
    common = dict(vocab_size=len(hf_tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=4096,
                  initializer_range=INIT_RANGE[size[:5]], bos_token_id=hf_tok.bos_token_id,
                  eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id)
    if arch == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, use_sliding_window=False, **common))
    elif arch == "gemma":
        from transformers import GemmaConfig, GemmaForCausalLM

        model = GemmaForCausalLM(GemmaConfig(head_dim=hidden // heads, tie_word_embeddings=True, **common))
    else:
        raise ValueError(f"unknown LLM arch {arch!r}")
    model.eval().save_pretrained(out)
    return out


def _prompt_texts() -> list[str]:
    from rerank_cli.model.templates import BGE_PROMPT, QWEN3_INSTRUCTION, QWEN3_PREFIX, QWEN3_SUFFIX

    return [QWEN3_PREFIX, QWEN3_SUFFIX, QWEN3_INSTRUCTION, BGE_PROMPT, "<Instruct>: \n<Query>: \n<Document>: "] * 50


def _byte_bpe_tokenizer(seed: int, vocab: int, extra: list[str] = ()):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|bos|>"] + CHAT_SPECIALS
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(corpus(seed) + list(extra), trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    for word in ("Yes", "yes", "no"):
        assert len(tok.encode(word).ids) == 1, f"{word!r} must be a single token"
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        additional_special_tokens=CHAT_SPECIALS, model_max_length=4096)


def _loadable_by_transformers_4(config_path: Path, cls: str = "PreTrainedTokenizerFast") -> None:
    """transformers 5 saves tokenizer_class "TokenizersBackend" and a list of extra special tokens;
    transformers 4 (FlagEmbedding's) reads neither. Rewrite to the form both read, naming `cls`."""
    cfg = json.loads(config_path.read_text())
    cfg["tokenizer_class"] = cls
    if isinstance(cfg.get("extra_special_tokens"), list):
        cfg["additional_special_tokens"] = cfg.pop("extra_special_tokens")
    config_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def build_shaped(path: str | Path, shape: dict, *, seed: int = 0, tokenizer_vocab: int = 8000,
                 dtype: str = "bfloat16", device: str = "cpu", init_range: float = 0.05) -> Path:
    """A random-weight reranker of `shape` (a `SHAPES` entry, or one with some numbers changed), saved in `dtype`.

    The tokenizer is trained here on `tokenizer_vocab` entries (Unigram for XLM-RoBERTa, byte-level BPE for
    Qwen3); the embedding keeps the shape's vocabulary, so parameters and memory are the real model's and
    every token id is in range. `device` is where the weights are initialized ("cuda" is much faster for
    the 0.6B shapes); they are saved from there.
    """
    import torch

    arch = shape["arch"]
    if arch == "xlm-roberta":
        hf_tok = _unigram_tokenizer(seed, tokenizer_vocab)
    elif arch == "qwen3":
        hf_tok = _byte_bpe_tokenizer(seed, tokenizer_vocab)
    else:
        raise ValueError(f"unknown shaped arch {arch!r} (known: xlm-roberta, qwen3)")
    if len(hf_tok) > shape["vocab"]:
        raise ValueError(f"the tokenizer's {len(hf_tok)} tokens do not fit a vocabulary of {shape['vocab']}")
    out = Path(path)
    hf_tok.save_pretrained(out)
    _loadable_by_transformers_4(out / "tokenizer_config.json",
                                "XLMRobertaTokenizer" if arch == "xlm-roberta" else "PreTrainedTokenizerFast")
    cls, config = _shaped_config(shape, hf_tok, init_range)
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls(config)
    model.to(getattr(torch, dtype)).eval().save_pretrained(out)
    return out


def _shaped_config(shape: dict, hf_tok, init_range: float):
    common = dict(vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                  num_attention_heads=shape["heads"], intermediate_size=shape["intermediate"],
                  initializer_range=init_range, pad_token_id=hf_tok.pad_token_id)
    if shape["arch"] == "xlm-roberta":
        from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

        return XLMRobertaForSequenceClassification, XLMRobertaConfig(
            max_position_embeddings=shape["positions"], type_vocab_size=1, num_labels=1,
            bos_token_id=hf_tok.cls_token_id, eos_token_id=hf_tok.sep_token_id, **common)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM, Qwen3Config(
        num_key_value_heads=shape["kv_heads"], head_dim=shape["head_dim"], tie_word_embeddings=shape["tied"],
        max_position_embeddings=40960, bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id,
        **common)


def make_pairs(n: int, seed: int = 0, queries: int | None = None, long_every: int = 7) -> dict[str, list]:
    """Columns qid, pid, query, passage, label: `n` pairs over `queries` topics, of varied length.

    A passage is relevant (label 1) when it mentions its query's topic word; some passages run past
    512 tokens and some queries past 3/4 of that, so truncation paths are exercised.
    """
    rng = random.Random(seed + 1)
    words = lexicon(LEXICON, seed)
    nq = queries or max(1, n // 20)
    topics = [words[rng.randrange(50, LEXICON)] for _ in range(nq)]
    cols: dict[str, list] = {"qid": [], "pid": [], "query": [], "passage": [], "label": []}
    for i in range(n):
        q = i * nq // n
        relevant = rng.random() < 0.3
        length = rng.randint(500, 700) if i % long_every == 3 else rng.randint(5, 180)
        body = sentence(rng, words, length)
        passage = f"{topics[q]} {body}" if relevant else body
        query = sentence(rng, words, rng.randint(1, 12)) + f" {topics[q]}?"
        if i % 97 == 5:
            query = sentence(rng, words, rng.randint(400, 450)) + f" {topics[q]}?"
        cols["qid"].append(f"q{q}")
        cols["pid"].append(f"p{i}")
        cols["query"].append(query)
        cols["passage"].append(passage)
        cols["label"].append(int(relevant))
    return cols


def write_pairs(path: str | Path, n: int, seed: int = 0, queries: int | None = None) -> Path:
    """Write `make_pairs` to .parquet, .jsonl or .csv (by extension)."""
    import pyarrow as pa

    table = pa.table(make_pairs(n, seed, queries))
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, path)
    elif path.suffix == ".csv":
        import pyarrow.csv as pcsv

        pcsv.write_csv(table, path)
    else:
        with open(path, "w", encoding="utf-8") as fh:
            for row in table.to_pylist():
                fh.write(json.dumps(row) + "\n")
    return path


def write_qrels(path: str | Path, pairs_path: str | Path) -> Path:
    """TREC qrels (`qid 0 pid label`) for a pair file written by `write_pairs`."""
    import pyarrow.parquet as pq

    t = pq.read_table(pairs_path, columns=["qid", "pid", "label"]).to_pydict()
    with open(path, "w", encoding="utf-8") as fh:
        for q, p, rel in zip(t["qid"], t["pid"], t["label"]):
            fh.write(f"{q} 0 {p} {rel}\n")
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Build small local rerankers and pair files.")
    ap.add_argument("out")
    ap.add_argument("--size", choices=["tiny", "bench"], default="tiny")
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ce = build_cross_encoder(out / f"{a.size}-ce", a.size, a.seed)
    llm = build_llm(out / f"{a.size}-llm", a.size, a.seed)
    pairs = write_pairs(out / "pairs.parquet", a.pairs, a.seed)
    qrels = write_qrels(out / "qrels.trec", pairs)
    print(json.dumps({"cross_encoder": str(ce), "llm": str(llm), "pairs": str(pairs), "qrels": str(qrels)}))


if __name__ == "__main__":
    main()
