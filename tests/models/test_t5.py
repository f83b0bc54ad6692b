"""free_jax T5 against transformers' PyTorch T5ForConditionalGeneration (tiny random configs)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from free_jax.models import t5, t5_layers
from free_jax.models.hf_tensors import TensorSource, WeightsError
from free_jax.models.lm_api import begin_step, slice_layers

TOL = 1e-4
# Each config checks a different variant; the small bucket range of 'relu_tied' makes sequences of a
# few tokens reach T5's logarithmic buckets.
HF_CONFIGS = {
    'relu_tied': dict(num_layers=2, num_decoder_layers=3, feed_forward_proj='relu', tie_word_embeddings=True,
                      relative_attention_num_buckets=8, relative_attention_max_distance=12,
                      decoder_start_token_id=3),
    'gated_untied': dict(num_layers=3, num_decoder_layers=2, feed_forward_proj='gated-gelu',
                         tie_word_embeddings=False),
}
# Encoder rows: full, right-padded, left-padded. Decoder rows: full, left-padded, right-padded.
ENC_MASK = np.array([[1] * 8, [1] * 5 + [0] * 3, [0] * 2 + [1] * 6])
DEC_MASK = np.array([[1] * 6, [0] * 2 + [1] * 4, [1] * 5 + [0]])


@functools.cache
def _model(name):
  """(HF model, free_jax stack, lm_params, jitted forward) for a named tiny config."""
  torch.manual_seed(0)
  hf_config = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_heads=4,
                                    dropout_rate=0.0, **HF_CONFIGS[name])
  model = transformers.T5ForConditionalGeneration(hf_config).eval()
  if not hf_config.scale_decoder_outputs:
    # transformers 5 ties the head at init even for untied configs; give it its own weights.
    model.lm_head.weight = torch.nn.Parameter(torch.randn(100, 32))
  config = t5.T5Config.from_hf(hf_config)
  get = TensorSource({k: v.numpy() for k, v in model.state_dict().items()})
  params = t5.t5_params_from_hf(get, config)
  assert get.unused() == []
  stack = t5.T5Stack(config)
  return model, stack, params, jax.jit(stack.forward)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  embeds = rng.normal(size=(3, 8, 32)).astype(np.float32)
  ids = rng.integers(2, 100, size=(3, 6))
  return embeds, ids


def _hf_forward(model, embeds, ids, dec_mask=DEC_MASK):
  with torch.no_grad():
    return model(inputs_embeds=torch.tensor(embeds), attention_mask=torch.tensor(ENC_MASK),
                 decoder_input_ids=torch.tensor(ids), decoder_attention_mask=torch.tensor(dec_mask),
                 output_hidden_states=True)


def _max_diff(a, b, valid):
  """Largest |a - b| over the valid [B, T] positions."""
  return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))[np.asarray(valid, bool)].max())


@pytest.mark.parametrize('name', list(HF_CONFIGS))
def test_forward_matches_hf(name):
  model, stack, params, forward = _model(name)
  embeds, ids = _inputs()
  ref = _hf_forward(model, embeds, ids)
  out = forward(params, embeds, ENC_MASK, ids, DEC_MASK)

  assert len(out.encoder_hidden_states) == len(ref.encoder_hidden_states) == stack.config.num_layers + 1
  assert len(out.decoder_hidden_states) == len(ref.decoder_hidden_states) == stack.num_layers + 1
  diffs = {'encoder_last': _max_diff(out.encoder_last_hidden_state, ref.encoder_last_hidden_state, ENC_MASK),
           'logits': _max_diff(out.logits, ref.logits, DEC_MASK)}
  for i, (a, b) in enumerate(zip(out.encoder_hidden_states, ref.encoder_hidden_states)):
    diffs[f'encoder_hidden_{i}'] = _max_diff(a, b, ENC_MASK)
  for i, (a, b) in enumerate(zip(out.decoder_hidden_states, ref.decoder_hidden_states)):
    diffs[f'decoder_hidden_{i}'] = _max_diff(a, b, DEC_MASK)
  print(name, 'worst parity diff', max(diffs.items(), key=lambda kv: kv[1]))
  assert max(diffs.values()) < TOL, diffs


def test_relative_position_bucket_matches_hf():
  relative = np.arange(-300, 301)[None]
  for bidirectional in (True, False):
    for num_buckets, max_distance in ((32, 128), (8, 12)):
      ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
          torch.tensor(relative), bidirectional, num_buckets, max_distance).numpy()
      ours = t5_layers.relative_position_bucket(jnp.asarray(relative), bidirectional, num_buckets,
                                                   max_distance)
      np.testing.assert_array_equal(ours, ref)


def test_cached_decoding_equals_full_forward():
  """Prefill 3 tokens, then decode one at a time: every step's logits equal the full forward's."""
  _, stack, params, forward = _model('relu_tied')
  embeds, ids = _inputs()
  full = forward(params, embeds, ENC_MASK, ids, DEC_MASK).logits
  encoded = jax.jit(stack.encode)(params, embeds, ENC_MASK)

  @jax.jit
  def step(cache, token_ids, token_valid):
    h, cache, ctx = begin_step(stack, params, cache, token_valid, token_ids, encoder=encoded)
    h, _, cache = stack.run_layers(params, h, cache, ctx, 0, stack.num_layers)
    return stack.logits(params, stack.final_features(params, h)), cache.advance(token_ids.shape[1])

  cache = stack.init_cache(3, 6)
  logits, cache = step(cache, ids[:, :3], DEC_MASK[:, :3])
  steps = [logits]
  for t in range(3, 6):
    logits, cache = step(cache, ids[:, t:t + 1], DEC_MASK[:, t:t + 1])
    steps.append(logits)
  assert _max_diff(jnp.concatenate(steps, axis=1), full, DEC_MASK) < TOL


def test_invalid_slot_mid_sequence_does_not_shift_positions():
  """Per-row positions: a row with an invalid slot equals the same row with that token removed."""
  _, _, params, forward = _model('relu_tied')
  embeds, ids = _inputs()
  holed_mask = np.array([[1, 1, 0, 1, 1, 1]] * 3)
  holed = forward(params, embeds, ENC_MASK, ids, holed_mask).logits
  compact = forward(params, embeds, ENC_MASK, np.delete(ids, 2, axis=1)).logits
  np.testing.assert_allclose(np.delete(np.asarray(holed), 2, axis=1), compact, atol=TOL)
  # The bias really depends on distance, so dropping the token changes the later outputs.
  assert np.abs(np.asarray(holed)[:, 3:] - forward(params, embeds, ENC_MASK, ids).logits[:, 3:]).max() > 1e-3


def _prefill(stack, params, ids, valid):
  """Embedded decoder tokens, marked cache and context of a full-length step."""
  embeds, _ = _inputs()
  encoded = stack.encode(params, embeds, ENC_MASK)
  return begin_step(stack, params, stack.init_cache(*ids.shape), valid, ids, encoder=encoded)


def test_run_layers_split_equals_full_range():
  _, stack, params, _ = _model('relu_tied')
  _, ids = _inputs()

  @jax.jit
  def run(params):
    h, cache, ctx = _prefill(stack, params, ids, DEC_MASK)
    full = stack.run_layers(params, h, cache, ctx, 0, stack.num_layers)
    h_a, hiddens_a, cache = stack.run_layers(params, h, cache, ctx, 0, 1)
    h_b, hiddens_b, cache = stack.run_layers(params, h_a, cache, ctx, 1, stack.num_layers)
    return full, (h_b, jnp.concatenate([hiddens_a, hiddens_b]), cache)

  (h_full, hiddens_full, cache_full), (h_split, hiddens_split, cache_split) = run(params)
  np.testing.assert_allclose(h_split, h_full, atol=1e-6)
  np.testing.assert_allclose(hiddens_split, hiddens_full, atol=1e-6)
  np.testing.assert_allclose(cache_split.k, cache_full.k, atol=1e-6)
  np.testing.assert_allclose(cache_split.v, cache_full.v, atol=1e-6)
  assert jnp.all(jnp.abs(cache_full.k).max(axis=(1, 2, 3)) > 0)  # every layer wrote its K/V


def test_exit_layer_apply_layers_equals_backbone_layer():
  """apply_layers on a copy of layer 1 (as an exit) computes its cross K/V itself, or takes them."""
  _, stack, params, _ = _model('gated_untied')
  _, ids = _inputs()

  @jax.jit
  def run(params):
    h, cache, ctx = _prefill(stack, params, ids, DEC_MASK)
    h1, _, cache = stack.run_layers(params, h, cache, ctx, 0, 1)
    backbone = stack.run_layers(params, h1, cache, ctx, 1, 2)
    exit_params = slice_layers(params['layers'], 1, 2)
    exit_cache = stack.init_cache(*ids.shape).replace(valid=cache.valid).layers(0, 1)
    own = stack.apply_layers(exit_params, h1, exit_cache, ctx)
    cross = stack.cross_kv(exit_params, ctx['encoder_hidden'])
    given = stack.apply_layers(exit_params, h1, exit_cache, ctx, cross_kv=cross)
    return backbone, own, given

  (ref, _, ref_cache), (own, _, own_cache), (given, _, _) = run(params)
  np.testing.assert_allclose(own, ref, atol=1e-6)
  np.testing.assert_allclose(given, ref, atol=1e-6)
  np.testing.assert_allclose(own_cache.k[0], ref_cache.k[1], atol=1e-6)
  np.testing.assert_allclose(own_cache.v[0], ref_cache.v[1], atol=1e-6)


def test_propagate_kv_equals_hand_computed_kv():
  model, stack, params, _ = _model('gated_untied')
  c = stack.config
  rng = np.random.default_rng(1)
  h = rng.normal(size=(3, 2, 32)).astype(np.float32)
  cache = stack.init_cache(3, 6).replace(index=jnp.asarray(3, jnp.int32))
  cache = stack.propagate_kv(params, h, cache, None, 1, 2)
  attention = model.decoder.block[1].layer[0]
  with torch.no_grad():  # HF layer 1's own norm and projections, by hand.
    x = attention.layer_norm(torch.tensor(h))
    k = attention.SelfAttention.k(x).numpy().reshape(3, 2, c.num_heads, c.d_kv)
    v = attention.SelfAttention.v(x).numpy().reshape(3, 2, c.num_heads, c.d_kv)
  cache_layout = lambda x: x.transpose(0, 2, 1, 3).reshape(3 * c.num_heads, 2, c.d_kv)  # [B * H, T, Dh]
  np.testing.assert_allclose(cache.k[1, :, 3:5], cache_layout(k), atol=1e-5)
  np.testing.assert_allclose(cache.v[1, :, 3:5], cache_layout(v), atol=1e-5)
  # Only layer 1, slots [3, 5) were written.
  written = np.zeros(cache.k.shape, bool)
  written[1, :, 3:5] = True
  assert not np.any(np.asarray(cache.k)[~written]) and not np.any(np.asarray(cache.v)[~written])


def test_bfloat16_close_to_float32_reference():
  model, stack, params, _ = _model('gated_untied')
  embeds, ids = _inputs()
  ref = _hf_forward(model, embeds, ids)
  stack16 = t5.T5Stack(stack.config, jnp.bfloat16)
  params16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
  out = jax.jit(stack16.forward)(params16, embeds, ENC_MASK, ids, DEC_MASK)
  assert out.decoder_hidden_states[-1].dtype == jnp.bfloat16
  scale = float(np.abs(ref.logits.numpy()).max())
  rel = _max_diff(out.logits, ref.logits, DEC_MASK) / scale
  print('bfloat16 max |logit diff| / max |logit|', rel)
  assert rel < 0.05
  agree = np.mean(np.argmax(out.logits, -1)[DEC_MASK == 1] == ref.logits.numpy().argmax(-1)[DEC_MASK == 1])
  assert agree >= 0.9


def test_init_matches_converted_tree():
  """`init` builds the converter's tree (shapes, dtypes) and its params give a usable model."""
  shapes = lambda tree: jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype)), tree)
  for name in HF_CONFIGS:
    _, stack, params, _ = _model(name)
    assert shapes(jax.eval_shape(stack.init, jax.random.key(0))) == shapes(params)
    stack16 = t5.T5Stack(stack.config, jnp.bfloat16)
    params16 = jax.eval_shape(stack16.init, jax.random.key(0))
    assert {x.dtype for x in jax.tree.leaves(params16)} == {jnp.dtype(jnp.bfloat16)}
  random = jax.jit(stack.init)(jax.random.key(0))
  embeds, ids = _inputs()
  logits = _model(name)[3](random, embeds, ENC_MASK, ids, DEC_MASK).logits
  # HF-scale init: finite logits of order one, not saturated.
  assert np.isfinite(logits).all() and 0.1 < float(np.std(logits)) < 10


def test_shift_right_matches_hf():
  model, stack, _, _ = _model('relu_tied')
  labels = np.array([[5, 6, 7, 1], [8, 1, -100, -100]])
  ref = model._shift_right(torch.tensor(labels)).numpy()
  np.testing.assert_array_equal(t5.shift_right(jnp.asarray(labels), stack.config), ref)


def test_converter_errors_name_the_tensor():
  model, stack, _, _ = _model('gated_untied')
  tensors = {k: v.numpy() for k, v in model.state_dict().items()}
  key = 'decoder.block.1.layer.1.EncDecAttention.k.weight'
  missing = {f'language_model.{k}': v for k, v in tensors.items() if k != key}
  with pytest.raises(WeightsError, match=f"missing tensor 'language_model.{key}'"):
    t5.t5_params_from_hf(TensorSource(missing).child('language_model.'), stack.config)
  key = 'encoder.block.0.layer.1.DenseReluDense.wi_0.weight'
  with pytest.raises(WeightsError, match=rf"{key}' has shape \(32, 64\)"):
    t5.t5_params_from_hf(TensorSource({**tensors, key: tensors[key].T}), stack.config)
  without_head = {k: v for k, v in tensors.items() if k != 'lm_head.weight'}
  with pytest.raises(WeightsError, match='lm_head.weight'):
    t5.t5_params_from_hf(TensorSource(without_head), stack.config)


def test_bad_inputs_raise_clear_errors():
  _, stack, params, _ = _model('relu_tied')
  with pytest.raises(ValueError, match='feed_forward_proj'):
    t5.T5Config(feed_forward_proj='gated-nope')
  cache = stack.init_cache(3, 6)
  with pytest.raises(ValueError, match='encoder=T5Encoded'):
    stack.make_context(params, cache, jnp.zeros((3, 6), jnp.int32))
  with pytest.raises(ValueError, match='layer range'):
    stack.propagate_kv(params, jnp.zeros((3, 1, 32)), cache, None, 2, 5)
  with pytest.raises(ValueError, match=r"layers_params.*leading layer axis of 3"):
    stack.apply_layers(slice_layers(params['layers'], 0, 1), jnp.zeros((3, 1, 32)), cache, {})
