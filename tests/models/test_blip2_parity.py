"""free_jax BLIP-2 (loaded with `load_pretrained`) against transformers' PyTorch BLIP-2.

Parity: logits and every LM hidden state (T5: also the encoder's) within 1e-4 in float32 on
non-padded positions. bfloat16: logits within 3% of the float32 logits' range (the documented
tolerance; measured ~1%), same argmax.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import free_jax
from free_jax.models.blip2 import Blip2Config
from tests.hf_fixtures import blip2_inputs, tiny_blip2, tiny_blip2_config, torch_inputs

# name -> (text, Q-Former overrides, text-config overrides)
VARIANTS = {
    'opt_2_layers': ('opt', {}, {}),
    'opt_4_layers_2_heads_post_ln': ('opt', {'cross_attention_frequency': 2},
                                     dict(num_hidden_layers=4, num_attention_heads=2,
                                          do_layer_norm_before=False)),
    't5_gated_gelu_untied': ('t5', {}, {}),
    't5_relu_tied_3_encoder_layers': ('t5', {'cross_attention_frequency': 2},
                                      dict(feed_forward_proj='relu', tie_word_embeddings=True,
                                           num_layers=3)),
}
BF16_TOLERANCE = 0.03  # max |logits_bf16 - logits_f32| / max |logits_f32|


def _inputs(model):
  """Left-padded prompts; for T5 also right-padded decoder inputs."""
  text = model.config.text
  is_t5 = model.config.is_encoder_decoder
  batch = blip2_inputs(3, (3, 5, 2), pad_token_id=text.pad_token_id,
                       bos_token_id=None if is_t5 else text.bos_token_id)
  if is_t5:
    batch['decoder_input_ids'] = np.array([[0, 5, 6, 7], [0, 8, 9, 0], [0, 11, 12, 13]], np.int32)
    batch['decoder_attention_mask'] = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]], np.int32)
  return batch


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, batch):
  return model.apply({'params': params}, **batch)


@pytest.fixture(scope='module', params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
  text, qformer, overrides = VARIANTS[request.param]
  hf = tiny_blip2(text, qformer=qformer, **overrides)
  path = tmp_path_factory.mktemp(request.param)
  hf.save_pretrained(path)
  return request.param, hf, path


def test_matches_transformers(variant):
  name, hf, path = variant
  model, params = free_jax.load_pretrained(path)
  batch = _inputs(model)
  with torch.no_grad():
    want = hf(**torch_inputs(batch), output_hidden_states=True)
  got = _forward(model, params, batch)
  lm_out = want.language_model_outputs
  if model.config.is_encoder_decoder:
    valid = batch['decoder_attention_mask'].astype(bool)
    want_hiddens = lm_out.decoder_hidden_states
    enc_valid = batch['attention_mask'].astype(bool)
    assert len(got.encoder_hidden_states) == len(lm_out.encoder_hidden_states)
    enc_diff = max(np.abs(np.asarray(a) - b.numpy())[enc_valid].max()
                   for a, b in zip(got.encoder_hidden_states, lm_out.encoder_hidden_states))
    assert enc_diff < 1e-4
  else:
    valid = batch['attention_mask'].astype(bool)
    want_hiddens = lm_out.hidden_states
    assert got.encoder_hidden_states is None
  assert got.logits.shape == want.logits.shape
  assert len(got.lm_hidden_states) == len(want_hiddens) == model.lm_stack().num_layers + 1
  logit_diff = np.abs(np.asarray(got.logits) - want.logits.numpy())[valid].max()
  hidden_diff = [np.abs(np.asarray(a) - b.numpy())[valid].max()
                 for a, b in zip(got.lm_hidden_states, want_hiddens)]
  print(f'{name}: max |dlogits| {logit_diff:.2e}, max |dhidden| {max(hidden_diff):.2e}')
  assert logit_diff < 1e-4
  assert max(hidden_diff) < 1e-4, hidden_diff


@pytest.mark.parametrize('variant', ['opt_2_layers', 't5_gated_gelu_untied'], indirect=True)
def test_bfloat16_close_to_float32(variant):
  name, _, path = variant
  model32, params32 = free_jax.load_pretrained(path)
  model16, params16 = free_jax.load_pretrained(path, jnp.bfloat16)
  leaf_dtypes = {k: {x.dtype for x in jax.tree.leaves(v)} for k, v in params16.items()}
  assert leaf_dtypes['language_model'] == {jnp.dtype(jnp.bfloat16)}
  assert leaf_dtypes['qformer'] == {jnp.dtype(jnp.float32)}  # kept float32, as in HF
  batch = _inputs(model32)
  want = _forward(model32, params32, batch)
  got = _forward(model16, params16, batch)
  assert got.lm_hidden_states[1].dtype == jnp.bfloat16
  valid = (batch['decoder_attention_mask'] if model32.config.is_encoder_decoder
           else batch['attention_mask']).astype(bool)
  want_logits = np.asarray(want.logits)[valid]
  got_logits = np.asarray(got.logits, np.float32)[valid]
  relative = np.abs(got_logits - want_logits).max() / np.abs(want_logits).max()
  print(f'{name} bfloat16: max |dlogits| / max |logits| = {relative:.3f}')
  assert relative < BF16_TOLERANCE
  np.testing.assert_array_equal(got_logits.argmax(-1), want_logits.argmax(-1))


def test_rejects_opt_with_word_projections():
  # HF would scatter hidden_size-wide queries into word_embed_proj_dim-wide embeddings (garbage).
  with pytest.raises(ValueError, match='word_embed_proj_dim=16'):
    Blip2Config.from_hf(tiny_blip2_config('opt', word_embed_proj_dim=16))
