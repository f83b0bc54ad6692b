"""The FREE step on a tiny random BLIP-2: what it updates, what it must never touch, and its gradients."""

import jax
import numpy as np
import pytest

from experiments.configs import vqa
from free_jax.data import batching
from free_jax.training import free_step, parallel, pipeline


def _setup(g_learning_rate=3e-4, **free):
  config = vqa.get_config('smoke')
  with config.unlocked():
    config.free.update(free)
    config.train.warmup_steps = 0  # a warmup starts at learning rate 0: one step would change nothing
    config.train.g_learning_rate = g_learning_rate
  backbone = pipeline.untrained_backbone(config)
  model, tok, fmt = backbone.model, backbone.tokenizer, backbone.fmt
  examples = pipeline.load_examples(config, 'train', 8, fmt.image_size)
  examples['labelled'] = np.arange(8) < 4
  batch = batching.train_batch(examples, tok, fmt, 'vqa')
  mesh = parallel.make_mesh(1)
  disc = free_step.make_discriminators(len(config.exits.layers), config.discriminator)
  step = free_step.make_free_step(model, config.exits.layers, config.free, disc, *pipeline.gan_optimizers(config), mesh)
  return config, backbone, batch, step


@pytest.fixture(scope='module')
def semi():
  return _setup()


def _copy(tree):
  return jax.tree.map(np.array, tree)


def test_step_updates_exits_and_discriminators_and_never_the_backbone(semi):
  config, backbone, batch, step = semi
  state = pipeline.init_free_state(config, backbone)
  before_backbone, before = _copy(backbone.params), _copy(state)
  for _ in range(2):
    state, metrics = step(state, backbone.params, batch)
  jax.tree.map(np.testing.assert_array_equal, _copy(backbone.params), before_backbone)
  changed = lambda a, b: any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert changed(state.exits, before.exits)
  assert changed(state.discriminators, before.discriminators)
  assert int(state.step) == 2
  # Optimizer states hold only the exits' and discriminators' shapes: no slot for a backbone param.
  n_exit, n_backbone = len(jax.tree.leaves(state.exits)), len(jax.tree.leaves(backbone.params))
  assert len(jax.tree.leaves(state.g_opt_state)) < 3 * n_exit + 5 < n_backbone * 2
  for key in ('d_loss', 'g_loss', 'exit1/adv', 'exit1/ce', 'exit2/d_real_acc', 'exit2/d_fake_acc',
              'exit1/token_acc', 'exit2/agreement', 'exit1/grad_norm'):
    assert np.isfinite(metrics[key]), key
  # The per-exit norms make up the exits' share of the whole gradient norm.
  per_exit = [metrics[f'exit{l}/grad_norm'] for l in config.exits.layers]
  assert min(per_exit) > 0 and np.sqrt(np.sum(np.square(per_exit))) <= metrics['g_grad_norm'] * (1 + 1e-5)


def test_adversarial_gradient_reaches_the_exits():
  """With CE switched off the exit update is the adversarial term alone; it must move the exits."""
  config, backbone, batch, step = _setup(ce_weight=0.0)
  state = pipeline.init_free_state(config, backbone)
  before = _copy(state.exits)
  state, metrics = step(state, backbone.params, batch)
  assert metrics['g_grad_norm'] > 1e-6
  assert metrics['exit1/ce'] == 0.0
  deltas = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(_copy(state.exits)), jax.tree.leaves(before))]
  assert max(deltas) > 0


def test_labels_are_used_only_for_labelled_rows(semi):
  """semi_supervised CE must not see unlabelled rows: relabelling them changes nothing."""
  config, backbone, batch, step = semi
  state = pipeline.init_free_state(config, backbone)
  other = dict(batch, labels=np.where(batch['labelled'][:, None], batch['labels'], 7))
  _, m1 = step(state, backbone.params, batch)
  state = pipeline.init_free_state(config, backbone)
  _, m2 = step(state, backbone.params, other)
  assert m1['exit1/ce'] == m2['exit1/ce'] and m1['g_loss'] == m2['g_loss']


@pytest.mark.parametrize('mode, keys, absent', [
    ('unsupervised_kd', ('d_loss', 'exit1/adv', 'exit1/kd'), ('exit1/ce',)),
    ('unsupervised_pseudo', ('d_loss', 'exit2/pseudo'), ('exit1/ce',)),
    ('ce_only', ('exit1/ce',), ('d_loss', 'exit1/adv')),
    ('cosine', ('exit1/cosine', 'exit1/ce'), ('d_loss',)),
])
def test_modes(mode, keys, absent):
  config, backbone, batch, step = _setup(mode=mode)
  state = pipeline.init_free_state(config, backbone)
  before_d = _copy(state.discriminators)
  state, metrics = step(state, backbone.params, batch)
  for k in keys:
    assert np.isfinite(metrics[k]) and metrics[k] >= 0, k
  for k in absent:
    assert k not in metrics, k
  d_changed = any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(_copy(state.discriminators)),
                                                             jax.tree.leaves(before_d)))
  assert d_changed == free_step.MODES[mode][0]


def test_ce_only_loss_falls():
  config, backbone, batch, step = _setup(mode='ce_only', g_learning_rate=1e-2)
  state = pipeline.init_free_state(config, backbone)
  losses = []
  for _ in range(8):
    state, metrics = step(state, backbone.params, batch)
    losses.append(float(metrics['g_loss']))
  assert losses[-1] < losses[0] - 0.3 and all(np.diff(losses) < 0), losses
