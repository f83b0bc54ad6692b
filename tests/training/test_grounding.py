"""The embedded backbone's grounding loss: its value, masking, shape checks and config errors (the step: test_backbone_step)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import vqa
from free_jax.training import grounding, pipeline


def _labels(batch_size, seed=0):
  rng = np.random.default_rng(seed)
  labels = {f'slot_{name}': rng.integers(0, classes, (batch_size, grounding.NUM_SLOTS)).astype(np.int32)
            for name, classes in grounding.SLOT_CLASSES.items()}
  return dict(labels, valid=np.ones(batch_size, bool))


def test_zero_probe_loss_is_mean_log_classes_and_padding_rows_are_ignored():
  probe = grounding.init_probe(4, 6)
  prefix = jax.random.normal(jax.random.key(0), (3, 4, 6))
  batch = _labels(3)
  expected = np.mean([np.log(c) for c in grounding.SLOT_CLASSES.values()])
  np.testing.assert_allclose(grounding.grounding_loss(probe, prefix, batch), expected, rtol=1e-6)

  trained = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape), probe)
  padded = dict(batch, valid=np.array([True, True, False]))
  garbage = {k: v.at[2].set(0) if k.startswith('slot_') else v for k, v in jax.tree.map(jnp.asarray, padded).items()}
  first_two = {k: v[:2] for k, v in batch.items()}
  np.testing.assert_allclose(grounding.grounding_loss(trained, prefix, garbage),
                             grounding.grounding_loss(trained, prefix[:2], first_two), rtol=1e-5)


def test_wrong_label_shape_is_refused():
  with pytest.raises(AssertionError):
    grounding.grounding_loss(grounding.init_probe(4, 6), jnp.zeros((3, 4, 6)), _labels(2) | {'valid': np.ones(3)})


def test_grounding_needs_the_generated_scenes(tmp_path):
  config = vqa.get_config('smoke')
  with config.unlocked():
    config.data.source, config.data.data_dir = 'clevr', str(tmp_path)
  with pytest.raises(ValueError, match=r"backbone_train.grounding_weight=1.0 needs the scene metadata of "
                                       r"data.source='sort_of_clevr' \(got 'clevr'\); set it to 0"):
    pipeline.validate_config(config)
  with config.unlocked():
    config.backbone_train.grounding_weight = -1.0
  with pytest.raises(ValueError, match='grounding_weight=-1.0 must be >= 0'):
    pipeline.validate_config(config)
