"""The layer-range contract shared by every language-model family (OPT, T5 decoder).

Early exits, exit training and KV state propagation all need the same thing: run any contiguous
range of decoder layers on a hidden state, reading and writing that range's slice of the KV cache.
Every LM family implements `DecoderStack`; code above the backbone (exits, decoding, training) only
talks to this protocol, never to OPT or T5 internals.

Conventions
-----------
* Layer parameters are *stacked*: ``lm_params['layers']`` is a pytree whose leaves have a leading
  axis of length L (number of decoder layers). ``slice_layers(tree, a, b)`` gives layers [a, b).
  For decoding they may instead be a tuple of L per-layer trees (`unstack_layers`): every function
  here and in the families accepts both.
* A full (uncached) forward is a prefill into a fresh cache of length T: there is one attention
  code path, so cached decoding equals the full forward by construction of the masks, not by luck.
* Prompts are left-padded, so a single write index serves the whole batch; per-row validity lives in
  ``KVCache.valid``.
"""

from __future__ import annotations

from typing import Any, Protocol

import chex
import flax.struct
import jax
import jax.numpy as jnp

PyTree = Any


@flax.struct.dataclass
class KVCache:
  """Self-attention KV cache for a stack of layers, in one of two forms.

  * stacked (training, full forwards, `lax.scan` over layers): ``k``, ``v`` float[L, B * H, S, Dh];
  * per layer (decoding): ``k``, ``v`` tuples of L arrays float[B * H, S, Dh]
    (row b's head h at b * H + h: the layout the attention dots read without a copy, `layers.attend`). A decode step then
    updates each layer's array in place; a stacked cache updated inside a layer loop makes XLA copy the
    whole [L, ...] array at every layer (the cost of a step then grows with L x S).

  Attributes:
    k: keys of each layer (S = max cache length).
    v: values of each layer.
    valid: bool[B, S] which cache slots hold a real (non-padding) token; shared by all layers.
    index: int32[] next slot to write; the T tokens of a step occupy [index, index + T).
  """

  k: jax.Array | tuple[jax.Array, ...]
  v: jax.Array | tuple[jax.Array, ...]
  valid: jax.Array
  index: jax.Array

  @classmethod
  def zeros(cls, num_layers: int, batch: int, max_length: int, num_heads: int, head_dim: int,
            dtype=jnp.float32, per_layer: bool = False) -> 'KVCache':
    """A zero cache; `per_layer` gives the decoding form (tuples of per-layer arrays)."""
    if per_layer:
      layer = lambda: tuple(jnp.zeros((batch * num_heads, max_length, head_dim), dtype)
                            for _ in range(num_layers))
      k, v = layer(), layer()
    else:
      shape = (num_layers, batch * num_heads, max_length, head_dim)
      k, v = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
    return cls(k=k, v=v, valid=jnp.zeros((batch, max_length), bool), index=jnp.zeros((), jnp.int32))

  @property
  def per_layer(self) -> bool:
    return isinstance(self.k, tuple)

  @property
  def num_layers(self) -> int:
    return len(self.k) if self.per_layer else self.k.shape[0]

  @property
  def max_length(self) -> int:
    return self.valid.shape[1]

  @property
  def batch_size(self) -> int:
    return self.valid.shape[0]

  @property
  def dtype(self):
    return self.k[0].dtype if self.per_layer else self.k.dtype

  def mark_valid(self, token_valid: jax.Array) -> 'KVCache':
    """Marks the slots of the next T tokens (bool[B, T]) before any layer writes them."""
    chex.assert_rank(token_valid, 2)
    valid = jax.lax.dynamic_update_slice(self.valid, token_valid.astype(bool), (0, self.index))
    return self.replace(valid=valid)

  def advance(self, num_tokens: int) -> 'KVCache':
    """Moves the write index past the T tokens of this step, once every layer has written them."""
    return self.replace(index=self.index + num_tokens)

  def at(self, index) -> 'KVCache':
    """The same cache with write index `index` (int32[] slot of a step's first token)."""
    return self.replace(index=jnp.asarray(index, jnp.int32))

  def layers(self, start: int, end: int) -> 'KVCache':
    """The cache of layers [start, end) (static bounds); free in the per-layer form."""
    return self.replace(k=self.k[start:end], v=self.v[start:end])

  def with_layers(self, start: int, sub: 'KVCache') -> 'KVCache':
    """Writes a sub-cache (as returned by `layers`) back at layer offset `start`."""
    end = start + sub.num_layers
    if self.per_layer:
      return self.replace(k=(*self.k[:start], *sub.k, *self.k[end:]),
                          v=(*self.v[:start], *sub.v, *self.v[end:]))
    return self.replace(k=self.k.at[start:end].set(sub.k), v=self.v.at[start:end].set(sub.v))

  def unstacked(self) -> 'KVCache':
    """The per-layer (decoding) form of this cache."""
    if self.per_layer:
      return self
    return self.replace(k=tuple(self.k), v=tuple(self.v))


def slice_layers(layers: PyTree, start: int, end: int) -> PyTree:
  """Layers [start, end) (static bounds) as a stacked tree, from a stacked tree or a per-layer tuple.

  From a per-layer tuple (`unstack_layers`) one layer costs nothing (a leading axis of 1 is a bitcast);
  several are stacked, i.e. copied.
  """
  if isinstance(layers, tuple):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *layers[start:end])
  return jax.tree.map(lambda x: x[start:end], layers)


def layer_range(layers: PyTree, start: int, end: int) -> PyTree:
  """Layers [start, end) (static bounds) in the form they come in: a per-layer tuple or a stacked tree.

  Copy-free for a per-layer tuple (the decoding form), unlike `slice_layers`, which stacks.
  """
  if isinstance(layers, tuple):
    return layers[start:end]
  return jax.tree.map(lambda x: x[start:end], layers)


def map_layers(fn, layers: PyTree, start: int, end: int) -> PyTree:
  """fn(one layer's params) for layers [start, end), outputs stacked on a new leading axis.

  Vectorised over a stacked tree; one call per layer on a per-layer tuple, so no weight is copied.
  """
  if isinstance(layers, tuple):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *[fn(p) for p in layers[start:end]])
  return jax.vmap(fn)(slice_layers(layers, start, end))


def unstack_layers(lm_params: PyTree) -> PyTree:
  """`lm_params` with ``'layers'`` as a tuple of per-layer trees (a one-time copy, done outside jit).

  For decoding: XLA materialises every static slice of a stacked weight as a copy and hoists the
  copies of all layers out of a decode loop, so each decode call would first copy the whole LM (on
  CPU, bfloat16 weights also converted to float32), including the layers an early exit skips.
  Per-layer arrays are read in place. Training keeps the stacked form (it scans over layers).
  """
  layers = lm_params['layers']
  if isinstance(layers, tuple):
    return lm_params
  count = jax.tree.leaves(layers)[0].shape[0]
  return {**lm_params, 'layers': tuple(jax.tree.map(lambda x, i=i: x[i], layers) for i in range(count))}


def attention_mask(cache: KVCache, num_queries: int) -> jax.Array:
  """bool[B, T, S]: query t (at slot index + t) may see key s iff s is valid and s <= its slot."""
  query_slots = cache.index + jnp.arange(num_queries)
  key_slots = jnp.arange(cache.max_length)
  causal = key_slots[None, :] <= query_slots[:, None]
  return causal[None] & cache.valid[:, None, :]


class DecoderStack(Protocol):
  """What every LM family provides (see opt.OPTStack, t5.T5Stack).

  `ctx` is a family-specific pytree built by `make_context` (positions for OPT; positions, relative
  position bias and encoder cross-attention K/V for T5). It is the same for every layer range of a
  step, so it is built once per step.
  """

  num_layers: int
  hidden_size: int
  num_heads: int
  head_dim: int
  vocab_size: int               # V of the input ids and the logits
  max_positions: int | None     # the longest sequence its position embeddings allow (None: no limit)

  def init_cache(self, batch: int, max_length: int, per_layer: bool = False) -> KVCache:
    """A zero cache for all L layers (`per_layer`: the decoding form, see `KVCache`)."""

  def embed(self, lm_params: PyTree, input_ids: jax.Array | None = None,
            inputs_embeds: jax.Array | None = None, positions: jax.Array | None = None) -> jax.Array:
    """float[B, T, D] input of layer 0 from int[B, T] ids or float[B, T, E] token embeddings."""

  def make_context(self, lm_params: PyTree, cache: KVCache, positions: jax.Array,
                   encoder: Any = None) -> PyTree:
    """Per-step inputs shared by all layers (positions int[B, T], encoder state for T5)."""

  def apply_layers(self, layers_params: PyTree, h: jax.Array, cache: KVCache,
                   ctx: PyTree) -> tuple[jax.Array, jax.Array, KVCache]:
    """Runs a stack of n layers (params with leading axis n, cache with n layers).

    Returns (h_out float[B, T, D], hiddens float[n, B, T, D] after each layer, updated cache).
    Writes the T tokens' K/V at slots [cache.index, cache.index + T); does not advance the index.
    Used both for the backbone's layer ranges and for exit transformers (n = 1).
    """

  def run_layers(self, lm_params: PyTree, h: jax.Array, cache: KVCache, ctx: PyTree, start: int,
                 end: int) -> tuple[jax.Array, jax.Array, KVCache]:
    """`apply_layers` on backbone layers [start, end) and their slice of `cache` (all L layers)."""

  def propagate_kv(self, lm_params: PyTree, h: jax.Array, cache: KVCache, ctx: PyTree, start: int,
                   end: int) -> KVCache:
    """State propagation: writes K/V of layers [start, end) computed from hidden state h (each
    layer's own input norm and K/V projections applied to h), in one batched computation."""

  def final_features(self, lm_params: PyTree, h: jax.Array) -> jax.Array:
    """The LM head's input: final norm (and OPT's project_out) applied to a layer output."""

  def logits(self, lm_params: PyTree, features: jax.Array) -> jax.Array:
    """float[B, T, V] from `final_features` output (tied/untied head, T5 scaling included)."""


def token_positions(cache: KVCache, num_tokens: int) -> jax.Array:
  """int32[B, T] position of each of this step's tokens (call after `mark_valid`).

  A token's position is the number of real tokens before it in its row, as HF computes OPT's
  positions from the attention mask (cumsum): with left padding the first real token is at 0.
  Padding tokens get -1, as in HF.
  """
  counts = jnp.cumsum(cache.valid, axis=1, dtype=jnp.int32) - 1
  start = (0, cache.index)
  size = (cache.valid.shape[0], num_tokens)
  valid = jax.lax.dynamic_slice(cache.valid, start, size)
  return jnp.where(valid, jax.lax.dynamic_slice(counts, start, size), -1)


def begin_step(stack: DecoderStack, lm_params: PyTree, cache: KVCache, token_valid: jax.Array,
               input_ids: jax.Array | None = None, inputs_embeds: jax.Array | None = None,
               encoder: Any = None) -> tuple[jax.Array, KVCache, PyTree]:
  """The start of every step (prefill or one token): mark slots, embed, build the layer context.

  Args:
    stack: the LM family.
    lm_params: its parameters.
    cache: the cache before this step.
    token_valid: bool[B, T] real (non-padding) tokens of this step.
    input_ids: int[B, T], or
    inputs_embeds: float[B, T, E] token embeddings (e.g. with the image prefix in place).
    encoder: the family's encoder state (T5), passed to `make_context`.

  Returns:
    (h float[B, T, D] input of layer 0, cache with the slots marked, ctx). After running all layers
    the caller advances the cache by T.
  """
  cache = cache.mark_valid(token_valid)
  positions = token_positions(cache, token_valid.shape[1])
  h = stack.embed(lm_params, input_ids=input_ids, inputs_embeds=inputs_embeds, positions=positions)
  return h, cache, stack.make_context(lm_params, cache, positions, encoder)


def lm_step(stack: DecoderStack, lm_params: PyTree, cache: KVCache, token_valid: jax.Array,
            input_ids: jax.Array | None = None, inputs_embeds: jax.Array | None = None,
            encoder: Any = None) -> tuple[jax.Array, KVCache]:
  """All LM layers on T new tokens: (features float[B, T, E] (`final_features`), cache advanced by T)."""
  h, cache, ctx = begin_step(stack, lm_params, cache, token_valid, input_ids=input_ids,
                             inputs_embeds=inputs_embeds, encoder=encoder)
  h, _, cache = stack.run_layers(lm_params, h, cache, ctx, 0, stack.num_layers)
  return stack.final_features(lm_params, h), cache.advance(token_valid.shape[1])
