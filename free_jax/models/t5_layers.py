"""T5 building blocks: config, relative position bias, attention and the encoder/decoder layers.

Numerically these follow transformers 5 ``modeling_t5``: RMS norm with the variance in float32, no
1/sqrt(d) scaling of attention scores (T5 folds it into the initialisation), an additive relative
position bias owned by the stack (HF stores it in layer 0 and shares it), ``relu`` or gated feed-forward.
The stacks and the layer-range API live in `free_jax.models.t5`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from free_jax.models.layers import attend, heads_first
from free_jax.models.vit import hf_activation


@dataclasses.dataclass(frozen=True)
class T5Config:
  """The fields of an HF ``T5Config`` that the computation depends on.

  `tie_word_embeddings` means the original-T5 head: logits = (features * d_model**-0.5) @ shared.T.
  Untied (Flan-T5) heads use their own ``lm_head`` and no scaling. (transformers 5 keeps that choice
  in ``scale_decoder_outputs`` and always reports ``tie_word_embeddings=True``.)
  """

  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_decoder_layers: int = 6
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = 'relu'
  tie_word_embeddings: bool = True
  pad_token_id: int = 0
  eos_token_id: int = 1
  decoder_start_token_id: int = 0

  def __post_init__(self):
    try:
      hf_activation(self.dense_act_fn)
    except ValueError as e:
      raise ValueError(f'feed_forward_proj={self.feed_forward_proj!r}: {e}') from None

  @classmethod
  def from_hf(cls, hf_config: Any) -> 'T5Config':
    """From a transformers ``T5Config`` (or anything with its attributes)."""
    tie = getattr(hf_config, 'scale_decoder_outputs', None)
    tie = hf_config.tie_word_embeddings if tie is None else tie
    pad = hf_config.pad_token_id
    start = getattr(hf_config, 'decoder_start_token_id', None)
    eos = hf_config.eos_token_id
    return cls(
        vocab_size=hf_config.vocab_size, d_model=hf_config.d_model, d_kv=hf_config.d_kv,
        d_ff=hf_config.d_ff, num_layers=hf_config.num_layers,
        num_decoder_layers=hf_config.num_decoder_layers or hf_config.num_layers,
        num_heads=hf_config.num_heads,
        relative_attention_num_buckets=hf_config.relative_attention_num_buckets,
        relative_attention_max_distance=hf_config.relative_attention_max_distance,
        layer_norm_epsilon=hf_config.layer_norm_epsilon, feed_forward_proj=hf_config.feed_forward_proj,
        tie_word_embeddings=bool(tie), pad_token_id=pad,
        eos_token_id=eos[0] if isinstance(eos, (list, tuple)) else eos,
        # T5 starts decoding with the pad token when the config does not say otherwise.
        decoder_start_token_id=pad if start is None else start)

  @property
  def is_gated(self) -> bool:
    return self.feed_forward_proj.startswith('gated-')

  @property
  def dense_act_fn(self) -> str:
    """The HF ``ACT2FN`` name: ``gated-gelu`` means the tanh approximation (``gelu_new``), as in HF."""
    if self.feed_forward_proj == 'gated-gelu':
      return 'gelu_new'
    return self.feed_forward_proj.split('-')[-1]

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.d_kv


def relative_position_bucket(relative_position: jax.Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
  """int32 bucket of each (key - query) distance, exactly as HF ``T5Attention._relative_position_bucket``."""
  buckets = jnp.zeros_like(relative_position, jnp.int32)
  if bidirectional:
    num_buckets //= 2
    buckets = (relative_position > 0).astype(jnp.int32) * num_buckets
    distance = jnp.abs(relative_position)
  else:
    distance = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  # Half the buckets are exact distances, the rest logarithmic up to max_distance (clamped to 1 so the
  # log is finite where the exact branch is taken anyway).
  log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
  large = max_exact + (log_ratio / math.log(max_distance / max_exact)
                       * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(distance < max_exact, distance, large)


def position_bias(table: jax.Array, query_positions: jax.Array, key_positions: jax.Array,
                  bidirectional: bool, config: T5Config) -> jax.Array:
  """float32[B, H, T, S] additive attention bias from the bucket table float[num_buckets, H].

  Args:
    table: the ``relative_attention_bias`` embedding.
    query_positions: int[B, T] (or [1, T]) position of each query.
    key_positions: int[B, S] (or [1, S]) position of each key.
    bidirectional: True for the encoder, False (causal buckets) for the decoder.
    config: bucket count and maximum distance.
  """
  relative = key_positions[:, None, :] - query_positions[:, :, None]
  buckets = relative_position_bucket(relative, bidirectional, config.relative_attention_num_buckets,
                                     config.relative_attention_max_distance)
  return jnp.take(table.astype(jnp.float32), buckets, axis=0).transpose(0, 3, 1, 2)


def _dense(features: int, dtype: Any, name: str | None = None, stddev: float | None = None) -> nn.Dense:
  """A bias-free projection (HF ``nn.Linear(bias=False)``), initialised as HF T5 does: normal with
  std fan_in**-0.5 unless `stddev` is given."""
  if stddev is None:
    init = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal')
  else:
    init = nn.initializers.normal(stddev)
  return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=dtype, kernel_init=init, name=name)


def t5_norm(config: T5Config, dtype: Any, name: str | None = None, **kwargs) -> nn.RMSNorm:
  """HF ``T5LayerNorm`` (params ``scale``): RMSNorm without mean or bias, reduced in float32."""
  return nn.RMSNorm(epsilon=config.layer_norm_epsilon, dtype=dtype, param_dtype=dtype, name=name,
                    **kwargs)


class T5Attention(nn.Module):
  """Projections of one T5 attention block (params ``q``, ``k``, ``v``, ``o``: HF names)."""

  config: T5Config
  dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    # HF initialises q with an extra 1/sqrt(d_kv) because the scores are not scaled.
    self.q = _dense(c.inner_dim, self.dtype, stddev=(c.d_model * c.d_kv) ** -0.5)
    self.k = _dense(c.inner_dim, self.dtype)
    self.v = _dense(c.inner_dim, self.dtype)
    self.o = _dense(c.d_model, self.dtype)

  def _heads(self, x: jax.Array) -> jax.Array:
    return x.reshape(*x.shape[:-1], self.config.num_heads, self.config.d_kv)

  def query(self, x: jax.Array) -> jax.Array:
    """float[B, T, D] -> float[B, T, H, Dh]."""
    return self._heads(self.q(x))

  def key_value(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float[B, S, D] -> keys, values float[B * H, S, Dh] (the cache layout)."""
    return heads_first(self._heads(self.k(x))), heads_first(self._heads(self.v(x)))

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
               bias: jax.Array | None = None) -> jax.Array:
    """Attention of projected q float[B, T, H, Dh] over k/v float[B * H, S, Dh] (unscaled, as T5), then the
    output projection: float[B, T, D]."""
    out = attend(q, k, v, mask, bias)
    return self.o(out.reshape(*out.shape[:-2], self.config.inner_dim))


class T5MLP(nn.Module):
  """``DenseReluDense``: ``wi``/``wo``, or gated ``wi_0``/``wi_1``/``wo`` (HF names)."""

  config: T5Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    act = hf_activation(c.dense_act_fn)
    if c.is_gated:
      hidden = act(_dense(c.d_ff, self.dtype, 'wi_0')(x)) * _dense(c.d_ff, self.dtype, 'wi_1')(x)
    else:
      hidden = act(_dense(c.d_ff, self.dtype, 'wi')(x))
    return _dense(c.d_model, self.dtype, 'wo')(hidden)


class T5EncoderLayer(nn.Module):
  """HF ``T5Block`` of the encoder: pre-norm bidirectional self-attention, then pre-norm MLP."""

  config: T5Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array, bias: jax.Array, mask: jax.Array) -> jax.Array:
    """float[B, S, D] -> float[B, S, D]; `bias` float[1|B, H, S, S], `mask` bool[B, S, S]."""
    attn = T5Attention(self.config, self.dtype, name='self_attn')
    x = t5_norm(self.config, self.dtype, 'self_attn_norm')(h)
    h = h + attn(attn.query(x), *attn.key_value(x), mask, bias)
    return h + T5MLP(self.config, self.dtype, name='mlp')(t5_norm(self.config, self.dtype, 'mlp_norm')(h))


class T5DecoderLayer(nn.Module):
  """HF ``T5Block`` of the decoder: causal self-attention, cross-attention to the encoder, MLP.

  Also the exit transformer of a T5 backbone (same structure, its own params). The methods
  `self_key_value` and `cross_key_value` expose the K/V computations for state propagation and for
  precomputing cross-attention K/V once per encoder output.
  """

  config: T5Config
  dtype: Any = jnp.float32

  def setup(self):
    self.self_attn_norm = t5_norm(self.config, self.dtype)
    self.self_attn = T5Attention(self.config, self.dtype)
    self.cross_attn_norm = t5_norm(self.config, self.dtype)
    self.cross_attn = T5Attention(self.config, self.dtype)
    self.mlp_norm = t5_norm(self.config, self.dtype)
    self.mlp = T5MLP(self.config, self.dtype)

  def self_key_value(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Self-attention K/V float[B * H, T, Dh] of layer input h float[B, T, D]."""
    return self.self_attn.key_value(self.self_attn_norm(h))

  def cross_key_value(self, encoder_hidden: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Cross-attention K/V float[B * H, S_enc, Dh] of the encoder output float[B, S_enc, D]."""
    return self.cross_attn.key_value(encoder_hidden)

  def __call__(self, h: jax.Array, cache_k: jax.Array, cache_v: jax.Array, index: jax.Array,
               bias: jax.Array, mask: jax.Array, cross_k: jax.Array, cross_v: jax.Array,
               encoder_mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decoder layer on T new tokens.

    Args:
      h: float[B, T, D] layer input.
      cache_k: float[B * H, S, Dh] this layer's cached keys (slots before `index` hold past tokens).
      cache_v: float[B * H, S, Dh] cached values.
      index: int32[] slot of the first new token.
      bias: float32[B, H, T, S] relative position bias of the new tokens against every slot.
      mask: bool[B, T, S] self-attention visibility (causal and valid).
      cross_k: float[B * H, S_enc, Dh] this layer's cross-attention keys.
      cross_v: float[B * H, S_enc, Dh] cross-attention values.
      encoder_mask: bool[B, S_enc] valid encoder positions.

    Returns:
      (h_out float[B, T, D], cache_k, cache_v float[B * H, S, Dh] with the new tokens' K/V written).
    """
    x = self.self_attn_norm(h)
    k, v = self.self_attn.key_value(x)
    # The caches with the new K/V written are attended over and returned (one write, kept in place).
    keys = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, index, 0))
    values = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, index, 0))
    h = h + self.self_attn(self.self_attn.query(x), keys, values, mask, bias)
    x = self.cross_attn_norm(h)
    h = h + self.cross_attn(self.cross_attn.query(x), cross_k, cross_v, encoder_mask[:, None, :])
    h = h + self.mlp(self.mlp_norm(h))
    return h, keys, values
