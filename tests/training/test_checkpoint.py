"""Checkpointer: exact round trip, fallback from a corrupt latest step, non-destructive reopen."""

import glob
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from free_jax.training import checkpoint


def _state(seed: int):
  params = {'exit_0': {'kernel': jax.random.normal(jax.random.key(seed), (3, 4)),
                       'bias': jnp.full((4,), seed, jnp.float32)}}
  opt_state = optax.adam(1e-3).init(params)
  return {'params': params, 'opt_state': opt_state, 'step': jnp.int32(seed), 'rng': jax.random.PRNGKey(seed)}


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _corrupt(directory, step):
  for path in glob.glob(os.path.join(directory, str(step), '**'), recursive=True):
    if os.path.isfile(path):
      with open(path, 'wb') as f:
        f.write(b'garbage')


def _save_steps(directory, steps, **kwargs):
  with checkpoint.Checkpointer(directory, **kwargs) as ckpt:
    for s in steps:
      ckpt.save(s, _state(s), data_position=10 * s)


def test_save_restore_round_trip(tmp_path):
  with checkpoint.Checkpointer(tmp_path, config_hash='abc') as ckpt:
    assert ckpt.restore_latest(_state(0)) is None
    ckpt.save(7, _state(7), data_position=70, extra={'epoch': 2})
    # An abstract target (shapes and dtypes only) is enough.
    restored = ckpt.restore_latest(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0)))
  assert restored.step == 7
  _assert_trees_equal(restored.state, _state(7))
  assert restored.meta == {'step': 7, 'data_position': 70, 'final': False, 'config_hash': 'abc', 'epoch': 2}


def test_corrupt_latest_falls_back_with_warning(tmp_path, caplog):
  _save_steps(tmp_path, [1, 2, 3])
  _corrupt(tmp_path, 3)
  with checkpoint.Checkpointer(tmp_path) as ckpt, caplog.at_level(logging.WARNING):
    restored = ckpt.restore_latest(_state(0))
    assert restored.step == 2 and restored.meta['data_position'] == 20
    _assert_trees_equal(restored.state, _state(2))
    assert 'step 3' in caplog.text and 'unreadable' in caplog.text
    # The corrupt step is kept aside, and training can save step 3 again.
    assert os.path.isdir(tmp_path / 'corrupt.3')
    assert ckpt.all_steps() == [1, 2]
    ckpt.save(3, _state(33))
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    _assert_trees_equal(ckpt.restore_latest(_state(0)).state, _state(33))


def test_all_checkpoints_unreadable_is_an_error_and_moves_nothing(tmp_path):
  _save_steps(tmp_path, [1, 2])
  _corrupt(tmp_path, 1)
  _corrupt(tmp_path, 2)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(checkpoint.UnreadableCheckpointError, match=r'no readable checkpoint .*step 1: .*step 2: '):
      ckpt.restore_latest(_state(0))
    assert ckpt.all_steps() == [1, 2]


def test_reopen_keeps_checkpoints_and_never_overwrites(tmp_path):
  _save_steps(tmp_path, [1, 2], max_to_keep=2)
  with checkpoint.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    assert ckpt.all_steps() == [1, 2]
    with pytest.raises(ValueError, match='step 2 already exists'):
      ckpt.save(2, _state(5))
    ckpt.save(3, _state(3))
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3]  # max_to_keep drops only the oldest, after the new save
  with checkpoint.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    _assert_trees_equal(ckpt.restore_latest(_state(0)).state, _state(3))


def test_finished_run_is_detected(tmp_path):
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert not ckpt.is_finished()
    ckpt.save(1, _state(1))
    ckpt.wait()
    assert not ckpt.is_finished()
    ckpt.save(2, _state(2), final=True)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.is_finished()
    assert ckpt.restore_latest(_state(0)).meta['final']


def test_config_hash_mismatch_is_refused(tmp_path):
  cfg = {'model': {'layers': 4}, 'lr': 1e-3}
  h = checkpoint.config_hash(cfg)
  assert h == checkpoint.config_hash({'lr': 1e-3, 'model': {'layers': 4}})  # key order does not matter
  other = checkpoint.config_hash({'model': {'layers': 6}, 'lr': 1e-3})
  _save_steps(tmp_path, [1], config_hash=h)
  with checkpoint.Checkpointer(tmp_path, config_hash=other) as ckpt:
    with pytest.raises(ValueError, match=f'config hash {h}, this config hashes to {other}'):
      ckpt.restore_latest(_state(0))


def test_check_finite_names_the_metric():
  checkpoint.check_finite({'d_loss': 0.5, 'g_loss': jnp.float32(1.0)}, step=3)
  with pytest.raises(FloatingPointError, match=r"metric 'g_loss' is not finite \(nan\) at step 12"):
    checkpoint.check_finite({'d_loss': 0.5, 'g_loss': jnp.float32(np.nan)}, step=12)
  with pytest.raises(FloatingPointError, match="'grad_norm'.*1 non-finite"):
    checkpoint.check_finite({'grad_norm': np.array([1.0, np.inf])}, step=1)


def test_relative_directory_is_accepted(tmp_path, monkeypatch):
  """`make train` passes a relative workdir; orbax itself only takes absolute paths."""
  monkeypatch.chdir(tmp_path)
  with checkpoint.Checkpointer('relative/ckpts', async_save=False) as ckpt:
    ckpt.save(1, {'x': np.arange(3.0)})
    restored = ckpt.restore_latest({'x': np.zeros(3)})
  assert restored.step == 1
  np.testing.assert_array_equal(restored.state['x'], np.arange(3.0))


def test_stale_tmp_directories_are_removed_before_the_constructor_returns(tmp_path):
  """A save killed midway leaves a tmp directory. It is removed synchronously: a background cleanup outlives
  `close` and races interpreter shutdown or a `tfds.testing.mock_data` block that reroutes the filesystem."""
  _save_steps(tmp_path, [1])
  stale = tmp_path / '2.orbax-checkpoint-tmp-123'
  (stale / 'state').mkdir(parents=True)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert not stale.exists()
    assert ckpt.all_steps() == [1]
