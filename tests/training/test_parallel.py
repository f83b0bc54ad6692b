"""Data parallelism: 1 device vs 8 fake CPU devices give the same losses and params.

JAX fixes the device count at start-up, so the 8-device comparison re-runs this file's test in a
subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``; the normal suite thus
exercises it without any special invocation.
"""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from free_jax.training import losses, parallel
from tests.fake_devices import NUM_FAKE_DEVICES, rerun_with_fake_devices

BATCH, T, D = 16, 4, 3


def _toy_problem():
  """Linear regression on tokens; masks are uneven: some devices' shards hold no real token."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(BATCH, T, D)).astype(np.float32)
  y = (x @ np.array([1.0, -2.0, 0.5]) + 0.3 + 0.1 * rng.normal(size=(BATCH, T))).astype(np.float32)
  lengths = np.array([4, 4, 1, 0, 3, 2, 0, 0, 4, 1, 1, 2, 3, 0, 4, 4])  # rows 6, 7 (device 3 of 8) empty
  mask = np.arange(T)[None, :] < lengths[:, None]
  params = {'w': jnp.zeros((D,)), 'b': jnp.zeros(())}
  return params, {'x': x, 'y': y, 'mask': mask}


def _train(mesh, num_steps=5):
  """Runs SGD steps of the per-device step on `mesh`; returns (losses, final params)."""
  params, batch = _toy_problem()
  tx = optax.sgd(0.1)

  def step(state, batch):
    params, opt_state = state

    def loss_fn(p):
      pred = batch['x'] @ p['w'] + p['b']
      return losses.masked_mean((pred - batch['y'])**2, batch['mask'], axis_name=parallel.DATA)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  run = parallel.data_parallel(step, mesh)
  state = parallel.replicate((params, tx.init(params)), mesh)
  batch = parallel.shard_batch(batch, mesh)
  history = []
  for _ in range(num_steps):
    state, loss = run(state, batch)
    history.append(float(loss))
  return np.array(history), jax.tree.map(np.asarray, state[0])


def _reference(num_steps=5):
  """The same optimisation without shard_map, on the whole batch at once."""
  params, batch = _toy_problem()
  history = []
  for _ in range(num_steps):
    def loss_fn(p):
      pred = batch['x'] @ p['w'] + p['b']
      return losses.masked_mean((pred - batch['y'])**2, jnp.asarray(batch['mask']))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    history.append(float(loss))
  return np.array(history), params


def test_one_device_mesh_matches_plain_jax():
  losses_1, params_1 = _train(parallel.make_mesh(1))
  losses_ref, params_ref = _reference()
  assert losses_1[-1] < 0.5 * losses_1[0]  # it does optimise
  np.testing.assert_allclose(losses_1, losses_ref, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), params_1, params_ref)


def test_eight_devices_match_one_device():
  if rerun_with_fake_devices(__file__, 'test_eight_devices_match_one_device'):
    return
  losses_1, params_1 = _train(parallel.make_mesh(1))
  losses_8, params_8 = _train(parallel.make_mesh(NUM_FAKE_DEVICES))
  np.testing.assert_allclose(losses_8, losses_1, atol=1e-5, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), params_8, params_1)
  # A naive mean of per-device means would weight device 3 (no real token) like the others.
  _, batch = _toy_problem()
  shard_counts = batch['mask'].reshape(NUM_FAKE_DEVICES, -1).sum(1)
  assert shard_counts.min() == 0 and len(set(shard_counts)) > 1


def test_batch_size_errors_are_clear():
  if rerun_with_fake_devices(__file__, 'test_batch_size_errors_are_clear'):
    return
  mesh = parallel.make_mesh()
  assert parallel.check_batch_size(32, mesh) == 4
  with pytest.raises(ValueError, match='global batch size 12 must be a positive multiple of the 8 devices'):
    parallel.check_batch_size(12, mesh)
  with pytest.raises(ValueError, match='same leading'):
    parallel.shard_batch({'a': np.zeros((16, 2)), 'b': np.zeros((8,))}, mesh)
  with pytest.raises(ValueError, match='global batch size 4 '):
    parallel.shard_batch({'a': np.zeros((4, 2))}, mesh)
  with pytest.raises(ValueError, match='global batch size 12 '):
    parallel.data_parallel(lambda s, b: s, mesh)(jnp.zeros(()), np.zeros((12, 2)))
  with pytest.raises(ValueError, match='num_devices=9'):
    parallel.make_mesh(9)
