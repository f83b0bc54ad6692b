"""Cached frozen-backbone states: an exit step on them is the step that runs the backbone itself."""

import types

import jax
import numpy as np
import pytest

from experiments.configs import blip2_t5_coco, vqa
from free_jax.data import batching
from free_jax.training import free_step, frozen_features, parallel, pipeline


@pytest.fixture(scope='module')
def setup():
  config = vqa.get_config('smoke')
  with config.unlocked():
    config.train.warmup_steps = 0  # a warmup starts at learning rate 0: one step would change nothing
  backbone = pipeline.untrained_backbone(config)
  examples = pipeline.load_examples(config, 'train', 12, backbone.fmt.image_size)
  examples['labelled'] = np.arange(12) < 6
  make_batch = lambda chunk: batching.train_batch(chunk, backbone.tokenizer, backbone.fmt, 'vqa')
  cached = frozen_features.precompute(backbone.model, backbone.params, examples, config.exits.layers, make_batch, 5)
  return config, backbone, examples, cached


def test_columns_hold_one_row_per_example_in_order(setup):
  config, backbone, examples, cached = setup
  seq = backbone.fmt.num_query_tokens + backbone.fmt.prompt_length + backbone.fmt.target_length
  width = backbone.model.lm_stack().hidden_size
  e = len(config.exits.layers)
  assert cached[frozen_features.EXIT_INPUTS].shape == (12, e, seq, width)
  assert cached[frozen_features.FINAL_HIDDEN].shape == (12, seq, width)
  assert cached[frozen_features.TOKEN_VALID].shape == (12, seq)
  assert sum(v.nbytes for v in cached.values()) <= frozen_features.nbytes(12, e, seq, width)
  # Rows 5..9 were computed in the second call (batch 5): the same as computing them alone.
  alone = frozen_features.precompute(backbone.model, backbone.params, batching.take(examples, np.arange(7, 9)),
                                     config.exits.layers, lambda c: batching.train_batch(
                                         c, backbone.tokenizer, backbone.fmt, 'vqa'), 2)
  for name in frozen_features.COLUMNS:
    np.testing.assert_allclose(alone[name], cached[name][7:9], atol=1e-5)


def test_step_on_cached_states_equals_the_step_running_the_backbone(setup):
  config, backbone, examples, cached = setup
  chunk = batching.take(dict(examples, **cached), np.arange(8))
  live = batching.train_batch(chunk, backbone.tokenizer, backbone.fmt, 'vqa')
  with_cache = dict(live, **{k: chunk[k] for k in frozen_features.COLUMNS})
  mesh = parallel.make_mesh(1)
  disc = free_step.make_discriminators(len(config.exits.layers), config.discriminator)
  step = free_step.make_free_step(backbone.model, config.exits.layers, config.free, disc,
                                  *pipeline.gan_optimizers(config), mesh)
  results = []
  for batch in (live, with_cache):
    state = pipeline.init_free_state(config, backbone)
    for _ in range(2):
      state, metrics = step(state, backbone.params, batch)
    results.append((jax.tree.map(np.asarray, state), {k: float(v) for k, v in metrics.items()}))
  (state_a, metrics_a), (state_b, metrics_b) = results
  # Adam's first steps move every weight by ~the learning rate (3e-4) whatever its gradient's size, so the
  # float noise of a separately compiled backbone shows in near-zero gradients only: well below one step.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), state_a, state_b)
  assert metrics_a.keys() == metrics_b.keys()
  for key in metrics_a:
    np.testing.assert_allclose(metrics_a[key], metrics_b[key], atol=1e-5, rtol=1e-4, err_msg=key)


def test_cache_is_refused_up_front_where_it_cannot_work():
  config = blip2_t5_coco.get_config('smoke')
  with config.unlocked():
    config.train.cache_features = True
  t5 = types.SimpleNamespace(is_encoder_decoder=True)
  with pytest.raises(ValueError, match='train.cache_features=True needs a decoder-only backbone'):
    pipeline._check_feature_cache(config, t5, None)  # pylint: disable=protected-access
  config = vqa.get_config()
  with config.unlocked():
    config.data.num_train = 10**9
  with pytest.raises(ValueError, match=r'train.cache_features=True needs .* GiB of host memory for '
                                       r'data.num_train=1000000000'):
    pipeline.validate_config(config)
