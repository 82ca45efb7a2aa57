"""Shared-prefix reuse for causal rerankers: a prefix many pairs share is computed once.

In the qwen3 template every pair starts with the same system prompt and instruction, and one query's
candidates share the query too (about half of each pair); in the bge template they share
bos + "A: {query}\\n". For each batch:

1. `plan` (once per sort window) finds the groups: pairs sorted by ids, then cut greedily. A group
   keeps growing while the prefix it shares stays at least `MIN_SHARED` tokens and narrowing it
   costs its members fewer tokens than a group of its own would (one more prefix to run). Groups of
   one share nothing. Each pair is tagged with how many leading ids its group shares
   (`Encoded.shared`). The grouping compares ids, never text. Groups go longest first, in runs whose
   prefixes add up to at most the tokens `PrefixStore` keeps; within a run the pairs go by the
   length of their remainder (what follows the prefix), longest first, whatever their group. A
   batch then pads its remainders to about their own length: cut out of one group of 50, sorted
   by whole length, a batch padded them 17% (the 40x50 bench); sorted across a run, 1%.
2. `collate` cuts a batch into prefixes, one row per group (its pairs may stand anywhere in the
   batch), left-padded, and remainders, one row per pair, left-padded after the prefix region: a
   pair's row is [its prefix's row][padding][its remainder], its positions continue after its own
   prefix, and every pad is masked. A pair of no group is split so that its remainder is no wider
   than the others'. When no pair of the batch has a group, it returns None and the plain path runs.
3. `prefix_cache.PrefixStore` runs the prefixes it does not hold (one pass, `use_cache`), then the
   remainders against the prefixes' keys and values. It keeps a run's prefixes while the run goes
   on, so a group's prefix runs once, however many batches its pairs fall in.

This is the unshared computation, term for term; tests check every family `lean.py` trims, on both
templates. Sliding-window attention counts the window in the padded row, so a model with a window
narrower than the shared row runs the plain path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

MIN_SHARED = 8  # a shorter common prefix saves less than its own pass costs


@dataclass
class SharedBatch:
    """A batch as prefixes (one row per group) and remainders (one row per pair), as tensors."""

    prefix_ids: object
    prefix_mask: object
    prefix_positions: object
    prefixes: list[tuple[int, ...]]  # each prefix row's ids, unpadded (what `PrefixStore` keeps them by)
    keep: list[bool]  # a group's prefix (kept for the batches after) rather than a lone pair's split
    rows: object  # each pair's prefix row
    ids: object
    mask: object  # [pairs, prefix width + remainder width]
    positions: object
    shape: tuple[int, int]  # pairs x the longest pair, or the prefix region and remainders if wider: the keys a row holds
    saved: int  # prefix tokens not recomputed


def plan(encoded: list, kept_tokens: int | None = None) -> tuple[list[int], list]:
    """The order to batch `encoded` in and each item tagged with its group's shared prefix length.

    Groups go longest first, gathered into runs whose prefixes hold at most `kept_tokens` tokens
    together (at least one group; None: no limit), as many as `PrefixStore` keeps at once. Within a
    run the pairs go by the length of what is left after their prefix, longest first, whatever their
    group: a batch then pads its remainders to about their own length, not to the longest of a group."""
    groups: list[tuple[list[int], int]] = []  # (members, shared); shared 0 while alone
    for i in sorted(range(len(encoded)), key=lambda i: encoded[i].ids):
        if groups and _joins(groups[-1], encoded, i):
            members, shared = groups[-1]
            common = _common(encoded[members[0]].ids, encoded[i].ids)
            groups[-1] = (members + [i], common if not shared else min(shared, common))
        else:
            groups.append(([i], 0))
    tagged = list(encoded)
    for members, shared in groups:
        if len(members) > 1:
            for i in members:
                tagged[i] = dataclasses.replace(encoded[i], shared=shared)
    groups.sort(key=lambda g: -max(len(encoded[i].ids) for i in g[0]))
    order: list[int] = []
    for run in _runs(groups, kept_tokens):
        order += sorted(run, key=lambda i: -(len(tagged[i].ids) - tagged[i].shared))
    return order, tagged


def _runs(groups: list[tuple[list[int], int]], kept_tokens: int | None) -> list[list[int]]:
    """The groups' members in runs whose shared prefixes add up to at most `kept_tokens`."""
    runs: list[list[int]] = [[]]
    held = 0
    for members, shared in groups:
        s = shared if len(members) > 1 else 0
        if s and held and kept_tokens is not None and held + s > kept_tokens:
            runs.append([])
            held = 0
        runs[-1] += members
        held += s
    return runs


def _joins(group: tuple[list[int], int], encoded: list, i: int) -> bool:
    members, shared = group
    common = _common(encoded[members[0]].ids, encoded[i].ids)
    if common < MIN_SHARED:
        return False
    return not shared or len(members) * (shared - common) <= common


def _common(a: list[int], b: list[int]) -> int:
    """The common prefix's length, leaving each at least its last token to run after it."""
    n, i = min(len(a), len(b)) - 1, 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def batch_groups(batch: list) -> list[tuple[list[int], int]]:
    """(members, shared) for each group in `batch`, in order of first appearance, wherever its members
    stand; a pair of no group (shared 0) is a group of its own. A group with one member here shares
    too: the rest of its group runs in other batches, against the prefix this one runs or ran."""
    out: list[tuple[list[int], int]] = []
    index: dict[tuple[int, ...], int] = {}
    for i, e in enumerate(batch):
        key = tuple(e.ids[:e.shared]) if e.shared else None
        if key is not None and key in index:
            out[index[key]][0].append(i)
            continue
        if key is not None:
            index[key] = len(out)
        out.append(([i], e.shared))
    return out


def collate(batch: list, pad_id: int, device: str, window: int | None = None,
            kept=frozenset()) -> SharedBatch | None:
    """The batch split into prefixes and remainders, or None where no pair shares (or the shared row
    is wider than the attention window). A prefix in `kept` (`PrefixStore.kept`) saves its whole length."""
    groups = batch_groups(batch)
    shared = [(m, s) for m, s in groups if s]
    if not shared:
        return None
    width = max(len(batch[i].ids) - s for m, s in shared for i in m)
    splits = [(m, s or max(1, len(batch[m[0]].ids) - width)) for m, s in groups]
    prefix_width = max(s for _, s in splits)
    width = max(len(batch[i].ids) - s for m, s in splits for i in m)
    if window is not None and prefix_width + width > window:
        return None
    prefixes = [tuple(batch[m[0]].ids[:s]) for m, s in splits]
    keep = [bool(s) for _, s in groups]
    saved = sum((len(m) - 1 + (prefixes[k] in kept)) * s for k, (m, s) in enumerate(groups) if s)
    widest = max(prefix_width + width, max(len(e.ids) for e in batch))  # groups' prefixes and remainders may differ
    return _tensors(batch, splits, prefixes, keep, prefix_width, width, pad_id, device, (len(batch), widest), saved)


def _tensors(batch, splits, prefixes, keep, prefix_width, width, pad_id, device, shape, saved) -> SharedBatch:
    import torch

    g, n = len(splits), len(batch)
    prefix_ids = np.full((g, prefix_width), pad_id, dtype=np.int64)
    prefix_mask = np.zeros((g, prefix_width), dtype=np.int64)
    rows = np.zeros(n, dtype=np.int64)
    ids = np.full((n, width), pad_id, dtype=np.int64)
    mask = np.zeros((n, prefix_width + width), dtype=np.int64)
    starts = np.zeros(n, dtype=np.int64)
    for k, (members, s) in enumerate(splits):
        prefix_ids[k, prefix_width - s:] = batch[members[0]].ids[:s]
        prefix_mask[k, prefix_width - s:] = 1
        for i in members:
            rest = batch[i].ids[s:]
            ids[i, width - len(rest):] = rest
            mask[i, :prefix_width] = prefix_mask[k]
            mask[i, prefix_width + width - len(rest):] = 1
            rows[i], starts[i] = k, s
    tail = mask[:, prefix_width:]
    positions = np.maximum(starts[:, None] + tail.cumsum(-1) - 1, 0)
    prefix_positions = np.maximum(prefix_mask.cumsum(-1) - 1, 0)

    def put(x):
        return torch.from_numpy(x).to(device)

    return SharedBatch(put(prefix_ids), put(prefix_mask), put(prefix_positions), prefixes, keep, put(rows),
                       put(ids), put(mask), put(positions), shape, saved)


def sliding_window(config) -> int | None:
    """The narrowest attention window the model's layers use, if any."""
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) is not False:
        return int(window)
    return None
