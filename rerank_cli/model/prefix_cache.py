"""The cache a shared prefix is read from (`prefix.py` plans and collates; this runs the model).

`PrefixStore.run` runs the batch's prefixes that it does not hold (one pass, a stock `DynamicCache`),
keeps each group prefix's keys and values, then runs the pairs' remainders against a `PrefixCache`:
each layer hands every pair its group's prefix keys and values in front of its own and stores
nothing, so the per-layer memory is what the unshared batch uses. A run of groups (`prefix.plan`)
spans several batches, each holding pairs of many of its groups, so the store keeps a run's
prefixes until the run is over: at most `limit` tokens (half a batch's), the least recently used
going first. Kept keys and values are those of one dtype (an fp16 batch rerun in fp32 runs its
prefixes again).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class PrefixStore:
    """Each group prefix's per-layer keys and values ([1, heads, its length, dim]), kept from batch to batch.

    At most `limit` prefix tokens are kept (None: no limit), the least recently used going first,
    but never one the last batch used: `prefix.plan` cuts its runs of groups to the same limit, so
    a group's prefix stays kept until its last pair has run."""

    def __init__(self, limit: int | None = None):
        self.store: OrderedDict[tuple[int, ...], list] = OrderedDict()
        self.dtype = None
        self.limit = limit

    @property
    def kept(self):
        """The prefixes (token-id tuples) kept, as `prefix.collate` asks for them."""
        return self.store.keys()

    def run(self, body, batch):
        """The last position's final hidden state ([pairs, hidden]) of a `prefix.SharedBatch`."""
        dtype = next(body.parameters()).dtype
        if dtype != self.dtype:
            self.store, self.dtype = OrderedDict(), dtype
        fresh = [k for k, ids in enumerate(batch.prefixes) if ids not in self.store]
        ran = self._fill(body, batch, fresh) if fresh else {}
        parts = [self.store[ids] if ids in self.store else ran[ids] for ids in batch.prefixes]
        self._keep(batch, ran)
        layers = self._stack(parts, batch.prefix_ids.shape[1])
        out = body(input_ids=batch.ids, attention_mask=batch.mask, position_ids=batch.positions, use_cache=True,
                   **{cache_arg(body): PrefixCache.of(layers, batch.rows)})
        return out.last_hidden_state[:, -1, :]

    def _fill(self, body, batch, fresh: list[int]) -> dict:
        """Run the `fresh` prefix rows in one pass (trimmed to the widest of them): each one's own."""
        width = max(len(batch.prefixes[k]) for k in fresh)
        rows = fresh if len(fresh) < len(batch.prefixes) else slice(None)
        filled = DynamicCache()
        body(input_ids=batch.prefix_ids[rows, -width:], attention_mask=batch.prefix_mask[rows, -width:],
             position_ids=batch.prefix_positions[rows, -width:], use_cache=True, **{cache_arg(body): filled})
        ran = {}
        for row, k in enumerate(fresh):
            own = slice(width - len(batch.prefixes[k]), width)
            ran[batch.prefixes[k]] = [(layer.keys[row:row + 1, :, own], layer.values[row:row + 1, :, own])
                                      for layer in filled.layers]
        return ran

    def _keep(self, batch, ran: dict) -> None:
        """Keep the batch's group prefixes (most recent last); drop the oldest others past `limit`."""
        used = {ids for ids, keep in zip(batch.prefixes, batch.keep) if keep}
        for ids in batch.prefixes:
            if ids in used:
                if ids in ran:
                    self.store[ids] = ran[ids]
                self.store.move_to_end(ids)
        held = sum(len(ids) for ids in self.store)
        while self.limit is not None and held > self.limit:
            oldest = next(iter(self.store))
            if oldest in used:
                break
            del self.store[oldest]
            held -= len(oldest)

    @staticmethod
    def _stack(kept: list[list], width: int) -> list:
        """Per layer, the batch's prefix keys and values ([groups, heads, width, dim])."""
        if len(kept) == 1 and kept[0][0][0].shape[-2] == width:
            return kept[0]
        return [(_left_padded([k for k, _ in parts], width), _left_padded([v for _, v in parts], width))
                for parts in zip(*kept)]


def _left_padded(parts: list, width: int):
    """[1, heads, n, dim] tensors stacked as [len(parts), heads, width, dim], zeros in front (every
    pad position is masked)."""
    out = parts[0].new_zeros((len(parts), parts[0].shape[1], width, parts[0].shape[-1]))
    for g, t in enumerate(parts):
        out[g, :, width - t.shape[-2]:] = t[0]
    return out


def cache_arg(body) -> str:
    """transformers 5 calls the cache `cache`; transformers 4 `past_key_values`."""
    return "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"


class PrefixLayer(DynamicLayer):
    """One layer's prefix keys and values ([groups, heads, prefix, dim]) put in front of each pair's own."""

    def __init__(self, keys, values, rows):
        super().__init__()
        self.keys, self.values, self.is_initialized = keys, values, True
        self.rows = rows if keys.shape[0] > 1 else None  # one group: a broadcast view, no gather

    def update(self, key_states, value_states, *args, **kwargs):
        if self.rows is None:
            keys = self.keys.expand(key_states.shape[0], -1, -1, -1)
            values = self.values.expand(value_states.shape[0], -1, -1, -1)
        else:
            keys, values = self.keys[self.rows], self.values[self.rows]
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)


class PrefixCache(DynamicCache):
    """A `DynamicCache` whose layers are `PrefixLayer`s: read-only, one prefix row per group."""

    @classmethod
    def of(cls, layers: list, rows) -> PrefixCache:
        cache = cls()
        cache.layers = [PrefixLayer(keys, values, rows) for keys, values in layers]
        cache.layer_class_to_replicate = None
        return cache
