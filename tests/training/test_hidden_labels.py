"""Labels the exit stage may not use stay hidden, and the stages' data never overlap."""

import hashlib
import os

import jax
import numpy as np
import pytest

from experiments.configs import vqa
from free_jax import teacher_forcing
from free_jax.data import batching, sources
from free_jax.data import tokenizer as tokenizer_lib
from free_jax.training import free_step, hidden_labels, parallel, pipeline


@pytest.fixture(scope='module')
def run():
  config = vqa.get_config('smoke')
  with config.unlocked():
    config.data.num_train, config.data.label_fraction = 16, 0.25
    config.train.warmup_steps = 0
  backbone = pipeline.untrained_backbone(config)
  model = backbone.model
  disc = free_step.make_discriminators(len(config.exits.layers), config.discriminator)
  step = free_step.make_free_step(model, config.exits.layers, config.free, disc, *pipeline.gan_optimizers(config),
                                  parallel.make_mesh(1))
  return config, backbone, step


def _exit_examples(config, backbone, workdir, edit=None):
  """`hidden_labels.exit_stage_examples` on the run's training examples, `edit(examples)` applied first."""
  d = config.data
  examples = pipeline.load_examples(config, 'train', d.num_train, backbone.fmt.image_size)
  if edit:
    edit(examples)
  labelled = batching.label_subset(d.num_train, d.label_fraction, d.seed)
  return hidden_labels.exit_stage_examples(str(workdir), backbone, examples, labelled, 'vqa', {'seed': d.seed})


def _rewrite_answer(rows):
  def edit(examples):
    examples['answer'] = [('yes' if a != 'yes' else 'no') if i in rows else a
                          for i, a in enumerate(examples['answer'])]
  return edit


def test_unlabelled_rows_are_taught_on_the_backbone_output_and_their_labels_change_nothing(run, tmp_path):
  config, backbone, step = run
  base = _exit_examples(config, backbone, tmp_path / 'a')
  labelled = base['labelled']
  assert labelled.sum() == 4
  hidden, shown = np.flatnonzero(~labelled), np.flatnonzero(labelled)
  edited = _exit_examples(config, backbone, tmp_path / 'b', _rewrite_answer(set(hidden.tolist())))
  relabelled = _exit_examples(config, backbone, tmp_path / 'c', _rewrite_answer({int(shown[0])}))

  batch = lambda ex: batching.train_batch(ex, backbone.tokenizer, backbone.fmt, 'vqa')
  b0, b1, b2 = batch(base), batch(edited), batch(relabelled)
  for key in b0:
    np.testing.assert_array_equal(b0[key], b1[key], err_msg=key)
  assert not np.array_equal(b0['labels'], b2['labels'])  # the test can fail: labelled rows are read

  # The unlabelled rows' targets are the backbone's own greedy output: its teacher-forced argmax.
  run_tf = teacher_forcing.exit_predictions(backbone.model, backbone.params,
                                            pipeline.init_free_state(config, backbone).exits,
                                            config.exits.layers, b0)[-1]
  # (A random backbone never says EOS: its targets end in the EOS of truncation, which is not its argmax.)
  mask = np.asarray(teacher_forcing.target_mask(b0)) & (b0['labels'] != backbone.fmt.eos_id)
  rows = ~b0['labelled']
  assert mask[rows].sum() >= rows.sum()
  np.testing.assert_array_equal(np.asarray(run_tf)[rows][mask[rows]], b0['labels'][rows][mask[rows]])
  # And no ground truth of an unlabelled row is left in the examples.
  truth = pipeline.load_examples(config, 'train', config.data.num_train, backbone.fmt.image_size)['answer']
  assert all(base['answer'][i] == tokenizer_lib.decode(backbone.tokenizer, [base['target_ids'][i]])[0] for i in hidden)
  assert [base['answer'][i] for i in shown] == [truth[i] for i in shown]

  state = pipeline.init_free_state(config, backbone)
  (s0, m0), (s1, m1) = step(state, backbone.params, b0), step(pipeline.init_free_state(config, backbone),
                                                               backbone.params, b1)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get((s0, m0)), jax.device_get((s1, m1)))


def test_backbone_targets_are_cached_with_the_run_and_remade_when_their_inputs_change(run, tmp_path):
  config, backbone, _ = run
  first = _exit_examples(config, backbone, tmp_path)
  path = tmp_path / hidden_labels.TARGETS_FILE
  stamp = os.stat(path).st_mtime_ns
  again = _exit_examples(config, backbone, tmp_path)
  assert os.stat(path).st_mtime_ns == stamp and again['target_ids'] == first['target_ids']
  other = jax.tree.map(lambda x: x * 0.5, backbone.params)
  _exit_examples(config, backbone.__class__(backbone.model, other, backbone.tokenizer, backbone.fmt), tmp_path)
  assert os.stat(path).st_mtime_ns != stamp  # other weights: decoded again


def test_the_exit_stage_reads_its_examples_through_hidden_labels(run, tmp_path):
  config, backbone, _ = run
  examples = pipeline.exit_training_examples(config, str(tmp_path), backbone)
  assert examples['labelled'].sum() == 4 and (tmp_path / hidden_labels.TARGETS_FILE).exists()
  assert sum(t is not None for t in examples['target_ids']) == 12


def test_hide_labels_needs_a_target_for_every_unlabelled_row(run):
  _, backbone, _ = run
  examples = {'image': np.zeros((2, 8, 8, 3), np.uint8), 'answer': ['yes', 'no'], 'question': ['a', 'b']}
  with pytest.raises(ValueError, match='no backbone target for 1 unlabelled rows'):
    hidden_labels.hide_labels(examples, np.array([True, False]), {}, 'vqa', backbone.tokenizer)


def _digests(examples):
  return {hashlib.sha256(image.tobytes()).hexdigest() for image in examples['image']}


@pytest.mark.parametrize('seed,test_seed', [(0, 1), (3, 3)])
def test_backbone_exit_calibration_and_test_data_are_disjoint(seed, test_seed):
  config = vqa.get_config('smoke')
  with config.unlocked():
    config.data.seed, config.data.test_seed = seed, test_seed
  splits = {s: _digests(sources.load_examples(config, s, 512, 64)) for s in sources.SPLITS}
  for a in sources.SPLITS:
    for b in sources.SPLITS:
      if a < b:
        assert not splits[a] & splits[b], (a, b)
  with config.unlocked():
    config.data.test_seed = test_seed + 1
  assert not _digests(sources.load_examples(config, 'test', 512, 64)) & splits['test']  # a fresh test split
