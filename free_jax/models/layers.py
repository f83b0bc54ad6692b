"""Building blocks shared by the language-model families: cached self-attention, MLP, layer stacks.

Shapes: B batch, T tokens of this step, S cache slots, H heads, Dh head size, D model width,
L layers. Cache layout and masks follow `free_jax.models.lm_api` (K/V float[B * H, S, Dh], one write
index for the batch, per-row validity in ``KVCache.valid``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from free_jax.models.lm_api import KVCache, PyTree
from free_jax.models.vit import hf_activation


def heads_first(x: jax.Array) -> jax.Array:
  """float[B, T, H, Dh] -> float[B * H, T, Dh], the cache layout (row b's head h at b * H + h)."""
  b, t, h, d = x.shape
  return jnp.swapaxes(x, 1, 2).reshape(b * h, t, d)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, bias: jax.Array | None = None) -> jax.Array:
  """Unscaled dot-product attention over keys/values in the cache layout (queries pre-scaled if the
  family scales).

  Computed as `jax.nn.dot_product_attention` does (scores in float32, masked scores a large finite
  negative so rows with no visible key stay NaN-free, probabilities cast back), but on K/V
  float[B * H, S, Dh], keys as the dots' left operand: the dots then read the cache as it is. With
  [B, S, H, Dh] XLA:CPU transposed (copied) every layer's whole cache at every decode step, and with
  [B, H, S, Dh] it still did at B == 1 (the dot reads a reshape that drops the unit batch axis, and the
  fusion pass then duplicates the cache write into it).

  Args:
    q: float[B, T, H, Dh] queries.
    k: float[B * H, S, Dh] keys.
    v: float[B * H, S, Dh] values.
    mask: bool, broadcastable to [B, T, S]: which keys each query may see.
    bias: float, broadcastable to [B, H, T, S], added to the scores (T5's relative position bias).

  Returns:
    float[B, T, H, Dh] in the dtype of `q`.
  """
  b, t, h, d = q.shape
  k, v = k.astype(q.dtype), v.astype(q.dtype)
  scores = jnp.einsum('nsd,ntd->nts', k, heads_first(q), preferred_element_type=jnp.float32)
  scores = scores.reshape(b, h, t, -1)
  if bias is not None:
    scores = scores + bias.astype(jnp.float32)
  scores = jnp.where(mask[:, None], scores, jnp.asarray(-0.7 * float(jnp.finfo(jnp.float32).max), jnp.float32))
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b * h, t, -1)
  return jnp.swapaxes(jnp.einsum('nts,nsd->ntd', probs, v).reshape(b, h, t, d), 1, 2)


class SelfAttention(nn.Module):
  """Multi-head self-attention over a KV cache, with HF-style ``q/k/v/out_proj`` projections.

  Attributes:
    features: D, the model width (input and output).
    num_heads: H.
    head_dim: Dh.
    use_bias: whether the four projections have biases (OPT: yes, T5: no).
    scale_query: multiply queries by Dh**-0.5 before the dot product (OPT); T5 does not scale.
    dtype: computation (and initialisation) dtype.
  """

  features: int
  num_heads: int
  head_dim: int
  use_bias: bool = True
  scale_query: bool = True
  dtype: Any = jnp.float32

  def setup(self):
    dense = lambda n: nn.Dense(n, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.dtype)
    inner = self.num_heads * self.head_dim
    self.q_proj, self.k_proj, self.v_proj = dense(inner), dense(inner), dense(inner)
    self.out_proj = dense(self.features)

  def _heads(self, y: jax.Array) -> jax.Array:
    return y.reshape(*y.shape[:-1], self.num_heads, self.head_dim)

  def project_kv(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """K/V of inputs float[B, T, D]: two float[B * H, T, Dh] (what state propagation writes)."""
    return heads_first(self._heads(self.k_proj(x))), heads_first(self._heads(self.v_proj(x)))

  def __call__(self, x: jax.Array, k_cache: jax.Array, v_cache: jax.Array, mask: jax.Array,
               index: jax.Array, bias: jax.Array | None = None):
    """Writes the T tokens' K/V into the cache at slot `index` and attends x to it.

    Args:
      x: float[B, T, D] (already normalised if the layer is pre-LN).
      k_cache: float[B * H, S, Dh] this layer's keys before this step.
      v_cache: float[B * H, S, Dh] this layer's values before this step.
      mask: bool[B, T, S] which slots each query may see (`lm_api.attention_mask`).
      index: int32[] first slot of this step's tokens.
      bias: optional additive float[B or 1, H, T, S] (T5's relative position bias).

    Returns:
      (out float[B, T, D], k_cache, v_cache float[B * H, S, Dh] with this step's K/V written): the
      updated caches themselves, so the write the attention reads is the one the caller keeps (two
      identical writes are not always merged by XLA, and then each costs a whole-cache copy).
    """
    chex.assert_rank([x, k_cache, mask], [3, 3, 3])
    q = self._heads(self.q_proj(x))
    if self.scale_query:  # HF OPT scales q before the product; same order for bit-closeness.
      q = q * jnp.asarray(self.head_dim ** -0.5, q.dtype)
    k, v = self.project_kv(x)
    keys, values = _write(k_cache, k, index), _write(v_cache, v, index)
    out = attend(q, keys, values, mask, bias)
    return self.out_proj(out.reshape(*x.shape[:-1], -1)), keys, values


class Mlp(nn.Module):
  """Position-wise feed-forward ``fc2(act(fc1(x)))`` (OPT's layout)."""

  hidden: int
  activation: str = 'relu'
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = lambda n, name: nn.Dense(n, use_bias=self.use_bias, dtype=self.dtype,
                                     param_dtype=self.dtype, name=name)
    return dense(x.shape[-1], 'fc2')(hf_activation(self.activation)(dense(self.hidden, 'fc1')(x)))


LayerFn = Callable[[PyTree, jax.Array, jax.Array, jax.Array],
                   tuple[jax.Array, jax.Array, jax.Array]]


def layer_at(layers: PyTree, j: int) -> PyTree:
  """Layer j (static) of a stacked tree (leaves with a leading layer axis) or of a per-layer tuple."""
  if isinstance(layers, tuple):
    return layers[j]
  return jax.tree.map(lambda x: x[j], layers)


def stacked(layers: PyTree) -> PyTree:
  """A per-layer tuple stacked on a new leading axis (a copy); a stacked tree as is."""
  if isinstance(layers, tuple):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return layers


def run_stack(apply_layer: LayerFn, layer_inputs: PyTree, h: jax.Array, cache: KVCache,
              first_layer: int = 0) -> tuple[jax.Array, jax.Array, KVCache]:
  """Runs n layers in order, writing each layer's new K/V at the cache's write index.

  A stacked cache (training, full forwards) runs the layers in a `lax.scan`; a per-layer cache
  (decoding) unrolls them, each layer reading and updating its own array in place, so a decode step
  copies no cache (see `lm_api.KVCache`).

  Args:
    apply_layer: (layer_inputs of one layer, h, k_cache_l float[B*H,S,Dh], v_cache_l) -> (h, k_cache_l,
      v_cache_l) with the step's K/V written at the cache's write index.
    layer_inputs: per-layer inputs (params, and e.g. T5's cross-attention K/V) as a tuple of
      trees, each stacked (leading axis n) or a per-layer tuple of n.
    h: float[B, T, D] input of the first layer.
    cache: cache whose layers [first_layer, first_layer + n) belong to these layers.
    first_layer: static layer offset into `cache`.

  Returns:
    (h_out float[B, T, D], hiddens float[n, B, T, D] after each layer, cache).
  """
  if cache.per_layer:
    ks, vs, hiddens = list(cache.k), list(cache.v), []
    n = _num_layers(layer_inputs[0])
    for j in range(n):
      i = first_layer + j
      h, ks[i], vs[i] = apply_layer(tuple(layer_at(x, j) for x in layer_inputs), h, ks[i], vs[i])
      hiddens.append(h)
    return h, jnp.stack(hiddens), cache.replace(k=tuple(ks), v=tuple(vs))

  def body(carry, xs):
    h, k_all, v_all, i = carry
    h, k_layer, v_layer = apply_layer(xs, h, k_all[i], v_all[i])
    k_all = jax.lax.dynamic_update_index_in_dim(k_all, k_layer.astype(k_all.dtype), i, 0)
    v_all = jax.lax.dynamic_update_index_in_dim(v_all, v_layer.astype(v_all.dtype), i, 0)
    return (h, k_all, v_all, i + 1), h

  init = (h, _varying_like(cache.k, h), _varying_like(cache.v, h), jnp.asarray(first_layer, jnp.int32))
  (h, k, v, _), hiddens = jax.lax.scan(body, init, tuple(stacked(x) for x in layer_inputs))
  return h, hiddens, cache.replace(k=k, v=v)


def _num_layers(layers: PyTree) -> int:
  if isinstance(layers, tuple):
    return len(layers)
  return jax.tree.leaves(layers)[0].shape[0]


def _write(cache_layer: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
  """float[B * H, T, Dh] written into one layer's float[B * H, S, Dh] cache at slot `index`."""
  return jax.lax.dynamic_update_slice(cache_layer, new.astype(cache_layer.dtype), (0, index, 0))


def _varying_like(x: jax.Array, like: jax.Array) -> jax.Array:
  """x marked device-varying over the mesh axes that `like` varies over (inside `jax.shard_map`).

  A fresh cache is device-invariant, but the body writes K/V computed from the (per-device) batch
  into it; a scan carry must have one type, so the cache starts as varying as the hidden state.
  """
  axes = tuple(jax.typeof(like).manual_axis_type.varying - jax.typeof(x).manual_axis_type.varying)
  return jax.lax.pcast(x, axes, to='varying') if axes else x


def write_layers_kv(cache: KVCache, k: jax.Array, v: jax.Array, first_layer: int) -> KVCache:
  """Writes float[n, B * H, T, Dh] K/V of layers [first_layer, first_layer + n) at the write index."""
  if cache.per_layer:
    n = k.shape[0]
    span = range(first_layer, first_layer + n)
    ks = tuple(_write(cache.k[i], k[i - first_layer], cache.index) if i in span else x
               for i, x in enumerate(cache.k))
    vs = tuple(_write(cache.v[i], v[i - first_layer], cache.index) if i in span else x
               for i, x in enumerate(cache.v))
    return cache.replace(k=ks, v=vs)
  slot = (first_layer, 0, cache.index, 0)
  return cache.replace(k=jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), slot),
                       v=jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), slot))
