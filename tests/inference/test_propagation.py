"""Tests for free_jax.inference.propagation through the decoder: deferred computation of skipped layers.

Under 'recompute' every input a step reads is exact, so whatever the depth schedule, each token is the
teacher-forced argmax of the exit (or final layer) its step stopped at, on the generated prefix, and after
a full-depth step the backbone's KV cache is the full model's.
"""

import functools

import jax
import numpy as np
import pytest

from free_jax.inference.early_exit import EarlyExitDecoder
from free_jax.models import lm_api
from tests.inference.test_early_exit import EXITS, N, _on_generated, _setup

E = len(EXITS)
# Depth schedules (step 0 is the prefill): shallow runs then deep steps, so deep segments catch up
# prompts and several decode slots at once; all end at full depth, so the whole cache is comparable.
SCHEDULES = [[0, 0, 2, 1, 0, 2], [1, 0, 0, 0, 0, 2], [0, 2, 0, 1, 0, 2], [2, 1, 1, 0, 1, 2]]


@functools.partial(jax.jit, static_argnums=0)
def _full_model_cache(stack, lm_params, ids, valid, encoder):
  cache = stack.init_cache(*ids.shape)
  h, cache, ctx = lm_api.begin_step(stack, lm_params, cache, valid, input_ids=ids, encoder=encoder)
  return stack.run_layers(lm_params, h, cache, ctx, 0, stack.num_layers)[2]


def _decoder(stack, **kwargs):
  return EarlyExitDecoder(stack, EXITS, max_new_tokens=N, eos_token_id=None, **kwargs)


@pytest.mark.parametrize('family', ['opt', 't5'])
@pytest.mark.parametrize('prefill', ['early_exit', 'full'])
@pytest.mark.parametrize('window', [1, 3, 8])
def test_recompute_is_exact_for_any_depth_schedule(family, prefill, window):
  stack, lm_params, exit_params, prompt, valid, encoder, _ = _setup(family)
  decoder = _decoder(stack, prefill=prefill, catch_up_window=window)
  for schedule in SCHEDULES:
    out, cache = decoder.decode_with_cache(lm_params, exit_params, prompt, valid, encoder=encoder,
                                           depth_schedule=schedule)
    tokens, depth = np.asarray(out.tokens), np.asarray(out.step_depth)
    expected_depth = np.asarray(schedule)
    if prefill == 'full':
      expected_depth[0] = E
    np.testing.assert_array_equal(depth, expected_depth)
    exit_logits, final = _on_generated(stack, lm_params, exit_params, prompt, valid, encoder, tokens)
    per_depth = np.concatenate([exit_logits, final[None]]).argmax(-1)  # [E + 1, B, N]
    np.testing.assert_array_equal(tokens, per_depth[depth, :, np.arange(N)].T)
    # The last step ran every layer on every slot it had skipped: the cache is the full model's.
    length = valid.shape[1] + N - 1
    ids = np.concatenate([prompt, tokens[:, :-1]], 1)
    mask = np.concatenate([valid, np.ones((len(tokens), N - 1), bool)], 1)
    full = _full_model_cache(stack, lm_params, ids, mask, encoder)
    slots = lambda x: np.swapaxes(np.asarray(x).reshape(len(mask), -1, *x.shape[1:]), 1, 2)  # [B, S, H, Dh]
    for layer in range(stack.num_layers):
      for got, want in ((cache.k[layer], full.k[layer]), (cache.v[layer], full.v[layer])):
        np.testing.assert_allclose(slots(got)[:, :length][mask], slots(want)[mask], atol=2e-5, rtol=2e-5)


def test_calm_projects_skipped_layers_and_keeps_the_first_exit_exact():
  stack, lm_params, exit_params, prompt, valid, encoder, _ = _setup('opt')
  calm, exact = _decoder(stack, propagation='calm'), _decoder(stack)
  schedule = SCHEDULES[0]
  out = calm(lm_params, exit_params, prompt, valid, depth_schedule=schedule)
  tokens = np.asarray(out.tokens)
  exit_logits, _ = _on_generated(stack, lm_params, exit_params, prompt, valid, encoder, tokens)
  at_first = np.asarray(schedule) == 0
  np.testing.assert_array_equal(tokens[:, at_first], exit_logits[0].argmax(-1)[:, at_first])
  # Never exiting reads no projected K/V: both modes are the full model.
  np.testing.assert_array_equal(calm(lm_params, exit_params, prompt, valid).tokens,
                                exact(lm_params, exit_params, prompt, valid).tokens)


@pytest.mark.parametrize('prefill, window, expected', [
    # Schedule [0, 0, 2, 1, 2, 0] over segments 0, 1, 2 (exits after layers 1 and 2 of 4); slot P is step 1's.
    # early_exit prefill: step 2 catches up the prompt (one pass) and slot P with its own token (one
    # window) in segments 1 and 2; step 4 catches up slot P+2 with its token in segment 2.
    ('early_exit', 8, [6, 4, 3]),
    # window 1: step 2 needs two windows (slots P and P+1) in segments 1 and 2, step 4 two in segment 2.
    ('early_exit', 1, [6, 5, 5]),
    # full prefill: the prefill ran every segment, so no prompt passes later.
    ('full', 8, [6, 4, 3]),
])
def test_segment_passes_are_counted(prefill, window, expected):
  stack, lm_params, exit_params, prompt, valid, _, _ = _setup('opt')
  decoder = _decoder(stack, prefill=prefill, catch_up_window=window)
  out = decoder(lm_params, exit_params, prompt, valid, depth_schedule=[0, 0, 2, 1, 2, 0])
  np.testing.assert_array_equal(out.segment_passes, expected)


def test_bad_depth_schedule_is_refused():
  stack, lm_params, exit_params, prompt, valid, _, _ = _setup('opt')
  with pytest.raises(ValueError, match=r'depth_schedule must be int\[6\] in \[-1, 2\]'):
    _decoder(stack)(lm_params, exit_params, prompt, valid, depth_schedule=[0, 3, 0, 0, 0, 0])
  with pytest.raises(ValueError, match='catch_up_window=0'):
    _decoder(stack, catch_up_window=0)
