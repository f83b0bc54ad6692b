"""BLIP-2 vision encoder (EVA-ViT), numerically equal to transformers 5 ``Blip2VisionModel``.

Contract
--------
``VisionModel(config, dtype).apply({'params': p}, pixel_values)``
  pixel_values: float[B, H, W, 3] channels-last, already normalised (see `free_jax.data.preprocess`),
    with H == W == config.image_size.
  returns: float[B, 1 + N, Dv], N = (image_size // patch_size) ** 2, Dv = config.hidden_size: the class
    token then the patch tokens in row-major order, after ``post_layernorm``. This is HF's
    ``last_hidden_state``, which is exactly what BLIP-2 feeds the Q-Former as ``encoder_hidden_states``.

``vision_params_from_hf(get, config)`` converts the HF tensors under ``vision_model.`` (``get`` is
already scoped to that prefix) into the tree ``VisionModel.init`` makes. The encoder layers are stacked
on a leading axis of length L and run with ``nn.scan`` (one compiled layer body for all 39 of ViT-g).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from free_jax.models.hf_tensors import TensorSource, layer_norm, linear, stack_layers

# The names of transformers' ACT2FN that BLIP-2 configs use. HF "gelu" is the exact (erf) GELU; the
# "gelu_new"/"gelu_pytorch_tanh" variants are the tanh approximation.
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'gelu': functools.partial(jax.nn.gelu, approximate=False),
    'gelu_new': functools.partial(jax.nn.gelu, approximate=True),
    'gelu_pytorch_tanh': functools.partial(jax.nn.gelu, approximate=True),
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),
    'relu': jax.nn.relu,
    'silu': jax.nn.silu,
}


def hf_activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """The JAX function for a transformers ``hidden_act`` name, computed as HF's ``ACT2FN`` does."""
  if name not in _ACTIVATIONS:
    raise ValueError(f'hidden_act={name!r} is not supported; expected one of {sorted(_ACTIVATIONS)}')
  return _ACTIVATIONS[name]


def _square_size(name: str, value: Any) -> int:
  """An HF image/patch size (int or [h, w]) as one int; BLIP-2 only supports square sizes."""
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f'{name}={value!r}: only square sizes are supported')
    value = value[0]
  return int(value)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The fields of HF ``Blip2VisionConfig`` that the forward pass uses."""

  hidden_size: int = 1408
  intermediate_size: int = 6144
  num_hidden_layers: int = 39
  num_attention_heads: int = 16
  image_size: int = 224
  patch_size: int = 14
  hidden_act: str = 'gelu'
  layer_norm_eps: float = 1e-6
  qkv_bias: bool = True

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f'hidden_size={self.hidden_size} is not divisible by '
                       f'num_attention_heads={self.num_attention_heads}')
    if self.image_size % self.patch_size:
      raise ValueError(f'image_size={self.image_size} is not divisible by patch_size={self.patch_size}')
    hf_activation(self.hidden_act)

  @classmethod
  def from_hf(cls, hf_config) -> 'VisionConfig':
    """From a transformers ``Blip2VisionConfig`` (or anything with the same attributes)."""
    return cls(hidden_size=hf_config.hidden_size, intermediate_size=hf_config.intermediate_size,
               num_hidden_layers=hf_config.num_hidden_layers,
               num_attention_heads=hf_config.num_attention_heads,
               image_size=_square_size('image_size', hf_config.image_size),
               patch_size=_square_size('patch_size', hf_config.patch_size),
               hidden_act=hf_config.hidden_act, layer_norm_eps=hf_config.layer_norm_eps,
               qkv_bias=hf_config.qkv_bias)

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


class _Attention(nn.Module):
  """Bidirectional self-attention with HF's fused ``qkv`` projection (its bias has a k part too)."""

  config: VisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    b, t, d = x.shape
    qkv = nn.Dense(3 * d, use_bias=cfg.qkv_bias, dtype=self.dtype, name='qkv')(x)
    # HF reshapes the fused output as [B, T, 3, H, Dh].
    q, k, v = jnp.moveaxis(qkv.reshape(b, t, 3, cfg.num_attention_heads, cfg.head_dim), 2, 0)
    out = jax.nn.dot_product_attention(q, k, v)
    return nn.Dense(d, dtype=self.dtype, name='projection')(out.reshape(b, t, d))


class _EncoderLayer(nn.Module):
  """Pre-LN transformer block; the (h, None) -> (h, None) signature is for ``nn.scan``."""

  config: VisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array, _) -> tuple[jax.Array, None]:
    cfg = self.config
    norm = functools.partial(nn.LayerNorm, epsilon=cfg.layer_norm_eps, dtype=self.dtype,
                             use_fast_variance=False)
    h = h + _Attention(cfg, self.dtype, name='self_attn')(norm(name='layer_norm1')(h))
    y = norm(name='layer_norm2')(h)
    y = nn.Dense(cfg.intermediate_size, dtype=self.dtype, name='fc1')(y)
    y = nn.Dense(cfg.hidden_size, dtype=self.dtype, name='fc2')(hf_activation(cfg.hidden_act)(y))
    return h + y, None


class VisionModel(nn.Module):
  """HF ``Blip2VisionModel``: pixels float[B, S, S, 3] -> ``last_hidden_state`` float[B, 1 + N, Dv]."""

  config: VisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    cfg = self.config
    s = cfg.image_size
    if pixel_values.ndim != 4 or pixel_values.shape[1:] != (s, s, 3):
      raise ValueError(f'pixel_values has shape {tuple(pixel_values.shape)}, expected [B, {s}, {s}, 3] '
                       '(channels-last)')
    d = cfg.hidden_size
    patches = nn.Conv(d, (cfg.patch_size, cfg.patch_size), strides=(cfg.patch_size, cfg.patch_size),
                      padding='VALID', dtype=self.dtype, name='patch_embedding')(pixel_values)
    b = patches.shape[0]
    patches = patches.reshape(b, cfg.num_patches, d)  # row-major over the patch grid, as HF flattens
    cls_token = self.param('class_embedding', nn.initializers.truncated_normal(0.02), (d,)).astype(self.dtype)
    positions = self.param('position_embedding', _position_init, (1 + cfg.num_patches, d)).astype(self.dtype)
    h = jnp.concatenate([jnp.broadcast_to(cls_token, (b, 1, d)), patches], axis=1) + positions

    layers = nn.scan(_EncoderLayer, variable_axes={'params': 0}, split_rngs={'params': True},
                     length=cfg.num_hidden_layers)
    h, _ = layers(cfg, self.dtype, name='layers')(h, None)
    h = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, use_fast_variance=False,
                     name='post_layernorm')(h)
    chex.assert_shape(h, (b, 1 + cfg.num_patches, d))
    return h


def _position_init(rng: jax.Array, shape: tuple[int, int], dtype=jnp.float32) -> jax.Array:
  """float[1 + N, D]: a zero class row, then 2-D sin-cos codes of the patch grid (MAE / big_vision).

  Only a ViT trained from scratch (the embedded backbone) sees this; checkpoints overwrite it. HF's
  truncated_normal(0.02) makes the position ~50x smaller than the patch content, and the embedded
  backbone then never learned where objects are: the Q-Former's queries could read colours and
  shapes but not positions (per-object row/column decoding stayed at chance after 800 steps; with
  position codes of unit scale it is exact after 400).
  """
  del rng  # deterministic
  num, d = shape[0] - 1, shape[1]
  side = round(num ** 0.5)  # the patch grid is square (square images and patches)
  omega = 1.0 / 10000 ** (np.arange(d // 4) / (d // 4))
  y, x = np.mgrid[:side, :side]
  angles = [np.outer(c.ravel(), omega) for c in (x, y)]
  codes = np.concatenate([f(a) for a in angles for f in (np.sin, np.cos)], axis=1)
  codes = np.pad(codes, ((1, 0), (0, d - codes.shape[1])))  # class row, and columns beyond 4 * (d // 4)
  return jnp.asarray(codes, dtype)


def _layer_params_from_hf(get: TensorSource, cfg: VisionConfig) -> dict:
  d, f = cfg.hidden_size, cfg.intermediate_size
  return {
      'layer_norm1': layer_norm(get, 'layer_norm1', d),
      'self_attn': {'qkv': linear(get, 'self_attn.qkv', d, 3 * d, bias=cfg.qkv_bias),
                    'projection': linear(get, 'self_attn.projection', d, d)},
      'layer_norm2': layer_norm(get, 'layer_norm2', d),
      'fc1': linear(get, 'mlp.fc1', d, f),
      'fc2': linear(get, 'mlp.fc2', f, d),
  }


def vision_params_from_hf(get: TensorSource, config: VisionConfig) -> dict:
  """HF ``Blip2VisionModel`` tensors (``get`` scoped to ``vision_model.``) -> `VisionModel` params.

  Raises:
    WeightsError: a tensor is missing or has a shape the config does not expect (names the HF key).
  """
  cfg = config
  d, p = cfg.hidden_size, cfg.patch_size
  conv = get('embeddings.patch_embedding.weight', (d, 3, p, p))
  return {
      # torch Conv2d [out, in, kh, kw] -> flax Conv [kh, kw, in, out].
      'patch_embedding': {'kernel': np.transpose(conv, (2, 3, 1, 0)),
                          'bias': get('embeddings.patch_embedding.bias', (d,))},
      'class_embedding': get('embeddings.class_embedding', (1, 1, d)).reshape(d),
      'position_embedding': get('embeddings.position_embedding',
                                (1, 1 + cfg.num_patches, d)).reshape(1 + cfg.num_patches, d),
      'layers': stack_layers([_layer_params_from_hf(get.child(f'encoder.layers.{i}.'), cfg)
                              for i in range(cfg.num_hidden_layers)]),
      'post_layernorm': layer_norm(get, 'post_layernorm', d),
  }
