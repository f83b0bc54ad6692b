"""FREE training on a Flan-T5 BLIP-2 (encoder-decoder): teacher forcing and the exit step.

A tiny random T5 BLIP-2 checkpoint (`tests.hf_fixtures`) with the embedded T5-style tokenizer, fed
mock tfds `coco_captions` through the pipeline's own config path (model.source='pretrained').
"""

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments.configs import blip2_t5_coco
from free_jax import exits as exits_lib
from free_jax import teacher_forcing
from free_jax.data import batching, tokenizer as tokenizer_lib
from free_jax.models import blip2
from free_jax.training import free_step, parallel, pipeline
from tests import hf_fixtures


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  path = tmp_path_factory.mktemp('t5')
  hf_fixtures.save_tiny_blip2(path, 't5', num_decoder_layers=3)
  tokenizer_lib.embedded_tokenizer('t5').save_pretrained(path)
  config = blip2_t5_coco.get_config('smoke')
  with config.unlocked():
    config.model.pretrained_path, config.model.dtype = str(path), 'float32'
    config.data.data_dir = str(path)  # never read: mock_data serves the examples
    config.data.num_train, config.train.batch_size = 8, 4
    config.train.warmup_steps = 0  # a warmup starts at learning rate 0: one step would change nothing
    config.discriminator.hidden = 16
  with tfds.testing.mock_data(num_examples=4):
    backbone = pipeline.load_backbone(config, '/nonexistent')  # pretrained: the workdir is not read
    examples = pipeline.load_examples(config, 'train', 4, backbone.fmt.image_size)
  examples['labelled'] = np.arange(4) < 2
  batch = batching.train_batch(examples, backbone.tokenizer, backbone.fmt, 'caption')
  return config, backbone, batch


def test_teacher_forced_last_layer_is_the_models_decoder_output(setup):
  _, backbone, batch = setup
  model, params = backbone.model, backbone.params
  run = jax.jit(lambda p, b: teacher_forcing.teacher_forced(model, p, b))(params, batch)
  stack = blip2.lm_stack(model.config)
  assert run.hiddens.shape[:3] == (stack.num_layers, 4, backbone.fmt.target_length)
  lm = params['language_model']
  logits = stack.logits(lm, stack.final_features(lm, run.hiddens[-1]))
  want = model.apply({'params': params}, batch['image'], batch['input_ids'], batch['attention_mask'],
                     decoder_input_ids=batch['decoder_input_ids'],
                     decoder_attention_mask=batch['decoder_attention_mask']).logits
  mask = batch['loss_mask'].astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[mask], np.asarray(want)[mask], atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(run.token_valid, batch['decoder_attention_mask'].astype(bool))


def test_free_step_moves_the_exits_and_never_the_backbone(setup):
  config, backbone, batch = setup
  assert backbone.fmt.family == 't5' and backbone.num_layers == 3
  mesh = parallel.make_mesh(1)
  disc = free_step.make_discriminators(len(config.exits.layers), config.discriminator)
  step = free_step.make_free_step(backbone.model, config.exits.layers, config.free, disc, *pipeline.gan_optimizers(config),
                                  mesh)
  state = pipeline.init_free_state(config, backbone)
  copy = lambda tree: jax.tree.map(np.array, tree)
  params_before, state_before = copy(backbone.params), copy(state)
  for _ in range(2):
    state, metrics = step(state, backbone.params, batch)
  jax.tree.map(np.testing.assert_array_equal, copy(backbone.params), params_before)
  for name in ('exits', 'discriminators'):
    before, after = jax.tree.leaves(getattr(state_before, name)), jax.tree.leaves(copy(getattr(state, name)))
    assert any(not np.array_equal(a, b) for a, b in zip(after, before)), name
  assert exits_lib.num_exits(state.exits) == 2 and int(state.step) == 2
  for key in ('d_loss', 'g_loss', 'exit1/adv', 'exit1/ce', 'exit2/token_acc'):
    assert np.isfinite(metrics[key]), key
