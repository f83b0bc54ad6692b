"""Per-token discriminators: shapes, separate per-exit params, and learning a toy real/fake split."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from free_jax.training import losses
from free_jax.training.discriminator import Discriminator, Discriminators

D = 16


def test_discriminator_is_per_token():
  model = Discriminator(hidden_size=32, num_layers=2)
  x = jax.random.normal(jax.random.key(0), (2, 5, D))
  params = model.init(jax.random.key(1), x)['params']
  logits = model.apply({'params': params}, x)
  assert logits.shape == (2, 5)
  # Changing one token changes only that token's logit.
  logits2 = model.apply({'params': params}, x.at[1, 3].set(7.0))
  changed = np.asarray(logits2 != logits)
  assert changed[1, 3] and changed.sum() == 1


def test_discriminators_are_separate_models_per_exit():
  model = Discriminators(num_exits=3, hidden_size=32, num_layers=1)
  x = jax.random.normal(jax.random.key(0), (3, 2, 4, D))
  params = model.init(jax.random.key(1), x)['params']
  kernels = params['per_exit']['hidden_0']['kernel']
  assert kernels.shape == (3, D, 32)
  assert not np.allclose(kernels[0], kernels[1])  # independent initialisations
  logits = model.apply({'params': params}, x)
  assert logits.shape == (3, 2, 4)
  single = Discriminator(hidden_size=32, num_layers=1)
  for e in range(3):
    exit_params = jax.tree.map(lambda p, e=e: p[e], params['per_exit'])
    np.testing.assert_allclose(single.apply({'params': exit_params}, x[e]), logits[e], rtol=1e-6, atol=1e-6)


def test_bad_config_and_inputs_are_clear_errors():
  x = jnp.zeros((2, 4, D))
  with pytest.raises(ValueError, match='activation'):
    Discriminator(activation='swishy').init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='num_exits=3'):
    Discriminators(num_exits=3).init(jax.random.key(0), x)


def test_discriminators_learn_to_separate_gaussians():
  """Exit e's fakes are N(mu_e, I), reals N(0, I): each discriminator must learn its own boundary."""
  num_exits, batch, tokens = 2, 4, 16
  shifts = jnp.stack([jnp.full((D,), 1.0), jnp.full((D,), -1.0)])  # ||shift|| = 4: Bayes acc ~ 0.98
  model = Discriminators(num_exits=num_exits, hidden_size=32, num_layers=2)
  mask = jnp.ones((num_exits, batch, tokens), bool).at[:, :, -3:].set(False)

  def sample(key):
    k_real, k_fake = jax.random.split(key)
    real = jax.random.normal(k_real, (num_exits, batch, tokens, D))
    fake = jax.random.normal(k_fake, (num_exits, batch, tokens, D)) + shifts[:, None, None, :]
    return real, fake

  params = model.init(jax.random.key(0), jnp.zeros((num_exits, batch, tokens, D)))['params']
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  def loss_fn(p, real, fake):
    logits = lambda x: model.apply({'params': p}, x)
    return losses.discriminator_loss(logits(real), logits(fake), mask)

  @jax.jit
  def step(p, opt_state, key):
    real, fake = sample(key)
    loss, grads = jax.value_and_grad(loss_fn)(p, real, fake)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  first_loss = None
  for i in range(200):
    params, opt_state, loss = step(params, opt_state, jax.random.key(i + 1))
    first_loss = loss if first_loss is None else first_loss
  assert float(loss) < 0.5 * float(first_loss)

  real, fake = sample(jax.random.key(10_000))  # held-out samples
  for e in range(num_exits):
    apply = lambda x, e=e: model.apply({'params': params}, x)[e]
    acc_real, acc_fake = losses.discriminator_accuracy(apply(real), apply(fake), mask[e])
    assert float(acc_real) > 0.9 and float(acc_fake) > 0.9, (e, acc_real, acc_fake)
