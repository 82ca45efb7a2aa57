"""Models that would score silently wrong are refused with one line: exit 2, no traceback, no output.

Each broken model is a copy of a tiny model with one thing wrong: no tokenizer files, the wrong
--kind, weights that do not fit the config, a tokenizer from another model, an LLM template whose
answer token the tokenizer lacks, a --max-length past the position embeddings.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def _assert_refused(result, out: Path, line: str) -> None:
    code, stdout, err = result
    assert code == 2, err
    assert err == f"error: {line}\n"  # -q: the one line and nothing else
    assert stdout == "" and "Traceback" not in err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def _copy(src: str, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst, ignore=lambda _, names: [n for n in names if n in skip])
    return dst


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _score(cli, model, pairs, out, *flags):
    return cli("score", str(pairs), "-o", str(out), "-m", str(model), "-q", *flags)


@pytest.mark.parametrize("which", ["ce_model", "xlmr_model", "llm_model"])
def test_a_model_folder_without_tokenizer_files_is_refused(cli, request, pairs_jsonl, tmp_path, which):
    # transformers would build a tokenizer of special tokens only and score every word as unknown
    model = _copy(request.getfixturevalue(which), tmp_path / "no-tokenizer", skip=TOKENIZER_FILES)
    specials = 1 if which == "llm_model" else 5
    out = tmp_path / "out.jsonl"
    _assert_refused(_score(cli, model, pairs_jsonl, out), out,
                    f"model '{model}': its tokenizer has no vocabulary, only {specials} special token(s); the "
                    "folder has no tokenizer files (tokenizer.json, vocab.txt, vocab.json, ...): every word "
                    "would be unknown")


def test_a_kind_the_architectures_contradict_is_refused(cli, ce_model, llm_model, pairs_jsonl, tmp_path):
    out = tmp_path / "out.jsonl"
    _assert_refused(_score(cli, ce_model, pairs_jsonl, out, "--kind", "llm"), out,
                    f"model '{ce_model}' is a cross-encoder (architectures: BertForSequenceClassification), not an "
                    "LLM reranker: drop --kind llm (auto detects it) or pass --kind cross-encoder")
    _assert_refused(_score(cli, llm_model, pairs_jsonl, out, "--kind", "cross-encoder"), out,
                    f"model '{llm_model}' is an LLM reranker (architectures: Qwen2ForCausalLM), not a "
                    "cross-encoder: drop --kind cross-encoder (auto detects it) or pass --kind llm")
    code, _, err = _score(cli, llm_model, pairs_jsonl, out, "--kind", "llm")  # the kind it is: fine
    assert code == 0, err


def test_a_kind_for_unlisted_architectures_still_needs_every_head_weight(cli, ce_model, pairs_jsonl, tmp_path):
    model = _copy(ce_model, tmp_path / "no-archs")
    _edit_config(model, architectures=None)
    out = tmp_path / "out.jsonl"
    _assert_refused(_score(cli, model, pairs_jsonl, out), out,
                    f"{model}: not a reranker this tool knows (architectures: none listed); expected "
                    "...ForSequenceClassification or ...ForCausalLM, or pass --kind")
    code, _, err = _score(cli, model, pairs_jsonl, out, "--kind", "cross-encoder")
    assert code == 0, err
    out.unlink()
    # as a causal LM, BERT would get a random language-model head: named, and refused
    code, _, err = _score(cli, model, pairs_jsonl, out, "--kind", "llm")
    assert code == 2 and err.startswith(f"error: model '{model}': its weights do not match its config "
                                        "(BertLMHeadModel): no weights for cls.predictions."), err
    assert err.count("\n") == 1 and not out.exists()


def _rewrite_weights(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    save_file(change(tensors), folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_weights_are_refused_not_initialized_at_random(cli, ce_model, pairs_jsonl, tmp_path):
    model = _copy(ce_model, tmp_path / "no-head")
    _rewrite_weights(model, lambda t: {k: v for k, v in t.items() if not k.startswith("classifier.")})
    out = tmp_path / "out.jsonl"
    _assert_refused(_score(cli, model, pairs_jsonl, out), out,
                    f"model '{model}': its weights do not match its config (BertForSequenceClassification): no "
                    "weights for classifier.bias, classifier.weight (they would be random)")


def test_weights_of_another_shape_are_refused_with_their_shapes(cli, ce_model, pairs_jsonl, tmp_path):
    model = _copy(ce_model, tmp_path / "other-shape")
    _edit_config(model, intermediate_size=96)  # the checkpoint's MLPs are 128 wide
    out = tmp_path / "out.jsonl"
    code, _, err = _score(cli, model, pairs_jsonl, out)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: model '{model}': its weights do not match its config "
                          "(BertForSequenceClassification): weights of the wrong shape: "
                          "bert.encoder.layer.0.intermediate.dense.bias (128 in the checkpoint, 96 in the config), "
                          "bert.encoder.layer.0.intermediate.dense.weight (128x64 in the checkpoint, 96x64 in the "
                          "config)"), err
    assert err.rstrip().endswith("and 2 more")  # 3 per layer, 2 layers
    assert not out.exists()


def test_a_checkpoint_deeper_than_its_config_is_refused(cli, ce_model, pairs_jsonl, tmp_path):
    model = _copy(ce_model, tmp_path / "shallow-config")
    _edit_config(model, num_hidden_layers=1)  # the checkpoint has 2 layers: one would be dropped silently
    out = tmp_path / "out.jsonl"
    code, _, err = _score(cli, model, pairs_jsonl, out)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: model '{model}': its weights do not match its config "
                          "(BertForSequenceClassification): weights of layers the config does not have: "
                          "bert.encoder.layer.1."), err
    assert not out.exists()


def test_unused_checkpoint_tensors_are_ignored_and_named(cli, ce_model, pairs_jsonl, tmp_path):
    import torch

    model = _copy(ce_model, tmp_path / "extra-head")
    _rewrite_weights(model, lambda t: {**t, "mlm_head.weight": torch.zeros(3)})
    out = tmp_path / "out.jsonl"
    code, _, err = cli("score", str(pairs_jsonl), "-o", str(out), "-m", str(model))
    assert code == 0, err
    assert (f"rerank: model '{model}': checkpoint tensors BertForSequenceClassification does not use were "
            "ignored: mlm_head.weight\n") in err
    reference = tmp_path / "ref.jsonl"
    assert cli("score", str(pairs_jsonl), "-o", str(reference), "-m", ce_model, "-q")[0] == 0
    assert out.read_bytes() == reference.read_bytes()  # the same model: the same scores


def test_a_tokenizer_with_ids_past_the_embedding_is_refused(cli, ce_model, pairs_jsonl, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    model = tmp_path / "small-vocab"
    config = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=1, architectures=["BertForSequenceClassification"])
    BertForSequenceClassification(config).save_pretrained(model)
    for name in TOKENIZER_FILES:  # the tiny cross-encoder's tokenizer: ~1000 tokens for 100 rows
        if (Path(ce_model) / name).exists():
            shutil.copy(Path(ce_model) / name, model / name)
    out = tmp_path / "out.jsonl"
    code, _, err = _score(cli, model, pairs_jsonl, out)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: model '{model}': its tokenizer has token ids up to "), err
    assert err.endswith(" but the model's embedding has 100 rows (vocab_size): the tokenizer belongs to another "
                        "model\n"), err
    assert not out.exists()


def test_an_llm_template_whose_answer_token_is_missing_is_refused(cli, llm_model, pairs_jsonl, tmp_path):
    model = _copy(llm_model, tmp_path / "no-yes")
    path = model / "tokenizer.json"
    tok = json.loads(path.read_text())
    tok["model"]["vocab"].pop("yes")  # and every merge that makes or uses it
    tok["model"]["merges"] = [m for m in tok["model"]["merges"] if "yes" not in m and "".join(m) != "yes"]
    path.write_text(json.dumps(tok, ensure_ascii=False))
    out = tmp_path / "out.jsonl"
    _assert_refused(_score(cli, model, pairs_jsonl, out, "--template", "qwen3"), out,
                    f"model '{model}': template 'qwen3' scores the token 'yes', which its tokenizer does not have; "
                    "pick the template the model was trained with (--template)")
    code, _, err = _score(cli, model, pairs_jsonl, out)  # bge scores "Yes": still there
    assert code == 0, err


@pytest.mark.parametrize("which, limit, why", [
    ("ce_model", 512, "max_position_embeddings 512"),
    ("xlmr_model", 512, "max_position_embeddings 514, less 2 for RoBERTa's padding offset"),
    ("llm_model", 4096, "max_position_embeddings 4096"),
])
def test_a_max_length_past_the_position_embeddings_is_refused(cli, request, pairs_jsonl, tmp_path, which, limit,
                                                               why):
    model = request.getfixturevalue(which)
    out = tmp_path / "out.jsonl"
    _assert_refused(_score(cli, model, pairs_jsonl, out, "--max-length", str(limit + 1)), out,
                    f"--max-length {limit + 1} is more than model '{model}' reads: {limit} tokens ({why}); "
                    f"use --max-length {limit} or less")
    if which != "llm_model":  # the limit itself works, on passages longer than it
        code, _, err = _score(cli, model, pairs_jsonl, out, "--max-length", str(limit))
        assert code == 0, err


def test_model_paths_that_are_not_model_folders(cli, ce_model, pairs_jsonl, tmp_path):
    out = tmp_path / "out.jsonl"
    config = Path(ce_model) / "config.json"
    _assert_refused(_score(cli, config, pairs_jsonl, out), out,
                    f"model '{config}' is a file, not a model folder (config.json, weights, tokenizer files)")
    model = _copy(ce_model, tmp_path / "no-weights", skip=("model.safetensors",))
    code, _, err = _score(cli, model, pairs_jsonl, out)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: model '{model}': cannot load cross-encoder weights: "), err
    assert "model.safetensors" in err and not out.exists()


def test_probe_memory_refuses_the_same_max_length(cli, ce_model):
    for extra in ([], ["--estimate"]):
        code, out, err = cli("probe-memory", "-m", ce_model, "--device", "cpu", "--max-length", "1024", *extra)
        assert code == 2 and out == "", err
        assert err == (f"error: --max-length 1024 is more than model '{ce_model}' reads: 512 tokens "
                       "(max_position_embeddings 512); use --max-length 512 or less\n")


def test_architectures_of_both_kinds_pick_the_classifier_unless_told(cli, ce_model, pairs_jsonl, tmp_path):
    model = _copy(ce_model, tmp_path / "both")
    _edit_config(model, architectures=["BertForCausalLM", "BertForSequenceClassification"])
    out = tmp_path / "out.jsonl"
    code, _, err = cli("score", str(pairs_jsonl), "-o", str(out), "-m", str(model))
    assert code == 0 and "cpu: cross-encoder in fp32" in err, err
