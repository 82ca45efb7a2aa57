"""The cache a shared prefix is read from (`prefix.py` plans and collates; this runs the model).

`run_shared` runs a batch's prefixes once with a stock `DynamicCache`, then the pairs' remainders
against a `PrefixCache`: each layer hands every pair its group's prefix keys and values in front of
its own and stores nothing, so the prefix serves every layer call of the batch and the per-layer
memory is what the unshared batch uses.
"""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


def run_shared(body, batch):
    """The last position's final hidden state ([pairs, hidden]) of a `prefix.SharedBatch`."""
    name = cache_arg(body)
    filled = DynamicCache()
    body(input_ids=batch.prefix_ids, attention_mask=batch.prefix_mask, position_ids=batch.prefix_positions,
         use_cache=True, **{name: filled})
    out = body(input_ids=batch.ids, attention_mask=batch.mask, position_ids=batch.positions, use_cache=True,
               **{name: PrefixCache.around(filled, batch.rows)})
    return out.last_hidden_state[:, -1, :]


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
    def around(cls, filled: DynamicCache, rows) -> PrefixCache:
        cache = cls()
        cache.layers = [PrefixLayer(layer.keys, layer.values, rows) for layer in filled.layers]
        cache.layer_class_to_replicate = None
        return cache
