"""The FREE step on a tiny random BLIP-2: what it updates, what it must never touch, and its gradients."""

import jax
import numpy as np
import pytest

from experiments.configs import vqa
from free_jax.data import batching
from free_jax.training import free_step, parallel, pipeline


def _setup(g_learning_rate=3e-4, grad_clip=1.0, **free):
  config = vqa.get_config('smoke')
  with config.unlocked():
    config.free.update(free)
    config.train.warmup_steps = 0  # a warmup starts at learning rate 0: one step would change nothing
    config.train.g_learning_rate = g_learning_rate
    config.train.grad_clip = grad_clip
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


def test_per_term_pullbacks_add_up_to_the_joint_step():
  """free.term_clip pulls each term back on its own: with a bound no term reaches, the step is the joint one."""
  config, backbone, batch, joint = _setup(grad_clip=0.0)
  _, _, _, split = _setup(grad_clip=0.0, term_clip=1e9)
  (s1, m1), (s2, m2) = (step(pipeline.init_free_state(config, backbone), backbone.params, batch)
                        for step in (joint, split))
  for key in ('g_loss', 'g_grad_norm', *(f'exit{l}/grad_norm' for l in config.exits.layers)):
    assert float(m1[key]) == pytest.approx(float(m2[key]), rel=1e-5), key
  # Adam turns float noise in near-zero gradient entries into steps of up to ~lr/10: close, not bitwise.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=3e-5), _copy(s1.exits), _copy(s2.exits))
  assert m2['adv_grad_norm'] > 0 and m2['ce_grad_norm'] > 0 and 'adv_grad_norm' not in m1


def test_term_clip_bounds_every_term():
  config, backbone, batch, step = _setup(grad_clip=0.0, term_clip=1e-4)
  _, metrics = step(pipeline.init_free_state(config, backbone), backbone.params, batch)
  assert min(metrics['adv_grad_norm'], metrics['ce_grad_norm']) > 1e-4  # both were clipped ...
  assert metrics['g_grad_norm'] <= 2e-4 * (1 + 1e-4)  # ... so their sum is at most the two bounds


@pytest.mark.parametrize('positions', free_step.ADV_POSITIONS)
def test_the_adversarial_game_is_played_where_adv_positions_says(positions):
  """'targets': D and the adversarial term see only target positions, so a batch without targets has no game."""
  config, backbone, batch, step = _setup(adv_positions=positions)
  _, metrics = step(pipeline.init_free_state(config, backbone), backbone.params,
                    dict(batch, loss_mask=np.zeros_like(batch['loss_mask'])))
  assert (metrics['d_loss'] == 0 and metrics['exit1/adv'] == 0) == (positions == 'targets')


def test_an_unknown_adv_positions_is_refused():
  with pytest.raises(ValueError, match="free.adv_positions='answers'"):
    _setup(adv_positions='answers')
