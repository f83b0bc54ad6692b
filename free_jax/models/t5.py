"""Flan-T5 / T5 encoder-decoder LM, numerically equal to transformers 5 ``T5ForConditionalGeneration``.

Contract
--------
``T5Config`` (frozen dataclass; ``T5Config.from_hf(hf_t5_config)``) and ``T5Stack(config, dtype)``, the
decoder as a `free_jax.models.lm_api.DecoderStack`, plus the encoder entry points. Everything is a pure
function of ``lm_params``::

  lm_params = {
    'shared':  {'embedding': float[V, D]},                 # token embedding of encoder and decoder
    'encoder': {'layers': <stacked T5EncoderLayer, leading axis L_enc>,
                'relative_attention_bias': {'embedding': float[num_buckets, H]},
                'final_norm': {'scale': float[D]}},
    'layers':  <stacked T5DecoderLayer, leading axis L>,  # lm_api convention: the decoder layers
    'decoder': {'relative_attention_bias': {'embedding': float[num_buckets, H]},
                'final_norm': {'scale': float[D]}},
    'lm_head': {'kernel': float[D, V]},                    # only when not config.tie_word_embeddings
  }

* ``t5_params_from_hf(get, config)``: ``get`` is a `TensorSource` scoped to the HF
  ``T5ForConditionalGeneration`` names (``language_model.`` inside BLIP-2): ``shared.weight``,
  ``encoder.block.{i}.layer.0.SelfAttention.q.weight``, ..., ``decoder.final_layer_norm.weight``,
  ``lm_head.weight`` when untied. ``stack.init(rng)`` builds the same tree at random.
* Encoder: ``stack.encoder_forward(lm_params, inputs_embeds, attention_mask)`` -> (last float[B, S, D],
  hidden_states float[L_enc + 1, B, S, D] in HF order: embeddings, each layer, the *last one after the
  final norm*). ``stack.encode(...)`` -> `T5Encoded` (last hidden state, mask and the cross-attention
  K/V of every decoder layer, computed once per encoder output). BLIP-2 passes the projected query
  tokens followed by ``stack.embed(lm_params, input_ids)`` as ``inputs_embeds``. Encoder relative
  positions are slot indices, exactly as in HF.
* Decoder step (the `DecoderStack` protocol): ``cache = stack.init_cache(B, S).mark_valid(valid)``;
  ``ctx = stack.make_context(lm_params, cache, positions, encoder=encoded)``;
  ``h = stack.embed(lm_params, decoder_input_ids)``; ``stack.run_layers(lm_params, h, cache, ctx, a, b)``;
  ``cache.advance(T)`` (`lm_api.begin_step` does the first three). ``positions`` int[B, T] are per-row
  positions (`lm_api.token_positions`: the number of valid tokens before each token in its row); the
  self-attention bias compares them with the same count over the cache's valid slots, so left
  padding, or an invalid slot mid-sequence, does not shift relative distances.
* Cross-attention K/V: ``ctx`` carries those of all L backbone layers; `run_layers` slices them. For
  any other layer stack (an exit transformer: one T5DecoderLayer with its own params),
  ``apply_layers(params, h, cache, ctx, cross_kv=None)`` computes them from the encoder output in
  ``ctx`` with those params; pass ``cross_kv=stack.cross_kv(params, encoded.hidden)``, computed once
  per encoder output, to avoid that work on every step.
* ``final_features`` = decoder final RMS norm (HF's last decoder hidden state); ``logits`` applies the
  head, including the ``d_model ** -0.5`` scaling of a tied head, and returns float32.
* ``stack.forward(lm_params, encoder_embeds, encoder_mask, decoder_input_ids, decoder_mask)`` ->
  `T5Output`, HF's ``logits``, ``decoder_hidden_states`` (L + 1, last after the final norm),
  ``encoder_last_hidden_state`` and ``encoder_hidden_states``.
* ``shift_right(labels, config)``: decoder inputs for teacher forcing, as HF ``_shift_right``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from free_jax.models.hf_tensors import TensorSource, WeightsError, layer_norm, linear, stack_layers
from free_jax.models.layers import run_stack, write_layers_kv
from free_jax.models.lm_api import KVCache, PyTree, attention_mask, begin_step, layer_range, map_layers
from free_jax.models.t5_layers import (T5Config, T5DecoderLayer, T5EncoderLayer, position_bias,
                                       t5_norm)

__all__ = ['T5Config', 'T5Encoded', 'T5Output', 'T5Stack', 'shift_right', 't5_params_from_hf']


@flax.struct.dataclass
class T5Encoded:
  """What the decoder needs from the encoder, computed once per input.

  Attributes:
    hidden: float[B, S, D] encoder output (after the final norm).
    mask: bool[B, S] valid encoder positions.
    cross_k: float[L, B * H, S, Dh] cross-attention keys of every backbone decoder layer, or (the
      decoding form, `unstacked`) a tuple of L float[B * H, S, Dh].
    cross_v: cross-attention values, same form.
  """

  hidden: jax.Array
  mask: jax.Array
  cross_k: jax.Array | tuple[jax.Array, ...]
  cross_v: jax.Array | tuple[jax.Array, ...]

  def unstacked(self) -> 'T5Encoded':
    """Per-layer cross K/V, read in place by a decode step (static slices of a stacked one copy)."""
    if isinstance(self.cross_k, tuple):
      return self
    return self.replace(cross_k=tuple(self.cross_k), cross_v=tuple(self.cross_v))


@flax.struct.dataclass
class T5Output:
  """HF ``Seq2SeqLMOutput`` fields (hidden-state tuples in HF order, last one after the final norm)."""

  logits: jax.Array
  decoder_hidden_states: tuple[jax.Array, ...]
  encoder_last_hidden_state: jax.Array
  encoder_hidden_states: tuple[jax.Array, ...]


def shift_right(labels: jax.Array, config: T5Config) -> jax.Array:
  """int[B, T] decoder inputs for `labels`: start token prepended, -100 (ignored) replaced by pad."""
  shifted = jnp.concatenate(
      [jnp.full_like(labels[:, :1], config.decoder_start_token_id), labels[:, :-1]], axis=1)
  return jnp.where(shifted == -100, config.pad_token_id, shifted)


def _check_range(start: int, end: int, num_layers: int) -> None:
  if not 0 <= start <= end <= num_layers:
    raise ValueError(f'layer range [{start}, {end}) is not within the {num_layers} decoder layers')


@dataclasses.dataclass(frozen=True)
class T5Stack:
  """The T5 decoder as an `lm_api.DecoderStack`, with the encoder entry points (see module docstring).

  Attributes:
    config: the model shape.
    dtype: dtype of activations, KV cache and `init` params (float32 or bfloat16).
  """

  config: T5Config
  dtype: Any = jnp.float32

  @property
  def num_layers(self) -> int:
    return self.config.num_decoder_layers

  @property
  def hidden_size(self) -> int:
    return self.config.d_model

  @property
  def num_heads(self) -> int:
    return self.config.num_heads

  @property
  def head_dim(self) -> int:
    return self.config.d_kv

  @property
  def vocab_size(self) -> int:
    return self.config.vocab_size

  @property
  def max_positions(self) -> None:
    return None  # relative position buckets: no limit

  @property
  def decoder_layer(self) -> T5DecoderLayer:
    """The linen module of one decoder (or exit) layer."""
    # parent=None: unattached, so the stack also works when called inside another module's apply.
    return T5DecoderLayer(self.config, self.dtype, parent=None)

  def init(self, rng: jax.Array) -> PyTree:
    """Random lm_params (HF's initialisation scales), the tree `t5_params_from_hf` returns."""
    c, d = self.config, self.dtype
    rngs = jax.random.split(rng, 6)
    h = jnp.zeros((1, 1, c.d_model), d)
    kv = jnp.zeros((c.num_heads, 1, c.d_kv), d)
    bias = jnp.zeros((1, c.num_heads, 1, 1), jnp.float32)
    mask = jnp.ones((1, 1, 1), bool)

    def full_layer(layer, h):  # Also reaches the cross K/V projections, which __call__ takes precomputed.
      return layer(h, kv, kv, 0, bias, mask, *layer.cross_key_value(h), mask[:, 0])

    init_dec = lambda r: self.decoder_layer.init(r, h, method=full_layer)['params']
    init_enc = lambda r: T5EncoderLayer(c, d, parent=None).init(r, h, bias, mask)['params']
    normal = lambda r, shape, std: (std * jax.random.normal(r, shape)).astype(d)
    stack_norm = lambda r: {
        'relative_attention_bias': {
            'embedding': normal(r, (c.relative_attention_num_buckets, c.num_heads), c.d_model ** -0.5)},
        'final_norm': {'scale': jnp.ones((c.d_model,), d)}}
    params = {
        'shared': {'embedding': normal(rngs[0], (c.vocab_size, c.d_model), 1.0)},
        'encoder': {'layers': jax.vmap(init_enc)(jax.random.split(rngs[1], c.num_layers)),
                    **stack_norm(rngs[2])},
        'layers': jax.vmap(init_dec)(jax.random.split(rngs[3], c.num_decoder_layers)),
        'decoder': stack_norm(rngs[4]),
    }
    if not c.tie_word_embeddings:
      # Unscaled head: 1/sqrt(D) keeps the initial logits O(1).
      params['lm_head'] = {'kernel': normal(rngs[5], (c.d_model, c.vocab_size), c.d_model ** -0.5)}
    return params

  def init_cache(self, batch: int, max_length: int, per_layer: bool = False) -> KVCache:
    return KVCache.zeros(self.num_layers, batch, max_length, self.num_heads, self.head_dim, self.dtype,
                         per_layer)

  def embed(self, lm_params: PyTree, input_ids: jax.Array | None = None,
            inputs_embeds: jax.Array | None = None, positions: jax.Array | None = None) -> jax.Array:
    """float[B, T, D] shared embedding of int[B, T] ids, or `inputs_embeds` as is (T5 has no position
    embeddings, so `positions` is unused)."""
    del positions
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError('embed needs exactly one of input_ids and inputs_embeds')
    if inputs_embeds is None:
      inputs_embeds = jnp.take(lm_params['shared']['embedding'], input_ids, axis=0)
    return inputs_embeds.astype(self.dtype)

  def _norm(self, params: PyTree, h: jax.Array) -> jax.Array:
    return t5_norm(self.config, self.dtype, parent=None).apply({'params': params}, h)

  def encoder_forward(self, lm_params: PyTree, inputs_embeds: jax.Array,
                      attention_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The T5 encoder (bidirectional; relative positions are slot indices, as in HF).

    Args:
      lm_params: the LM tree.
      inputs_embeds: float[B, S, D] encoder input (BLIP-2: query tokens then text embeddings).
      attention_mask: bool/int[B, S] valid positions.

    Returns:
      (last float[B, S, D] after the final norm, hidden_states float[L_enc + 1, B, S, D] in HF order).
    """
    chex.assert_rank(inputs_embeds, 3)
    chex.assert_shape(attention_mask, inputs_embeds.shape[:2])
    if inputs_embeds.shape[-1] != self.config.d_model:
      raise ValueError(f'inputs_embeds has shape {inputs_embeds.shape}, expected d_model='
                       f'{self.config.d_model} last')
    params = lm_params['encoder']
    h = inputs_embeds.astype(self.dtype)
    slots = jnp.arange(h.shape[1])[None]
    bias = position_bias(params['relative_attention_bias']['embedding'], slots, slots, True, self.config)
    mask = attention_mask.astype(bool)[:, None, :]
    layer = T5EncoderLayer(self.config, self.dtype, parent=None)

    def body(h, layer_params):
      h = layer.apply({'params': layer_params}, h, bias, mask)
      return h, h

    out, hiddens = jax.lax.scan(body, h, params['layers'])
    last = self._norm(params['final_norm'], out)
    return last, jnp.concatenate([h[None], hiddens[:-1], last[None]])

  def cross_kv(self, layers_params: PyTree, encoder_hidden: jax.Array) -> tuple[Any, Any]:
    """Cross-attention K/V of n decoder layers for float[B, S, D]: float[n, B * H, S, Dh] each from
    stacked params, tuples of n float[B * H, S, Dh] from a per-layer tuple."""
    kv = lambda p: self.decoder_layer.apply({'params': p}, encoder_hidden.astype(self.dtype),
                                            method=T5DecoderLayer.cross_key_value)
    if isinstance(layers_params, tuple):
      pairs = [kv(p) for p in layers_params]
      return tuple(k for k, _ in pairs), tuple(v for _, v in pairs)
    return jax.vmap(kv)(layers_params)

  def layer_constants(self, layers_params: PyTree, encoder: T5Encoded) -> tuple[Any, Any]:
    """What these layers need once per encoder output: their cross-attention K/V (`cross_kv`).

    Pass it as ``apply_layers(..., cross_kv=...)`` so an exit layer does not recompute it per step.
    """
    return self.cross_kv(layers_params, encoder.hidden)

  def encode(self, lm_params: PyTree, inputs_embeds: jax.Array, attention_mask: jax.Array) -> T5Encoded:
    """`encoder_forward` plus the backbone's cross-attention K/V: the decoder's `encoder` input."""
    return self.encode_with_hiddens(lm_params, inputs_embeds, attention_mask)[0]

  def encode_with_hiddens(self, lm_params: PyTree, inputs_embeds: jax.Array,
                          attention_mask: jax.Array) -> tuple[T5Encoded, tuple[jax.Array, ...]]:
    """`encode` and the encoder's hidden states (embeddings, then after each layer; HF order)."""
    last, hiddens = self.encoder_forward(lm_params, inputs_embeds, attention_mask)
    return T5Encoded(last, attention_mask.astype(bool), *self.cross_kv(lm_params['layers'], last)), tuple(hiddens)

  def make_context(self, lm_params: PyTree, cache: KVCache, positions: jax.Array,
                   encoder: T5Encoded | None = None) -> PyTree:
    """Per-step inputs of every decoder layer.

    Args:
      lm_params: the LM tree.
      cache: the cache this step writes to (slots [cache.index, cache.index + T)), already
        `mark_valid`-ed for the step (`lm_api.begin_step` does both).
      positions: int[B, T] per-row positions of the step's tokens (`lm_api.token_positions`).
      encoder: `T5Encoded` of this batch (required).

    Returns:
      {'bias': float32[B, H, T, S] self-attention relative position bias, 'encoder_hidden',
      'encoder_mask', 'cross_k', 'cross_v': the fields of `encoder`}.
    """
    if not isinstance(encoder, T5Encoded):
      raise ValueError(f'T5 make_context needs encoder=T5Encoded (from T5Stack.encode), got {type(encoder)}')
    chex.assert_rank(positions, 2)
    # Keys get the same per-row positions as queries (`lm_api.token_positions`), from the valid slots.
    key_positions = jnp.cumsum(cache.valid, axis=1, dtype=jnp.int32) - 1
    table = lm_params['decoder']['relative_attention_bias']['embedding']
    return {'bias': position_bias(table, positions, key_positions, False, self.config),
            'encoder_hidden': encoder.hidden, 'encoder_mask': encoder.mask,
            'cross_k': encoder.cross_k, 'cross_v': encoder.cross_v}

  def apply_layers(self, layers_params: PyTree, h: jax.Array, cache: KVCache, ctx: PyTree,
                   cross_kv: tuple[jax.Array, jax.Array] | None = None
                   ) -> tuple[jax.Array, jax.Array, KVCache]:
    """Runs n stacked decoder layers (see `lm_api.DecoderStack.apply_layers`).

    Args:
      layers_params: stacked layer params (leading axis n) or a per-layer tuple of n.
      h: float[B, T, D] input of the first layer.
      cache: n-layer cache, already `mark_valid`-ed for this step.
      ctx: from `make_context`.
      cross_kv: these layers' cross-attention K/V (`cross_kv`, `layer_constants`); computed from
        ctx['encoder_hidden'] with `layers_params` when None.

    Returns:
      (h_out float[B, T, D], hiddens float[n, B, T, D], cache with the T tokens' K/V written).
    """
    n = cache.num_layers
    if isinstance(layers_params, tuple):
      if len(layers_params) != n:
        raise ValueError(f'{len(layers_params)} per-layer params for a cache of {n} layers')
    else:
      for path, leaf in jax.tree_util.tree_leaves_with_path(layers_params):
        if leaf.ndim == 0 or leaf.shape[0] != n:
          raise ValueError(f'layers_params{jax.tree_util.keystr(path)} has shape {leaf.shape}, '
                           f'expected a leading layer axis of {n} (the cache has {n} layers)')
    chex.assert_shape(h, (cache.batch_size, None, self.config.d_model))
    if cross_kv is None:
      cross_kv = self.cross_kv(layers_params, ctx['encoder_hidden'])
    mask = attention_mask(cache, h.shape[1])
    layer = self.decoder_layer

    def apply_layer(xs, h, cache_k, cache_v):
      layer_params, cross_k, cross_v = xs
      return layer.apply({'params': layer_params}, h, cache_k, cache_v, cache.index, ctx['bias'], mask,
                         cross_k, cross_v, ctx['encoder_mask'])

    return run_stack(apply_layer, (layers_params, *cross_kv), h.astype(self.dtype), cache)

  def run_layers(self, lm_params: PyTree, h: jax.Array, cache: KVCache, ctx: PyTree, start: int,
                 end: int) -> tuple[jax.Array, jax.Array, KVCache]:
    """`apply_layers` on backbone layers [start, end), their cache slice and precomputed cross K/V."""
    _check_range(start, end, self.num_layers)
    cross = (ctx['cross_k'][start:end], ctx['cross_v'][start:end])
    h, hiddens, sub = self.apply_layers(layer_range(lm_params['layers'], start, end), h,
                                        cache.layers(start, end), ctx, cross_kv=cross)
    return h, hiddens, cache.with_layers(start, sub)

  def propagate_kv(self, lm_params: PyTree, h: jax.Array, cache: KVCache, ctx: PyTree, start: int,
                   end: int) -> KVCache:
    """Writes self-attention K/V of layers [start, end) computed from h float[B, T, D] (each layer's
    own self-attention norm and K/V projections), batched over the layers."""
    del ctx  # T5 keys carry no position information: the relative bias is added to the scores.
    _check_range(start, end, self.num_layers)
    kv = lambda p: self.decoder_layer.apply({'params': p}, h.astype(self.dtype),
                                            method=T5DecoderLayer.self_key_value)
    k, v = map_layers(kv, lm_params['layers'], start, end)
    return write_layers_kv(cache, k, v, start)

  def final_features(self, lm_params: PyTree, h: jax.Array) -> jax.Array:
    """Decoder final RMS norm: HF's last decoder hidden state (head scaling is in `logits`)."""
    return self._norm(lm_params['decoder']['final_norm'], h)

  def logits(self, lm_params: PyTree, features: jax.Array) -> jax.Array:
    """float32[B, T, V]; a tied head scales features by d_model**-0.5 first, as HF does."""
    if self.config.tie_word_embeddings:  # the table [V, D] contracted as it is (a transpose is copied per call)
      features = features * self.config.d_model ** -0.5
      weight, spec = lm_params['shared']['embedding'], 'btd,vd->btv'
    else:
      weight, spec = lm_params['lm_head']['kernel'], 'btd,dv->btv'
    return jnp.einsum(spec, features, weight.astype(features.dtype), preferred_element_type=jnp.float32)

  def forward(self, lm_params: PyTree, encoder_embeds: jax.Array, encoder_mask: jax.Array,
              decoder_input_ids: jax.Array | None = None, decoder_mask: jax.Array | None = None,
              decoder_inputs_embeds: jax.Array | None = None) -> T5Output:
    """Full forward (as HF ``T5ForConditionalGeneration(inputs_embeds=...)``): a decoder prefill into a
    fresh cache of length T. `decoder_mask` bool/int[B, T] defaults to all valid."""
    encoded, enc_hiddens = self.encode_with_hiddens(lm_params, encoder_embeds, encoder_mask)
    ids_or_embeds = decoder_input_ids if decoder_input_ids is not None else decoder_inputs_embeds
    batch, length = ids_or_embeds.shape[:2]
    valid = jnp.ones((batch, length), bool) if decoder_mask is None else decoder_mask.astype(bool)
    h, cache, ctx = begin_step(self, lm_params, self.init_cache(batch, length), valid, decoder_input_ids,
                               decoder_inputs_embeds, encoder=encoded)
    out, hiddens, _ = self.run_layers(lm_params, h, cache, ctx, 0, self.num_layers)
    features = self.final_features(lm_params, out)
    return T5Output(logits=self.logits(lm_params, features),
                    decoder_hidden_states=(h, *hiddens[:-1], features),
                    encoder_last_hidden_state=encoded.hidden, encoder_hidden_states=enc_hiddens)


def t5_params_from_hf(get: TensorSource, config: T5Config) -> PyTree:
  """HF ``T5ForConditionalGeneration`` tensors (numpy, HF layout) -> lm_params (numpy float)."""
  c = config
  d, inner = c.d_model, c.inner_dim

  def attention(prefix):
    qkv = {name: linear(get, f'{prefix}.{name}', d, inner, bias=False) for name in 'qkv'}
    return {**qkv, 'o': linear(get, f'{prefix}.o', inner, d, bias=False)}

  def mlp(prefix):
    wi = ('wi_0', 'wi_1') if c.is_gated else ('wi',)
    params = {name: linear(get, f'{prefix}.{name}', d, c.d_ff, bias=False) for name in wi}
    return {**params, 'wo': linear(get, f'{prefix}.wo', c.d_ff, d, bias=False)}

  def layer(stack, i):
    prefix = f'{stack}.block.{i}.layer'
    params = {'self_attn': attention(f'{prefix}.0.SelfAttention'),
              'self_attn_norm': layer_norm(get, f'{prefix}.0.layer_norm', d, bias=False)}
    ff = 1
    if stack == 'decoder':
      params['cross_attn'] = attention(f'{prefix}.1.EncDecAttention')
      params['cross_attn_norm'] = layer_norm(get, f'{prefix}.1.layer_norm', d, bias=False)
      ff = 2
    params['mlp'] = mlp(f'{prefix}.{ff}.DenseReluDense')
    params['mlp_norm'] = layer_norm(get, f'{prefix}.{ff}.layer_norm', d, bias=False)
    return params

  def stack_extras(stack):
    bias = get(f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight',
               (c.relative_attention_num_buckets, c.num_heads))
    return {'relative_attention_bias': {'embedding': bias},
            'final_norm': layer_norm(get, f'{stack}.final_layer_norm', d, bias=False)}

  shared = get('shared.weight', (c.vocab_size, d))
  params = {
      'shared': {'embedding': shared},
      'encoder': {'layers': stack_layers([layer('encoder', i) for i in range(c.num_layers)]),
                  **stack_extras('encoder')},
      'layers': stack_layers([layer('decoder', i) for i in range(c.num_decoder_layers)]),
      'decoder': stack_extras('decoder'),
  }
  if c.tie_word_embeddings:
    if get.has('lm_head.weight') and not np.array_equal(get('lm_head.weight', shared.shape), shared):
      raise WeightsError("tensor 'lm_head.weight' differs from 'shared.weight' but the config ties them")
  else:
    params['lm_head'] = {'kernel': get('lm_head.weight', (c.vocab_size, d)).T}
  # Copies HF checkpoints may carry: tied embeddings, and a cross-attention bias HF never uses.
  aliases = {'encoder.embed_tokens.weight': (c.vocab_size, d),
             'decoder.embed_tokens.weight': (c.vocab_size, d),
             'decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight':
                 (c.relative_attention_num_buckets, c.num_heads)}
  for name, shape in aliases.items():
    if get.has(name):
      get(name, shape)
  return params
