"""FREE losses and metrics on hand-built inputs, checked against hand / numpy formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from free_jax.training import losses

MASK = np.array([[True, True, False], [True, False, False]])  # 3 real tokens, 3 padding


def _np_log_sigmoid(x):
  return -np.log1p(np.exp(-x))


def test_masked_mean_ignores_padding_even_if_nan():
  values = np.array([[1.0, 2.0, np.nan], [6.0, np.inf, 100.0]])
  assert float(losses.masked_mean(jnp.asarray(values), MASK)) == pytest.approx(3.0)
  assert float(losses.masked_mean(jnp.asarray(values), np.zeros_like(MASK))) == 0.0
  grad = jax.grad(lambda v: losses.masked_mean(v, np.zeros_like(MASK)))(jnp.ones((2, 3)))
  np.testing.assert_array_equal(grad, 0.0)


def test_discriminator_loss_matches_bce_formula():
  real = np.array([[2.0, -1.0, 50.0], [0.5, 9.0, 9.0]])
  fake = np.array([[-3.0, 1.0, 50.0], [0.0, 9.0, 9.0]])
  m = MASK
  expected = (-_np_log_sigmoid(real[m]).mean()) + (-_np_log_sigmoid(-fake[m]).mean())
  assert float(losses.discriminator_loss(real, fake, m)) == pytest.approx(expected, rel=1e-6)


def test_discriminator_loss_one_sided_label_smoothing():
  real = np.array([[1.0, 2.0, 0.0], [-1.0, 0.0, 0.0]])
  fake = np.array([[-1.0, 0.5, 0.0], [2.0, 0.0, 0.0]])
  s = 0.1
  real_bce = -(1 - s) * _np_log_sigmoid(real[MASK]) - s * _np_log_sigmoid(-real[MASK])
  fake_bce = -_np_log_sigmoid(-fake[MASK])  # fake targets stay exactly 0
  expected = real_bce.mean() + fake_bce.mean()
  got = losses.discriminator_loss(real, fake, MASK, label_smoothing=s)
  assert float(got) == pytest.approx(expected, rel=1e-6)


def test_generator_loss_is_non_saturating():
  fake = jnp.array([[-10.0, 0.0, 3.0], [math.log(3.0), 0.0, 0.0]])
  # -log sigmoid(l): at 0 -> log 2; at log 3 -> log(4/3).
  expected = (-_np_log_sigmoid(-10.0) + math.log(2) + math.log(4 / 3)) / 3
  assert float(losses.generator_loss(fake, MASK)) == pytest.approx(expected, rel=1e-6)
  # A confident discriminator (fake logit -10) still gives the generator a gradient close to -1/3
  # (3 tokens), unlike log(1 - D), whose gradient vanishes there.
  g = jax.grad(losses.generator_loss)(fake, MASK)
  assert float(g[0, 0]) == pytest.approx(-1 / 3, rel=1e-3)
  assert float(g[0, 2]) == 0.0


def test_r1_penalty_of_linear_discriminator_is_weight_norm():
  w = jnp.array([3.0, -4.0])  # D(x) = w.x + 1 has input gradient w: ||w||^2 = 25 at every token.
  features = jax.random.normal(jax.random.key(0), (2, 3, 2))
  assert float(losses.r1_penalty(lambda x: x @ w + 1.0, features, MASK)) == pytest.approx(25.0)
  # Quadratic D(x) = sum(x^2): gradient 2x, penalty = mean over real tokens of 4 ||x||^2.
  expected = (4 * np.sum(np.asarray(features) ** 2, -1))[MASK].mean()
  got = losses.r1_penalty(lambda x: jnp.sum(x**2, -1), features, MASK)
  assert float(got) == pytest.approx(expected, rel=1e-5)


def test_cross_entropy_uses_position_aligned_labels():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]],
                              [[0.2, 0.2, 0.6], [0.3, 0.3, 0.4], [0.3, 0.3, 0.4]]]))
  labels = jnp.array([[0, 2, 1], [1, 0, 0]])
  expected = -(math.log(0.5) + math.log(0.8) + math.log(0.2)) / 3
  assert float(losses.cross_entropy(logits, labels, MASK)) == pytest.approx(expected, rel=1e-6)
  assert float(losses.token_accuracy(logits, labels, MASK)) == pytest.approx(2 / 3)


def test_kd_loss_is_temperature_scaled_kl():
  rng = np.random.default_rng(0)
  student, teacher = rng.normal(size=(2, 2, 3, 5))
  for t in (1.0, 2.0):
    p = np.exp(teacher / t) / np.exp(teacher / t).sum(-1, keepdims=True)
    q = np.exp(student / t) / np.exp(student / t).sum(-1, keepdims=True)
    kl = (p * (np.log(p) - np.log(q))).sum(-1)
    got = losses.kd_loss(student, teacher, MASK, temperature=t)
    assert float(got) == pytest.approx(t**2 * kl[MASK].mean(), rel=1e-5)
  assert float(losses.kd_loss(teacher, teacher, MASK)) == pytest.approx(0.0, abs=1e-6)
  # The teacher gets no gradient.
  g = jax.grad(lambda te: losses.kd_loss(student, te, MASK))(jnp.asarray(teacher))
  np.testing.assert_array_equal(g, 0.0)


def test_cosine_loss():
  x = jnp.array([[[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]], [[2.0, 0.0], [5.0, 5.0], [0.0, 0.0]]])
  y = jnp.array([[[2.0, 0.0], [-1.0, -1.0], [0.0, 0.0]], [[0.0, 3.0], [5.0, 5.0], [0.0, 0.0]]])
  # cos: 1, -1, 0 on the real tokens -> 1 - cos: 0, 2, 1. Zero padding vectors stay finite.
  assert float(losses.cosine_loss(x, y, MASK)) == pytest.approx(1.0, rel=1e-6)
  g = jax.grad(losses.cosine_loss)(x, y, MASK)
  assert np.all(np.isfinite(g))


def test_discriminator_accuracy_and_agreement():
  real = jnp.array([[1.0, -2.0, -5.0], [3.0, -1.0, -1.0]])
  fake = jnp.array([[-1.0, -2.0, 5.0], [0.5, 1.0, 1.0]])
  acc_real, acc_fake = losses.discriminator_accuracy(real, fake, MASK)
  assert float(acc_real) == pytest.approx(2 / 3)
  assert float(acc_fake) == pytest.approx(2 / 3)
  exit_logits = jax.nn.one_hot(jnp.array([[1, 2, 0], [0, 0, 0]]), 4)
  final_logits = jax.nn.one_hot(jnp.array([[1, 0, 0], [3, 0, 0]]), 4)
  assert float(losses.agreement(exit_logits, final_logits, MASK)) == pytest.approx(1 / 3)


def test_shape_mismatch_is_an_error():
  with pytest.raises(AssertionError):
    losses.cross_entropy(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 4), bool))
  with pytest.raises(AssertionError):
    losses.discriminator_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones((2, 4), bool))
