"""BLIP-2 Q-Former (query path), numerically equal to transformers 5 ``Blip2QFormerModel``.

Contract
--------
``QFormer(config, dtype).apply({'params': p}, query_embeds, image_embeds, image_mask=None)``
  query_embeds: float[B, Q, Dq] the learned ``query_tokens`` broadcast over the batch.
  image_embeds: float[B, N, Dv] the vision encoder's ``last_hidden_state`` (Dv = encoder_hidden_size).
  image_mask: optional bool[B, N], False for image tokens the queries must not attend to (BLIP-2
    passes all-ones, which is the same as None).
  returns: float[B, Q, Dq] HF's ``last_hidden_state``.

This is the path ``Blip2ForConditionalGeneration`` uses: no text input, so HF applies ``layernorm`` to
the query embeddings directly (no position embeddings), every layer runs bidirectional self-attention
over the queries, cross-attention to the image on layers ``i % cross_attention_frequency == 0``, and
the query feed-forward (``intermediate_query`` / ``output_query``). The text feed-forward
(``intermediate`` / ``output``, present only when ``use_qformer_text_input``) is never used on this
path, so it is not converted. Dropout is omitted: the backbone is frozen. HF keeps the Q-Former in
float32 even in half-precision models; the default ``dtype`` does the same.

``qformer_params_from_hf(get, config)`` converts the HF tensors under ``qformer.`` (``get`` already
scoped to that prefix) into the tree ``QFormer.init`` makes. Layers differ (cross-attention only on
some), so they are separate modules ``layer_0 .. layer_{L-1}``, not a scan.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from free_jax.models.hf_tensors import TensorSource, layer_norm, linear
from free_jax.models.vit import hf_activation


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
  """The fields of HF ``Blip2QFormerConfig`` that the query path uses."""

  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = 'gelu'
  layer_norm_eps: float = 1e-12
  cross_attention_frequency: int = 2
  encoder_hidden_size: int = 1408

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f'hidden_size={self.hidden_size} is not divisible by '
                       f'num_attention_heads={self.num_attention_heads}')
    if self.cross_attention_frequency < 1:
      raise ValueError(f'cross_attention_frequency={self.cross_attention_frequency} must be >= 1')
    hf_activation(self.hidden_act)

  @classmethod
  def from_hf(cls, hf_config) -> 'QFormerConfig':
    """From a transformers ``Blip2QFormerConfig``.

    ``Blip2Config`` overwrites ``encoder_hidden_size`` with the vision hidden size, so pass its
    ``qformer_config`` (not a standalone one) when converting a full BLIP-2 checkpoint.
    """
    return cls(hidden_size=hf_config.hidden_size, num_hidden_layers=hf_config.num_hidden_layers,
               num_attention_heads=hf_config.num_attention_heads,
               intermediate_size=hf_config.intermediate_size, hidden_act=hf_config.hidden_act,
               layer_norm_eps=hf_config.layer_norm_eps,
               cross_attention_frequency=hf_config.cross_attention_frequency,
               encoder_hidden_size=hf_config.encoder_hidden_size)

  def has_cross_attention(self, layer: int) -> bool:
    return layer % self.cross_attention_frequency == 0


class _Attention(nn.Module):
  """BERT attention + output block: LayerNorm(dense(attend(x, kv)) + x)."""

  config: QFormerConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, kv: jax.Array, kv_mask: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    b, q_len, d = x.shape
    heads = functools.partial(nn.DenseGeneral, (cfg.num_attention_heads, d // cfg.num_attention_heads),
                              dtype=self.dtype)
    q = heads(name='query')(x)
    k = heads(name='key')(kv)
    v = heads(name='value')(kv)
    mask = None if kv_mask is None else kv_mask.astype(bool)[:, None, None, :]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask).reshape(b, q_len, d)
    out = nn.Dense(d, dtype=self.dtype, name='dense')(out)
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, use_fast_variance=False,
                        name='LayerNorm')(out + x)


class _Layer(nn.Module):
  """One Q-Former layer on the query tokens."""

  config: QFormerConfig
  cross_attention: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array, image_embeds: jax.Array, image_mask: jax.Array | None) -> jax.Array:
    cfg = self.config
    h = _Attention(cfg, self.dtype, name='attention')(h, h)
    if self.cross_attention:
      h = _Attention(cfg, self.dtype, name='crossattention')(h, image_embeds, image_mask)
    y = nn.Dense(cfg.intermediate_size, dtype=self.dtype, name='intermediate_query')(h)
    y = nn.Dense(cfg.hidden_size, dtype=self.dtype, name='output_query')(hf_activation(cfg.hidden_act)(y))
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, use_fast_variance=False,
                        name='output_query_LayerNorm')(y + h)


class QFormer(nn.Module):
  """HF ``Blip2QFormerModel`` query path: float[B, Q, Dq], float[B, N, Dv] -> float[B, Q, Dq]."""

  config: QFormerConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query_embeds: jax.Array, image_embeds: jax.Array,
               image_mask: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    chex.assert_rank([query_embeds, image_embeds], 3)
    chex.assert_axis_dimension(query_embeds, 2, cfg.hidden_size)
    chex.assert_axis_dimension(image_embeds, 2, cfg.encoder_hidden_size)
    chex.assert_equal_shape_prefix([query_embeds, image_embeds], 1)
    if image_mask is not None:
      chex.assert_shape(image_mask, image_embeds.shape[:2])
    h = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, use_fast_variance=False,
                     name='layernorm')(query_embeds)
    image_embeds = image_embeds.astype(self.dtype)
    for i in range(cfg.num_hidden_layers):
      h = _Layer(cfg, cfg.has_cross_attention(i), self.dtype, name=f'layer_{i}')(h, image_embeds, image_mask)
    return h


def _attention_params_from_hf(get: TensorSource, cfg: QFormerConfig, kv_features: int) -> dict:
  d, n = cfg.hidden_size, cfg.num_attention_heads
  head_shape = (n, d // n)

  def heads(name, in_features):  # nn.Linear -> DenseGeneral with per-head output axes
    p = linear(get, f'attention.{name}', in_features, d)
    return {'kernel': p['kernel'].reshape(in_features, *head_shape), 'bias': p['bias'].reshape(head_shape)}

  return {
      'query': heads('query', d),
      'key': heads('key', kv_features),
      'value': heads('value', kv_features),
      'dense': linear(get, 'output.dense', d, d),
      'LayerNorm': layer_norm(get, 'output.LayerNorm', d),
  }


def qformer_params_from_hf(get: TensorSource, config: QFormerConfig) -> dict:
  """HF ``Blip2QFormerModel`` tensors (``get`` scoped to ``qformer.``) -> `QFormer` params.

  Raises:
    WeightsError: a tensor is missing or has a shape the config does not expect (names the HF key).
  """
  cfg = config
  d, f = cfg.hidden_size, cfg.intermediate_size
  params = {'layernorm': layer_norm(get, 'layernorm', d)}
  for i in range(cfg.num_hidden_layers):
    layer = get.child(f'encoder.layer.{i}.')
    p = {'attention': _attention_params_from_hf(layer.child('attention.'), cfg, d)}
    if cfg.has_cross_attention(i):
      p['crossattention'] = _attention_params_from_hf(layer.child('crossattention.'), cfg,
                                                      cfg.encoder_hidden_size)
    p['intermediate_query'] = linear(layer, 'intermediate_query.dense', d, f)
    p['output_query'] = linear(layer, 'output_query.dense', f, d)
    p['output_query_LayerNorm'] = layer_norm(layer, 'output_query.LayerNorm', d)
    params[f'layer_{i}'] = p
  return params
