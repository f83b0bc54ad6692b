"""The greedy decoder (`EarlyExitDecoder` without exits, the one greedy decoder) against transformers' BLIP-2
`generate`, from the model's own `decoder_inputs`."""

import numpy as np
import pytest
import torch

import free_jax
from free_jax.inference.early_exit import EarlyExitDecoder
from tests.hf_fixtures import blip2_inputs, tiny_blip2, torch_inputs

NEW_TOKENS = 10


@pytest.fixture(scope='module', params=['opt', 't5'])
def backbone(request, tmp_path_factory):
  hf = tiny_blip2(request.param, seed=1)
  path = tmp_path_factory.mktemp(request.param)
  hf.save_pretrained(path)
  model, params = free_jax.load_pretrained(path)
  text = model.config.text
  batch = blip2_inputs(3, (3, 6, 2), seed=1, pad_token_id=text.pad_token_id,
                       bos_token_id=None if model.config.is_encoder_decoder else text.bos_token_id)
  return hf, model, params, batch


def _hf_generate(hf, model, batch, **kwargs):
  with torch.no_grad():
    out = hf.generate(**torch_inputs(batch), max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1,
                      pad_token_id=model.config.text.pad_token_id, **kwargs).numpy()
  # Decoder-only output repeats the prompt; T5's starts with the decoder start token.
  return out[:, 1:] if model.config.is_encoder_decoder else out[:, batch['input_ids'].shape[1]:]


def generate(model, params, pixel_values, input_ids, attention_mask, max_new_tokens, eos_token_id=None):
  prompt, valid, encoder = model.apply({'params': params}, pixel_values, input_ids, attention_mask,
                                       method='decoder_inputs')
  decoder = EarlyExitDecoder(model.lm_stack(), (), max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                             pad_token_id=model.config.text.pad_token_id or 0)
  return np.asarray(decoder(params['language_model'], None, prompt, np.asarray(valid), encoder=encoder).tokens)


def test_greedy_matches_transformers(backbone):
  hf, model, params, batch = backbone
  want = _hf_generate(hf, model, batch, min_new_tokens=NEW_TOKENS)
  got = generate(model, params, batch['pixel_values'], batch['input_ids'], batch['attention_mask'],
                 NEW_TOKENS)
  assert got.shape == (3, NEW_TOKENS)
  np.testing.assert_array_equal(got, want)


def test_eos_stops_each_row_and_pads_like_transformers(backbone):
  hf, model, params, batch = backbone
  free_run = _hf_generate(hf, model, batch, min_new_tokens=NEW_TOKENS)
  eos = int(free_run[0, 2])  # a token row 0 emits early, so at least one row stops early
  want = _hf_generate(hf, model, batch, eos_token_id=eos)
  got = np.asarray(generate(model, params, batch['pixel_values'], batch['input_ids'],
                            batch['attention_mask'], NEW_TOKENS, eos_token_id=eos))
  # HF stops once all rows are done; our output keeps the fixed width, padded.
  np.testing.assert_array_equal(got[:, :want.shape[1]], want)
  np.testing.assert_array_equal(got[:, want.shape[1]:], model.config.text.pad_token_id)
  assert got[0, 3:].tolist() == [model.config.text.pad_token_id] * (NEW_TOKENS - 3)
