"""Shared-prefix reuse for causal rerankers: a prefix many pairs share is computed once per batch.

In the qwen3 template every pair starts with the same system prompt and instruction, and one query's
candidates share the query too (about half of each pair); in the bge template they share
bos + "A: {query}\\n". For each batch:

1. `plan` (once per sort window) orders the pairs so that those sharing a token-id prefix are
   neighbours: sorted by ids, then cut into groups greedily. A group keeps growing while the prefix
   it shares stays at least `MIN_SHARED` tokens and narrowing it costs its members fewer tokens than
   a group of its own would (one more prefix to run). Groups of one share nothing. Each pair is tagged
   with how many leading ids its group shares (`Encoded.shared`); groups go longest first, and the
   pairs of a group longest first. The grouping compares ids, never text.
2. `collate` cuts a batch (the budget's cut; it may hold several groups, or a group's tail) into
   prefixes, one row per group, left-padded, and remainders, one row per pair, left-padded after
   the prefix region: a pair's row is [its prefix's row][padding][its remainder], its positions
   continue after its own prefix, and every pad is masked. A pair alone in the batch is split so
   that its remainder is no wider than the others'. When the batch has no group of two or more,
   or sharing would not compute fewer tokens, it returns None and the plain path runs.
3. `prefix_cache.PrefixStore` runs the prefixes once (`use_cache`), then the remainders against the
   prefixes' keys and values. It keeps them for the next batch, where one query's candidates go on:
   a prefix `kept` costs nothing there, so `collate` shares it even with a pair alone.

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
    rows: object  # each pair's prefix row
    ids: object
    mask: object  # [pairs, prefix width + remainder width]
    positions: object
    shape: tuple[int, int]  # what the token budget counts: pairs x the longest pair
    saved: int  # prefix tokens not recomputed


def plan(encoded: list) -> tuple[list[int], list]:
    """The order to batch `encoded` in and each item tagged with its group's shared prefix length."""
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
        members.sort(key=lambda i: -len(encoded[i].ids))
        if len(members) > 1:
            for i in members:
                tagged[i] = dataclasses.replace(encoded[i], shared=shared)
    groups.sort(key=lambda g: -len(encoded[g[0][0]].ids))
    return [i for members, _ in groups for i in members], tagged


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


def batch_groups(batch: list, kept=frozenset()) -> list[tuple[int, int, int]]:
    """(start, stop, shared) for the runs of one group in `batch` (shared 0: a pair on its own, unless
    its group's prefix is `kept` from an earlier batch or its group goes on after the batch)."""
    out: list[tuple[int, int, int]] = []
    for i, e in enumerate(batch):
        start, _, shared = out[-1] if out else (0, 0, 0)
        if out and e.shared and e.shared == shared and e.ids[:shared] == batch[start].ids[:shared]:
            out[-1] = (start, i + 1, shared)
        else:
            out.append((i, i + 1, e.shared))
    last = len(out) - 1  # a group the batch ends in goes on in the next batch, which reuses its prefix
    return [(a, b, s if b - a > 1 or (s and (j == last or tuple(batch[a].ids[:s]) in kept)) else 0)
            for j, (a, b, s) in enumerate(out)]


def collate(batch: list, pad_id: int, device: str, window: int | None = None,
            kept=frozenset()) -> SharedBatch | None:
    """The batch split into prefixes and remainders, or None where sharing does not pay. A prefix in
    `kept` (ids an earlier batch ran, `PrefixStore.kept`) costs nothing to run again."""
    groups = batch_groups(batch, kept)
    shared = [(a, b, s) for a, b, s in groups if s]
    if not shared:
        return None
    width = max(len(batch[i].ids) - s for a, b, s in shared for i in range(a, b))
    splits = [(a, b, s or max(1, len(batch[a].ids) - width)) for a, b, s in groups]
    prefix_width = max(s for _, _, s in splits)
    width = max(len(batch[i].ids) - s for a, b, s in splits for i in range(a, b))
    longest = max(len(e.ids) for e in batch)
    prefixes = [tuple(batch[a].ids[:s]) for a, _, s in splits]
    start, stop, tail = groups[-1]
    ahead = stop - start == 1 and tail and prefixes[-1] not in kept  # a group's first pair: the next batch reuses it
    fresh = sum(1 for ids in prefixes if ids not in kept) - ahead
    if fresh * prefix_width + len(batch) * width >= len(batch) * longest:
        return None
    if window is not None and prefix_width + width > window:
        return None
    saved = sum((b - a - 1) * s for a, b, s in shared) + sum(len(ids) for ids in prefixes if ids in kept)
    return _tensors(batch, splits, prefixes, prefix_width, width, pad_id, device, (len(batch), longest), saved)


def _tensors(batch, splits, prefixes, prefix_width, width, pad_id, device, shape, saved) -> SharedBatch:
    import torch

    g, n = len(splits), len(batch)
    prefix_ids = np.full((g, prefix_width), pad_id, dtype=np.int64)
    prefix_mask = np.zeros((g, prefix_width), dtype=np.int64)
    rows = np.zeros(n, dtype=np.int64)
    ids = np.full((n, width), pad_id, dtype=np.int64)
    mask = np.zeros((n, prefix_width + width), dtype=np.int64)
    starts = np.zeros(n, dtype=np.int64)
    for k, (a, b, s) in enumerate(splits):
        prefix_ids[k, prefix_width - s:] = batch[a].ids[:s]
        prefix_mask[k, prefix_width - s:] = 1
        for i in range(a, b):
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

    return SharedBatch(put(prefix_ids), put(prefix_mask), put(prefix_positions), prefixes, put(rows), put(ids),
                       put(mask), put(positions), shape, saved)


def sliding_window(config) -> int | None:
    """The narrowest attention window the model's layers use, if any."""
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) is not False:
        return int(window)
    return None
