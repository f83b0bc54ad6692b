"""Deferred state propagation: K/V of skipped layers, written only when a later token needs them.

State propagation (CALM) fills the KV cache of the layers a token skipped with K/V projected from the
hidden state it exited with. Doing that eagerly costs, per early-exited token, two D x D projections
for every skipped layer (about one whole layer for an exit in the first third of the model), mostly
for nothing: when the following tokens exit early too, nobody reads those entries. Deferred
propagation keeps the exit hidden states in a buffer and, when a step enters a segment, first writes
that segment's missing K/V for all pending slots in one batched projection (the weights are read
once for all of them). The cache a layer reads is exactly what eager propagation would have
written: same hidden states, same projections, only later.

A `Pending` covers a region of cache slots [first_slot, first_slot + n): the decoder keeps one for
the prompt (a lazy prefill: when no token goes deep, the prompt's deep K/V is never computed) and one
for the decode steps, so a deep step re-projects only the small decode region, and the prompt's at
most once per segment. Segments are the backbone layer ranges between exits
(`early_exit.EarlyExitDecoder`): segment j = layers [bounds[j], bounds[j + 1]), followed by exit j
(j < E).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from free_jax.models import lm_api

PyTree = Any


@flax.struct.dataclass
class Pending:
  """Exit hidden states of the decode steps and which segments still lack their K/V.

  Attributes:
    h: float[B, n, D] hidden state each slot of the region exited with.
    missing: bool[E + 1, n] segment j (and exit j) has no K/V yet for slot first_slot + i.
    first_slot: static first cache slot of the region.
  """

  h: jax.Array
  missing: jax.Array
  first_slot: int = flax.struct.field(pytree_node=False)

  @classmethod
  def empty(cls, batch: int, num_slots: int, hidden: int, num_segments: int, first_slot: int,
            dtype) -> 'Pending':
    return cls(h=jnp.zeros((batch, num_slots, hidden), dtype),
               missing=jnp.zeros((num_segments, num_slots), bool), first_slot=first_slot)

  def record(self, slot: jax.Array, h: jax.Array, depth: int) -> 'Pending':
    """A step that wrote slots [slot, slot + T) (inside this region) stopped at exit `depth` with
    h float[B, T, D]: their segments after `depth` wait for K/V."""
    offset = slot - self.first_slot
    region = jnp.arange(self.missing.shape[1])
    written = (region >= offset) & (region < offset + h.shape[1])
    later = jnp.arange(self.missing.shape[0]) > depth
    return self.replace(h=jax.lax.dynamic_update_slice(self.h, h.astype(self.h.dtype), (0, offset, 0)),
                        missing=self.missing | (later[:, None] & written[None, :]))


def write_masked(stack: lm_api.DecoderStack, params: PyTree, pending: Pending, cache: lm_api.KVCache,
                 ctx: PyTree, start: int, end: int, mask: jax.Array) -> lm_api.KVCache:
  """Writes propagated K/V of layers [start, end) of `params` at the pending slots selected by bool[N] mask."""
  n = pending.h.shape[1]
  at_slots = cache.replace(index=jnp.asarray(pending.first_slot, jnp.int32))
  new = stack.propagate_kv(params, pending.h, at_slots, ctx, start, end)
  region = (slice(start, end), slice(None), slice(pending.first_slot, pending.first_slot + n))
  select = mask[None, None, :, None, None]
  merge = lambda old, fresh: old.at[region].set(jnp.where(select, fresh[region], old[region]))
  return cache.replace(k=merge(cache.k, new.k), v=merge(cache.v, new.v))


def materialise(stack: lm_api.DecoderStack, lm_params: PyTree, exit_stack: PyTree | None, pending: Pending,
                cache: lm_api.KVCache, exit_cache: lm_api.KVCache, ctx: PyTree, segment: int,
                bounds: tuple[int, ...]) -> tuple[Pending, lm_api.KVCache, lm_api.KVCache]:
  """Before a step runs `segment`: writes its (and its exit's) missing K/V; skipped when none is missing."""
  mask = pending.missing[segment]
  num_exits = len(bounds) - 2

  def write(caches):
    cache, exit_cache = caches
    cache = write_masked(stack, lm_params, pending, cache, ctx, bounds[segment], bounds[segment + 1], mask)
    if segment < num_exits:
      exit_cache = write_masked(stack, exit_stack, pending, exit_cache, ctx, segment, segment + 1, mask)
    return cache, exit_cache

  cache, exit_cache = jax.lax.cond(jnp.any(mask), write, lambda caches: caches, (cache, exit_cache))
  return pending.replace(missing=pending.missing.at[segment].set(False)), cache, exit_cache
