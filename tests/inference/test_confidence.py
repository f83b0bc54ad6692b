"""Tests for free_jax.inference.confidence."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from free_jax.inference import confidence

V = 7


def _random_logits(seed, shape=(3, 5, V), scale=3.0):
  return scale * jax.random.normal(jax.random.PRNGKey(seed), shape)


def test_hand_computed_values():
  # p = [0.5, 0.3, 0.2].
  logits = jnp.log(jnp.array([0.5, 0.3, 0.2]))
  entropy = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
  np.testing.assert_allclose(confidence.max_prob(logits), 0.5, rtol=1e-6)
  np.testing.assert_allclose(confidence.top2_margin(logits), 0.2, rtol=1e-5)
  np.testing.assert_allclose(confidence.entropy_confidence(logits), 1 - entropy / math.log(3),
                             rtol=1e-5)


@pytest.mark.parametrize('name', sorted(confidence.CONFIDENCE_FNS))
def test_bounds_shape_and_shift_invariance(name):
  fn = confidence.get_confidence_fn(name)
  logits = _random_logits(0)
  conf = fn(logits)
  chex.assert_shape(conf, (3, 5))
  assert conf.dtype == jnp.float32
  assert np.all((conf >= 0) & (conf <= 1))
  # Softmax ignores a per-row constant; so must every measure.
  np.testing.assert_allclose(fn(logits + 11.0), conf, atol=1e-5)


@pytest.mark.parametrize('name', sorted(confidence.CONFIDENCE_FNS))
def test_sharper_distribution_is_more_confident(name):
  fn = confidence.get_confidence_fn(name)
  logits = _random_logits(1)
  assert np.all(fn(3.0 * logits) >= fn(logits) - 1e-6)


def test_uniform_and_one_hot_extremes():
  uniform = jnp.zeros((4, V))
  np.testing.assert_allclose(confidence.max_prob(uniform), 1 / V, rtol=1e-6)
  np.testing.assert_allclose(confidence.top2_margin(uniform), 0.0, atol=1e-7)
  np.testing.assert_allclose(confidence.entropy_confidence(uniform), 0.0, atol=1e-6)
  # A one-hot softmax (other logits -inf-like) is certain under every measure.
  one_hot = jnp.where(jnp.arange(V) == 2, 0.0, -1e4)[None]
  for fn in confidence.CONFIDENCE_FNS.values():
    np.testing.assert_allclose(fn(one_hot), 1.0, atol=1e-6)


def test_bfloat16_logits_are_scored_in_float32():
  logits = _random_logits(2)
  for fn in confidence.CONFIDENCE_FNS.values():
    low = fn(logits.astype(jnp.bfloat16))
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, fn(logits.astype(jnp.bfloat16).astype(jnp.float32)), atol=1e-6)


@pytest.mark.parametrize('name', sorted(confidence.CONFIDENCE_FNS))
def test_jit_matches_eager(name):
  fn = confidence.get_confidence_fn(name)
  logits = _random_logits(3)
  np.testing.assert_allclose(jax.jit(fn)(logits), fn(logits), rtol=1e-6, atol=1e-7)


def test_unknown_measure_and_tiny_vocab_errors():
  with pytest.raises(ValueError, match="Unknown confidence measure 'maxprob'"):
    confidence.get_confidence_fn('maxprob')
  with pytest.raises(ValueError, match='at least 2'):
    confidence.entropy_confidence(jnp.zeros((2, 1)))
  with pytest.raises(ValueError, match='at least 2'):
    confidence.top2_margin(jnp.zeros((2, 1)))


def test_validate_thresholds_broadcasts_and_accepts_never_exit():
  np.testing.assert_array_equal(confidence.validate_thresholds(0.9, 3), np.full(3, 0.9, np.float32))
  out = confidence.validate_thresholds([0.0, 1.0, confidence.NEVER_EXIT, float('inf')], 4)
  assert out.dtype == np.float32 and out.shape == (4,)
  # Never-exit really never fires: no confidence reaches it, even a certain one.
  certain = confidence.max_prob(jnp.array([0.0, -1e4, -1e4]))
  assert not bool(certain >= out[2]) and not bool(certain >= out[3])
  assert bool(certain >= out[1])


@pytest.mark.parametrize('thresholds, num_exits, match', [
    (-0.1, 2, r'threshold\[0\] = -0.1'),
    ([0.5, float('nan')], 2, r'threshold\[1\] = nan'),
    ([0.5, 0.6], 3, 'one value or one per exit'),
    ([[0.5]], 1, '1-D'),
    (0.5, 0, 'num_exits'),
])
def test_validate_thresholds_errors(thresholds, num_exits, match):
  with pytest.raises(ValueError, match=match):
    confidence.validate_thresholds(thresholds, num_exits)


def _run_patience(tokens_per_exit, k):
  """Walks exits with lax.while_loop like the decoder does; returns the first exit that fires."""
  tokens_per_exit = jnp.asarray(tokens_per_exit, jnp.int32)  # int[E, B]
  num_exits, batch = tokens_per_exit.shape

  def cond(carry):
    e, _, done, _ = carry
    return (e < num_exits) & ~jnp.all(done)

  def body(carry):
    e, state, done, exit_at = carry
    state, exit_now = confidence.patience_update(state, tokens_per_exit[e], k)
    exit_at = jnp.where(exit_now & ~done, e, exit_at)
    return e + 1, state, done | exit_now, exit_at

  init = (0, confidence.PatienceState.init((batch,)), jnp.zeros(batch, bool),
          jnp.full(batch, -1, jnp.int32))
  return jax.jit(lambda c: jax.lax.while_loop(cond, body, c)[3])(init)


def test_patience_exits_after_k_consecutive_agreeing_exits():
  # Columns are sequences; rows are exits 0..4.
  tokens = [[5, 1, 3, 4],
            [5, 2, 3, 9],
            [6, 2, 3, 4],
            [6, 2, 3, 9],
            [6, 2, 3, 4]]
  np.testing.assert_array_equal(_run_patience(tokens, 1), [0, 0, 0, 0])
  np.testing.assert_array_equal(_run_patience(tokens, 2), [1, 2, 1, -1])
  np.testing.assert_array_equal(_run_patience(tokens, 3), [4, 3, 2, -1])
  # Agreement must be consecutive: 5,5 then 6,6,6 never reaches 4 in a row.
  np.testing.assert_array_equal(_run_patience(tokens, 4), [-1, 4, 3, -1])


def test_patience_k_is_traced_without_retrace():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(state, token, k):
    return confidence.patience_update(state, token, k)

  state = confidence.PatienceState.init((2,))
  token = jnp.array([1, 2])
  for k in (1, 2, 3):
    _, exit_now = step(state, token, jnp.int32(k))
    np.testing.assert_array_equal(exit_now, [k == 1, k == 1])


def test_validate_patience():
  assert confidence.validate_patience(3) == 3
  for bad in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match='patience must be a positive integer'):
      confidence.validate_patience(bad)
