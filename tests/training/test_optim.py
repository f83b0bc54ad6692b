"""Optimizer factory: schedule shape, decay mask, clipping, separate GAN optimizers, config errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from free_jax.training import optim


def test_warmup_then_cosine_schedule():
  cfg = optim.optimizer_config(learning_rate=1e-3, warmup_steps=10, end_lr_factor=0.1)
  schedule = optim.make_schedule(cfg, total_steps=110)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(5e-4)
  assert float(schedule(10)) == pytest.approx(1e-3)
  assert float(schedule(60)) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4), rel=1e-5)  # cosine midpoint
  assert float(schedule(110)) == pytest.approx(1e-4)
  lrs = np.array([float(schedule(s)) for s in range(10, 111)])
  assert np.all(np.diff(lrs) <= 1e-12)


def test_weight_decay_only_on_matrices():
  cfg = optim.optimizer_config(learning_rate=0.1, warmup_steps=0, end_lr_factor=1.0, weight_decay=0.5)
  tx = optim.make_optimizer(cfg, total_steps=10)
  params = {'dense': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones((2,))}}
  state = tx.init(params)
  # With zero gradients only decoupled weight decay moves params: kernels shrink, biases do not.
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, state, params)
  np.testing.assert_allclose(updates['dense']['kernel'], -0.1 * 0.5 * 1.0, rtol=1e-6)
  np.testing.assert_array_equal(updates['dense']['bias'], 0.0)


def test_gradients_are_clipped_by_global_norm():
  params = {'kernel': jnp.zeros((2, 2))}
  g = {'kernel': jnp.array([[1.0, 1.0], [1.0, -1.0]])}  # global norm 2 > clip norm 1
  def run(clip, scales):
    cfg = optim.optimizer_config(learning_rate=0.1, warmup_steps=0, weight_decay=0.0, grad_clip_norm=clip)
    tx = optim.make_optimizer(cfg, total_steps=10)
    state, p = tx.init(params), params
    for s in scales:
      updates, state = tx.update(jax.tree.map(lambda x: s * x, g), state, p)
      p = optax.apply_updates(p, updates)
    return p['kernel']
  # Clipped, a 10x larger first gradient is the same unit-norm gradient; unclipped, Adam's moments differ.
  np.testing.assert_allclose(run(1.0, [10.0, 1.0]), run(1.0, [1.0, 1.0]), rtol=1e-6)
  assert not np.allclose(run(0.0, [10.0, 1.0]), run(0.0, [1.0, 1.0]), rtol=1e-4)


def test_gan_optimizers_are_separate_and_only_hold_given_params():
  make = lambda lr: optim.optimizer_config(learning_rate=lr, warmup_steps=2, weight_decay=0.0)
  cfg = ml_collections.ConfigDict({'generator': make(1e-4), 'discriminator': make(1e-3)})
  g_tx, d_tx = optim.make_gan_optimizers(cfg, total_steps=20)
  exits = {'layer': {'kernel': jnp.ones((3, 3))}}
  discs = {'hidden_0': {'kernel': jnp.ones((4, 2)), 'bias': jnp.zeros((2,))}}
  g_state, d_state = g_tx.init(exits), d_tx.init(discs)
  # Every optimizer-state array is a scalar count or has the shape of one of its own params.
  for state, params in ((g_state, exits), (d_state, discs)):
    shapes = {p.shape for p in jax.tree.leaves(params)} | {()}
    assert {s.shape for s in jax.tree.leaves(state)} <= shapes
  # Each follows its own schedule: same gradients, 10x the learning rate -> 10x the displacement.
  def displacement(tx, params):
    state, p = tx.init(params), params
    for _ in range(3):
      updates, state = tx.update(jax.tree.map(jnp.ones_like, p), state, p)
      p = optax.apply_updates(p, updates)
    return float(jnp.abs(p['layer']['kernel'] - params['layer']['kernel']).max())
  assert displacement(d_tx, exits) == pytest.approx(10 * displacement(g_tx, exits), rel=1e-3)


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match='unknown optimizer config field .lr.'):
    optim.optimizer_config(lr=1e-3)
  with pytest.raises(ValueError, match='warmup_steps=50'):
    optim.make_schedule(optim.optimizer_config(warmup_steps=50), total_steps=20)
  with pytest.raises(ValueError, match='learning_rate'):
    optim.make_schedule(optim.optimizer_config(learning_rate=0.0), total_steps=20)
  with pytest.raises(ValueError, match="'discriminator'"):
    optim.make_gan_optimizers(ml_collections.ConfigDict({'generator': optim.optimizer_config()}), 20)
