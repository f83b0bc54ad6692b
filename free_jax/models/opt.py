"""OPT decoder (the BLIP-2 OPT language model) as an `lm_api.DecoderStack`.

Numerically equal to transformers 5 ``OPTForCausalLM``: learned positions with OPT's offset of 2
computed from the attention mask, pre- or post-LN layers (``do_layer_norm_before``), the
``project_in``/``project_out`` pair when ``word_embed_proj_dim != hidden_size``, and the LM head
tied to the token embeddings (or a separate ``lm_head``).

LM parameter tree (``lm_params``; E = word_embed_proj_dim, D = hidden_size, L layers)::

  embed_tokens:     {embedding: [V, E]}
  embed_positions:  {embedding: [max_position_embeddings + 2, D]}
  project_in:       {kernel: [E, D]}          only when E != D
  project_out:      {kernel: [D, E]}          only when E != D
  final_layer_norm: {scale, bias: [D]}        only for pre-LN models
  lm_head:          {kernel: [E, V]}          only when the head is untied
  layers:           `OPTLayer` params, every leaf with a leading axis L
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from free_jax.models import lm_api
from free_jax.models.lm_api import PyTree
from free_jax.models.hf_tensors import TensorSource, layer_norm, linear, stack_layers
from free_jax.models.layers import Mlp, SelfAttention, run_stack, write_layers_kv
from free_jax.models.vit import hf_activation


_POSITION_OFFSET = 2  # OPT's learned position table starts at index 2 (a fairseq legacy).
_LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which OPT uses.


@dataclasses.dataclass(frozen=True)
class OPTConfig:
  """The fields of HF ``OPTConfig`` that the forward pass uses."""

  vocab_size: int = 50272
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  ffn_dim: int = 3072
  max_position_embeddings: int = 2048
  word_embed_proj_dim: int = 768
  do_layer_norm_before: bool = True
  remove_final_layer_norm: bool = False
  activation_function: str = 'relu'
  enable_bias: bool = True
  layer_norm_elementwise_affine: bool = True
  tie_word_embeddings: bool = True
  pad_token_id: int | None = 1
  bos_token_id: int | None = 2
  eos_token_id: int | None = 2

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f'hidden_size={self.hidden_size} is not divisible by '
                       f'num_attention_heads={self.num_attention_heads}')
    hf_activation(self.activation_function)

  @classmethod
  def from_hf(cls, hf_config) -> 'OPTConfig':
    """From a transformers ``OPTConfig`` (or anything with the same attributes)."""
    eos = hf_config.eos_token_id
    if isinstance(eos, (list, tuple)):
      if len(eos) != 1:
        raise ValueError(f'eos_token_id={eos!r}: only a single EOS token is supported')
      eos = eos[0]
    return cls(vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
               num_hidden_layers=hf_config.num_hidden_layers,
               num_attention_heads=hf_config.num_attention_heads, ffn_dim=hf_config.ffn_dim,
               max_position_embeddings=hf_config.max_position_embeddings,
               word_embed_proj_dim=hf_config.word_embed_proj_dim or hf_config.hidden_size,
               do_layer_norm_before=hf_config.do_layer_norm_before,
               remove_final_layer_norm=getattr(hf_config, '_remove_final_layer_norm', False),
               activation_function=hf_config.activation_function,
               enable_bias=hf_config.enable_bias,
               layer_norm_elementwise_affine=hf_config.layer_norm_elementwise_affine,
               tie_word_embeddings=hf_config.tie_word_embeddings,
               pad_token_id=hf_config.pad_token_id, bos_token_id=hf_config.bos_token_id,
               eos_token_id=eos)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def has_projections(self) -> bool:
    return self.word_embed_proj_dim != self.hidden_size

  @property
  def has_final_layer_norm(self) -> bool:
    return self.do_layer_norm_before and not self.remove_final_layer_norm


def _layer_norm(config: OPTConfig, dtype, **kwargs) -> nn.LayerNorm:
  affine = config.layer_norm_elementwise_affine
  return nn.LayerNorm(epsilon=_LAYER_NORM_EPS, use_bias=affine, use_scale=affine, dtype=dtype,
                      param_dtype=dtype, use_fast_variance=False, **kwargs)


class OPTLayer(nn.Module):
  """One OPT decoder layer (``OPTDecoderLayer``) reading and writing its KV-cache layer."""

  config: OPTConfig
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    self.self_attn_layer_norm = _layer_norm(cfg, self.dtype)
    self.self_attn = SelfAttention(cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim,
                                   use_bias=cfg.enable_bias, dtype=self.dtype)
    self.final_layer_norm = _layer_norm(cfg, self.dtype)
    self.mlp = Mlp(cfg.ffn_dim, cfg.activation_function, cfg.enable_bias, self.dtype)

  def __call__(self, h: jax.Array, k_cache: jax.Array, v_cache: jax.Array, mask: jax.Array,
               index: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """float[B, T, D] -> (float[B, T, D], k_cache, v_cache float[B * H, S, Dh] with the step's K/V written);
    see `SelfAttention`."""
    pre = self.config.do_layer_norm_before
    x = self.self_attn_layer_norm(h) if pre else h
    y, k_cache, v_cache = self.self_attn(x, k_cache, v_cache, mask, index)
    h = h + y
    if not pre:
      h = self.self_attn_layer_norm(h)
    h = h + self.mlp(self.final_layer_norm(h) if pre else h)
    if not pre:
      h = self.final_layer_norm(h)
    return h, k_cache, v_cache

  def kv(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """K/V this layer would compute if h float[B, T, D] were its input (state propagation)."""
    return self.self_attn.project_kv(self.self_attn_layer_norm(h) if self.config.do_layer_norm_before
                                     else h)


@dataclasses.dataclass(frozen=True)
class OPTStack:
  """`lm_api.DecoderStack` for OPT. Hashable, so it can be a static argument of `jax.jit`.

  ``ctx`` (from `make_context`) is ``{'mask': bool[B, T, S]}``.
  """

  config: OPTConfig
  dtype: Any = jnp.float32

  @property
  def num_layers(self) -> int:
    return self.config.num_hidden_layers

  @property
  def hidden_size(self) -> int:
    return self.config.hidden_size

  @property
  def num_heads(self) -> int:
    return self.config.num_attention_heads

  @property
  def head_dim(self) -> int:
    return self.config.head_dim

  @property
  def vocab_size(self) -> int:
    return self.config.vocab_size

  @property
  def max_positions(self) -> int:
    return self.config.max_position_embeddings

  @property
  def _layer(self) -> OPTLayer:
    # parent=None: an unattached module, applied to explicit params even when this stack is used
    # inside another module's method (e.g. `Blip2Model.__call__`).
    return OPTLayer(self.config, self.dtype, parent=None)

  def init(self, rng: jax.Array) -> PyTree:
    """Randomly initialised ``lm_params`` (the tree in the module docstring); `jax.eval_shape`-able."""
    cfg, dt = self.config, self.dtype
    d, e = cfg.hidden_size, cfg.word_embed_proj_dim
    rngs = jax.random.split(rng, 5)
    normal = nn.initializers.normal(0.02)

    def init_layer(r):
      h = jnp.zeros((1, 1, d), dt)
      kv = jnp.zeros((self.num_heads, 1, self.head_dim), dt)
      return self._layer.init(r, h, kv, kv, jnp.ones((1, 1, 1), bool), 0)['params']

    params = {
        'embed_tokens': {'embedding': normal(rngs[0], (cfg.vocab_size, e), dt)},
        'embed_positions': {'embedding': normal(
            rngs[1], (cfg.max_position_embeddings + _POSITION_OFFSET, d), dt)},
        'layers': jax.vmap(init_layer)(jax.random.split(rngs[2], cfg.num_hidden_layers)),
    }
    if cfg.has_projections:
      params['project_in'] = {'kernel': normal(rngs[3], (e, d), dt)}
      params['project_out'] = {'kernel': normal(rngs[4], (d, e), dt)}
    if cfg.has_final_layer_norm and cfg.layer_norm_elementwise_affine:
      params['final_layer_norm'] = {'scale': jnp.ones((d,), dt), 'bias': jnp.zeros((d,), dt)}
    if not cfg.tie_word_embeddings:
      params['lm_head'] = {'kernel': normal(rngs[3], (e, cfg.vocab_size), dt)}
    return params

  def init_cache(self, batch: int, max_length: int, per_layer: bool = False) -> lm_api.KVCache:
    return lm_api.KVCache.zeros(self.num_layers, batch, max_length, self.num_heads, self.head_dim,
                                self.dtype, per_layer)

  def embed_tokens(self, lm_params: PyTree, input_ids: jax.Array) -> jax.Array:
    """float[B, T, E] word embeddings of int[B, T] ids (before ``project_in`` and positions)."""
    return lm_params['embed_tokens']['embedding'][input_ids].astype(self.dtype)

  def embed(self, lm_params: PyTree, input_ids: jax.Array | None = None,
            inputs_embeds: jax.Array | None = None, positions: jax.Array | None = None) -> jax.Array:
    """float[B, T, D]: ``project_in``(word embeddings) + position embeddings.

    `positions` int[B, T] (``lm_api.token_positions``) default to 0..T-1 (an unpadded prompt).
    """
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError('pass exactly one of input_ids and inputs_embeds')
    x = self.embed_tokens(lm_params, input_ids) if inputs_embeds is None else inputs_embeds
    chex.assert_axis_dimension(x, 2, self.config.word_embed_proj_dim)
    x = x.astype(self.dtype)
    if self.config.has_projections:
      x = x @ lm_params['project_in']['kernel'].astype(self.dtype)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    table = lm_params['embed_positions']['embedding']
    return x + table[positions + _POSITION_OFFSET].astype(self.dtype)

  def make_context(self, lm_params: PyTree, cache: lm_api.KVCache, positions: jax.Array,
                   encoder: Any = None) -> PyTree:
    del lm_params, encoder  # OPT positions enter through `embed`; there is no encoder.
    return {'mask': lm_api.attention_mask(cache, positions.shape[1])}

  def _run(self, layers_params: PyTree, h: jax.Array, cache: lm_api.KVCache, ctx: PyTree,
           first_layer: int) -> tuple[jax.Array, jax.Array, lm_api.KVCache]:
    chex.assert_rank(h, 3)
    chex.assert_axis_dimension(h, 2, self.hidden_size)
    layer = self._layer

    def apply_layer(xs, h, k_cache, v_cache):
      return layer.apply({'params': xs[0]}, h, k_cache, v_cache, ctx['mask'], cache.index)

    return run_stack(apply_layer, (layers_params,), h, cache, first_layer)

  def apply_layers(self, layers_params: PyTree, h: jax.Array, cache: lm_api.KVCache, ctx: PyTree,
                   cross_kv: None = None) -> tuple[jax.Array, jax.Array, lm_api.KVCache]:
    if cross_kv is not None:
      raise ValueError('OPT layers have no cross-attention: cross_kv must be None')
    return self._run(layers_params, h, cache, ctx, 0)

  def layer_constants(self, layers_params: PyTree, encoder: Any) -> None:
    """Nothing: OPT layers need no per-encoder-output inputs (T5: cross-attention K/V)."""
    del layers_params, encoder

  def run_layers(self, lm_params: PyTree, h: jax.Array, cache: lm_api.KVCache, ctx: PyTree,
                 start: int, end: int) -> tuple[jax.Array, jax.Array, lm_api.KVCache]:
    return self._run(lm_api.layer_range(lm_params['layers'], start, end), h, cache, ctx, start)

  def propagate_kv(self, lm_params: PyTree, h: jax.Array, cache: lm_api.KVCache, ctx: PyTree,
                   start: int, end: int) -> lm_api.KVCache:
    del ctx
    kv = lambda p: self._layer.apply({'params': p}, h, method=OPTLayer.kv)
    k, v = lm_api.map_layers(kv, lm_params['layers'], start, end)
    return write_layers_kv(cache, k, v, start)

  def final_features(self, lm_params: PyTree, h: jax.Array) -> jax.Array:
    """float[B, T, E]: ``final_layer_norm`` (pre-LN models) then ``project_out`` (if any)."""
    if self.config.has_final_layer_norm:
      norm_params = lm_params.get('final_layer_norm', {})  # absent without elementwise affine
      h = _layer_norm(self.config, self.dtype, parent=None).apply({'params': norm_params}, h)
    if self.config.has_projections:
      h = h @ lm_params['project_out']['kernel'].astype(self.dtype)
    return h

  def logits(self, lm_params: PyTree, features: jax.Array) -> jax.Array:
    """float32[B, T, V] from float[B, T, E] features (float32 so bfloat16 models argmax stably)."""
    # The tied head contracts the embedding table [V, E] as it is: its transpose would be copied at every call.
    weight, spec = ((lm_params['embed_tokens']['embedding'], 'bte,ve->btv') if self.config.tie_word_embeddings
                    else (lm_params['lm_head']['kernel'], 'bte,ev->btv'))
    return jnp.einsum(spec, features, weight.astype(features.dtype), preferred_element_type=jnp.float32)


def _layer_params_from_hf(get: TensorSource, cfg: OPTConfig) -> dict:
  d, f, bias = cfg.hidden_size, cfg.ffn_dim, cfg.enable_bias
  params = {
      'self_attn': {name: linear(get, f'self_attn.{name}', d, d, bias)
                    for name in ('q_proj', 'k_proj', 'v_proj', 'out_proj')},
      'mlp': {'fc1': linear(get, 'fc1', d, f, bias), 'fc2': linear(get, 'fc2', f, d, bias)},
  }
  for name in ('self_attn_layer_norm', 'final_layer_norm'):
    if cfg.layer_norm_elementwise_affine:
      params[name] = layer_norm(get, name, d)
  return params


def opt_params_from_hf(get: TensorSource, config: OPTConfig) -> dict:
  """HF ``OPTForCausalLM`` tensors -> ``lm_params``.

  Args:
    get: scoped to the causal-LM prefix (``language_model.`` in BLIP-2), so it holds
      ``model.decoder.*`` and, when untied, ``lm_head.weight``. A tied ``lm_head.weight`` may be
      present (it is then the embedding itself) or absent (``save_pretrained`` drops it).
    config: the OPT config.

  Raises:
    WeightsError: a tensor is missing or has a shape the config does not expect (names the HF key).
  """
  cfg = config
  d, e, v = cfg.hidden_size, cfg.word_embed_proj_dim, cfg.vocab_size
  dec = get.child('model.decoder.')
  params = {
      'embed_tokens': {'embedding': dec('embed_tokens.weight', (v, e))},
      'embed_positions': {'embedding': dec(
          'embed_positions.weight', (cfg.max_position_embeddings + _POSITION_OFFSET, d))},
      'layers': stack_layers([_layer_params_from_hf(dec.child(f'layers.{i}.'), cfg)
                              for i in range(cfg.num_hidden_layers)]),
  }
  if cfg.has_projections:
    params['project_in'] = {'kernel': dec('project_in.weight', (d, e)).T}
    params['project_out'] = {'kernel': dec('project_out.weight', (e, d)).T}
  if cfg.has_final_layer_norm and cfg.layer_norm_elementwise_affine:
    params['final_layer_norm'] = layer_norm(dec, 'final_layer_norm', d)
  if not cfg.tie_word_embeddings:
    params['lm_head'] = {'kernel': get('lm_head.weight', (v, e)).T}
  elif get.has('lm_head.weight'):
    get('lm_head.weight', (v, e))  # a tied copy: checked and marked as used, the embedding wins
  return params
