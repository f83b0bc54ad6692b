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


def _window(params: PyTree, start: int, end: int) -> PyTree:
  """`params` (decoding form: a per-layer ``'layers'`` tuple) with only layers [start, end), copy-free."""
  return {**params, 'layers': params['layers'][start:end]}


def materialise(stack: lm_api.DecoderStack, lm_params: PyTree, exit_stack: PyTree | None,
                regions: tuple[Pending, ...], cache: lm_api.KVCache, exit_cache: lm_api.KVCache, ctx: PyTree,
                segment: int, bounds: tuple[int, ...]) -> tuple[tuple[Pending, ...], lm_api.KVCache, lm_api.KVCache]:
  """Before a step runs `segment`: writes its (and its exit's) missing K/V in every region.

  `lm_params` and `exit_stack` are in the decoding form (`EarlyExitDecoder.prepare`).

  One `lax.cond` for all regions, skipped when nothing is missing, whose operands are only the
  segment's layers of the caches: a conditional passes its operands through, and on CPU a whole
  cache per segment costs more than a small model's layer.
  """
  start, end = bounds[segment], bounds[segment + 1]
  has_exit = segment < len(bounds) - 2

  def write(subs):
    sub, exit_sub = subs
    for region in regions:
      mask = region.missing[segment]
      sub = write_masked(stack, _window(lm_params, start, end), region, sub, ctx, 0, end - start, mask)
      if has_exit:
        exit_sub = write_masked(stack, _window(exit_stack, segment, segment + 1), region, exit_sub, ctx, 0, 1, mask)
    return sub, exit_sub

  anything_missing = jnp.any(jnp.stack([jnp.any(region.missing[segment]) for region in regions]))
  subs = (cache.layers(start, end), exit_cache.layers(segment, segment + 1) if has_exit else None)
  sub, exit_sub = jax.lax.cond(anything_missing, write, lambda subs: subs, subs)
  cache = cache.with_layers(start, sub)
  if has_exit:
    exit_cache = exit_cache.with_layers(segment, exit_sub)
  regions = tuple(region.replace(missing=region.missing.at[segment].set(False)) for region in regions)
  return regions, cache, exit_cache
