"""Shared-prefix reuse scores what the unshared path scores, family by family, on both templates.

Each family `lean.py` trims gets a tiny random model (trimmed, with the fp32 head, as `load.py` builds
it) on the tiny Qwen2 tokenizer; the same pairs (queries with several candidates and one with a single
candidate, passages of varied length, so rows are padded and one batch holds several prefix groups)
are scored through `score_window` with and without sharing.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from rerank_cli.memory.batching import TokenBudget, score_window
from rerank_cli.model import prefix
from rerank_cli.model.templates import Encoded

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, max_position_embeddings=512)
DECODERS = {
    "llama": {},
    "mistral": {"sliding_window": 400},  # wider than any row: sharing applies
    "qwen2": {},
    "qwen3": {"head_dim": 8},
    "gemma": {"head_dim": 8},
    "gemma2": {"head_dim": 8, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
    "gemma3_text": {"head_dim": 8},
}
WORDS = "ka ri to an el mo su ne la vi or de ta pe lu fi".split()


@pytest.fixture(scope="module")
def tokenizer(llm_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llm_model)


def _pairs(seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    queries, passages = [], []
    for query, candidates in ((text(5), 6), (text(9), 4), (text(3), 1), (text(7), 3)):
        for _ in range(candidates):
            queries.append(query)
            passages.append(text(rng.randint(2, 30)))
    return queries, passages


def _scorer(model_type: str, tokenizer, template: str, share: bool, **extra):
    import transformers

    from rerank_cli.model.head import fp32_head
    from rerank_cli.model.lean import prune_last_layer
    from rerank_cli.model.precision import choose_dtype
    from rerank_cli.model.scorers import LLMScorer
    from rerank_cli.model.templates import make_template

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **SMALL,
                                               pad_token_id=tokenizer.pad_token_id, **{**DECODERS[model_type], **extra})
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    assert prune_last_layer(model, "llm")
    fp32_head(model, "llm")
    tmpl = make_template("llm", template, tokenizer, 512, None)
    return LLMScorer(model, tokenizer, tmpl, "cpu", choose_dtype("fp32", "cpu"), False, share_prefix=share)


def _scores(scorer, budget_tokens: int) -> np.ndarray:
    queries, passages = _pairs()
    return score_window(scorer, scorer.encode(queries, passages), TokenBudget(budget_tokens, 256))


@pytest.mark.parametrize("template", ["bge", "qwen3"])
@pytest.mark.parametrize("model_type", sorted(DECODERS))
def test_shared_prefix_scores_equal_the_unshared_path(model_type, template, tokenizer):
    plain = _scores(_scorer(model_type, tokenizer, template, share=False), 100_000)
    for budget in (100_000, 700):  # one batch of every group, and batches cut inside and across groups
        shared = _scorer(model_type, tokenizer, template, share=True)
        got = _scores(shared, budget)
        np.testing.assert_allclose(got, plain, atol=1e-4, rtol=0)
        assert shared.stats.prefix_saved > 0  # the shared path really ran


def test_a_window_narrower_than_the_rows_runs_the_plain_path(tokenizer):
    plain = _scores(_scorer("mistral", tokenizer, "qwen3", share=False, sliding_window=16), 100_000)
    scorer = _scorer("mistral", tokenizer, "qwen3", share=True, sliding_window=16)
    np.testing.assert_allclose(_scores(scorer, 100_000), plain, atol=1e-4, rtol=0)
    assert scorer.stats.prefix_saved == 0


def _enc(*rows):
    return [Encoded(list(r)) for r in rows]


def test_plan_groups_shared_prefixes_and_orders_a_run_of_groups_by_what_is_left():
    a = list(range(100, 112))  # a 12-token prefix
    b = list(range(200, 210))  # another, 10 tokens
    encoded = _enc(a + [1, 2], b + [5], a + [3], [9] * 20, b + [6, 7, 8], a + [1, 2, 3, 4], [100, 101, 7, 7])
    order, tagged = prefix.plan(encoded)
    assert sorted(order) == list(range(len(encoded)))
    assert [e.shared for e in tagged] == [12, 10, 12, 0, 10, 12, 0]
    assert order == [3, 5, 6, 4, 0, 2, 1]  # one run: by remainder (20, 4, 4, 3, 2, 1, 1), longest first
    assert [e.ids for e in tagged] == [e.ids for e in encoded]


def test_plan_cuts_runs_of_groups_to_the_prefix_tokens_kept():
    a, b = list(range(100, 112)), list(range(200, 210))
    encoded = _enc(a + [1, 2], b + [5], a + [3], [9] * 20, b + [6, 7, 8], a + [1, 2, 3, 4], [100, 101, 7, 7])
    order, _ = prefix.plan(encoded, kept_tokens=12)  # a's 12 tokens fill a run: b starts the next
    assert order == [3, 5, 0, 2, 6, 4, 1]  # longest group first, each run by remainder
    assert prefix.plan(encoded, kept_tokens=1)[0] == order  # a run holds one group at least
    assert prefix.plan(encoded, kept_tokens=22)[0] == [3, 5, 6, 4, 0, 2, 1]  # both in one run


def test_the_store_keeps_the_most_recent_prefixes_within_its_limit():
    from types import SimpleNamespace

    from rerank_cli.model.prefix_cache import PrefixStore

    store = PrefixStore(limit=10)

    def batch(*prefixes, keep=None):
        store._keep(SimpleNamespace(prefixes=list(prefixes), keep=keep or [True] * len(prefixes)),
                    {ids: [] for ids in prefixes if ids not in store.kept})

    batch((1,) * 4, (2,) * 4)
    batch((3,) * 4)  # 12 tokens: the oldest goes
    assert list(store.kept) == [(2,) * 4, (3,) * 4]
    batch((4,) * 12)  # wider than the limit alone: kept while it is used
    assert list(store.kept) == [(4,) * 12]
    batch((5,) * 3, (6,) * 3, keep=[True, False])  # a lone pair's split is never kept
    assert list(store.kept) == [(5,) * 3]


def test_a_group_stops_where_narrowing_its_prefix_costs_more_than_a_new_group():
    q1 = list(range(100, 130))
    q2 = list(range(100, 110)) + list(range(300, 320))  # shares 10 of q1's 30 tokens
    encoded = _enc(*[q1 + [i] for i in range(5)], *[q2 + [i] for i in range(5)])
    _, tagged = prefix.plan(encoded)
    assert {e.shared for e in tagged} == {30}  # two groups of 30, not one of 10


def test_collate_puts_each_pair_after_its_own_prefix():
    p1, p2 = list(range(100, 110)), list(range(200, 212))
    batch = [Encoded(p1 + [1, 2, 3], shared=10), Encoded(p1 + [4], shared=10),
             Encoded(p2 + [5, 6], shared=12), Encoded(p2 + [7, 8], shared=12), Encoded(list(range(300, 318)))]
    shared = prefix.collate(batch, pad_id=0, device="cpu")
    assert shared is not None and shared.shape == (5, 18) and shared.saved == 10 + 12
    assert shared.rows.tolist() == [0, 0, 1, 1, 2]
    assert shared.prefix_ids.shape == (3, 15)  # the lone pair keeps a remainder as wide as the others'
    assert shared.prefix_ids[1].tolist() == [0] * 3 + p2 and shared.prefix_mask[0].tolist() == [0] * 5 + [1] * 10
    assert shared.ids[1].tolist() == [0, 0, 4] and shared.positions[1, -1].item() == 10
    assert shared.positions[2, 1:].tolist() == [12, 13] and shared.mask[2].tolist() == [0] * 3 + [1] * 12 + [0, 1, 1]
    assert shared.ids[4].tolist() == [315, 316, 317] and shared.positions[4].tolist() == [15, 16, 17]


def test_collate_gathers_a_group_wherever_its_pairs_stand_in_the_batch():
    p1, p2 = list(range(100, 110)), list(range(200, 212))
    batch = [Encoded(p1 + [1, 2], shared=10), Encoded(p2 + [5, 6], shared=12), Encoded(p1 + [3], shared=10)]
    shared = prefix.collate(batch, pad_id=0, device="cpu")
    assert shared.rows.tolist() == [0, 1, 0] and shared.prefixes == [tuple(p1), tuple(p2)]
    assert shared.keep == [True, True] and shared.saved == 10  # p2's pair alone runs its prefix for the others
    assert prefix.collate(batch, 0, "cpu", kept={tuple(p2)}).saved == 10 + 12  # kept: nothing of it runs
    assert shared.ids[2].tolist() == [0, 3] and shared.positions[2, -1].item() == 10


def test_collate_falls_back_where_no_pair_shares_or_the_window_is_too_narrow():
    lone = [Encoded(list(range(20))), Encoded(list(range(30, 50)))]
    assert prefix.collate(lone, 0, "cpu") is None  # no group of two
    tail = list(range(100, 109))
    few = [Encoded(tail + list(range(40 + k, 80)), shared=9) for k in range(2)]
    assert prefix.collate(few, 0, "cpu") is not None
    assert prefix.collate(few, 0, "cpu", window=30) is None  # wider than the attention window


@pytest.mark.parametrize("template", ["bge", "qwen3"])
def test_a_group_cut_across_batches_runs_its_prefix_once(template, tokenizer):
    plain = _scores(_scorer("qwen2", tokenizer, template, share=False), 100_000)
    scorer = _scorer("qwen2", tokenizer, template, share=True)
    encoded = scorer.encode(*_pairs())
    _, tagged = prefix.plan(encoded)
    groups = {tuple(e.ids[:e.shared]) for e in tagged if e.shared}
    once = sum((sum(1 for e in tagged if e.shared and tuple(e.ids[:e.shared]) == ids) - 1) * len(ids) for ids in groups)
    longest = max(len(e.ids) for e in encoded)
    got = score_window(scorer, encoded, TokenBudget(2 * longest + longest // 2, 256))  # two pairs a batch
    np.testing.assert_allclose(got, plain, atol=1e-4, rtol=0)
    assert scorer.stats.batches >= len(encoded) // 2
    assert scorer.stats.prefix_saved == once  # every group's prefix ran in one batch only


def test_kept_prefixes_are_of_the_dtype_the_model_runs_in(tokenizer):
    from rerank_cli.model.prefix_cache import PrefixStore
    from rerank_cli.model.scorers import upcast

    scorer = _scorer("llama", tokenizer, "qwen3", share=True)
    batch = prefix.collate(prefix.plan(scorer.encode(*_pairs()))[1][:6], scorer.pad_id, "cpu")
    body = scorer.model.get_decoder()
    with torch.inference_mode():
        store = PrefixStore()
        store.run(body, batch)  # keeps fp32 keys and values
        with upcast(scorer.model, torch.float64):  # as an fp16 batch is rerun in fp32
            again = store.run(body, batch)
            fresh = PrefixStore().run(body, batch)
    assert again.dtype == torch.float64
    torch.testing.assert_close(again, fresh, atol=0, rtol=0)
