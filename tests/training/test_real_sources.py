"""Real checkpoints and real datasets through training and evaluation, offline.

Tiny random HF BLIP-2 checkpoints (`tests.hf_fixtures`) with the embedded tokenizer saved beside them
(vocabulary 66 of the model's 100, like real BLIP-2 checkpoints whose embedding table is padded past
the tokenizer), trained for a few FREE steps and evaluated by the early-exit evaluator, on tfds
`clevr` / `coco_captions` under `tfds.testing.mock_data` and on a VQAv2 directory written here.
"""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from experiments.configs import blip2_opt_vqav2, blip2_t5_coco
from free_jax import exits as exits_lib
from free_jax.data import sources, tokenizer as tokenizer_lib
from free_jax.eval import evaluator
from free_jax.training import checkpoint, pipeline
from tests import hf_fixtures


def _checkpoint(path, text, **overrides):
  """A tiny random BLIP-2 checkpoint with a tokenizer of its LM family saved beside it."""
  hf_fixtures.save_tiny_blip2(path, text, **overrides)
  tokenizer_lib.embedded_tokenizer(text).save_pretrained(path)
  return str(path)


@pytest.fixture(scope='module')
def opt_path(tmp_path_factory):
  return _checkpoint(tmp_path_factory.mktemp('opt'), 'opt', num_hidden_layers=3)


@pytest.fixture(scope='module')
def t5_path(tmp_path_factory):
  return _checkpoint(tmp_path_factory.mktemp('t5'), 't5', num_decoder_layers=3)


def _config(module, pretrained_path, root, **data):
  """The experiment config shrunk to a few steps on a handful of examples."""
  c = module.get_config('smoke')
  with c.unlocked():
    c.model.pretrained_path, c.model.dtype = pretrained_path, 'float32'
    c.data.data_dir = str(root)
    c.data.num_train, c.data.num_calibration, c.data.num_test, c.data.label_fraction = 8, 4, 4, 0.5
    c.data.update(data)
    c.train.steps, c.train.batch_size, c.train.warmup_steps = 2, 4, 0
    c.train.log_every, c.train.checkpoint_every = 1, 2
    c.discriminator.hidden = 16
    c.eval.max_new_tokens, c.eval.timing_repeats, c.eval.timing_examples = 3, 1, 2
  return c


def _run(config, workdir):
  summary = pipeline.train_and_evaluate(config, str(workdir), evaluators=[evaluator.early_exit_evaluation])
  with checkpoint.Checkpointer(os.path.join(workdir, pipeline.CHECKPOINT_DIR)) as ckpt:
    assert ckpt.is_finished() and ckpt.latest_step() == config.train.steps
  assert not os.path.exists(os.path.join(workdir, pipeline.BACKBONE_DIR))  # pretrained: no backbone stage
  with open(os.path.join(workdir, evaluator.EVAL_DIR, evaluator.SUMMARY_FILE)) as f:
    written = json.load(f)
  assert written == json.loads(json.dumps(summary['early_exit_evaluation']))
  return summary, written


def test_opt_checkpoint_on_clevr(opt_path, tmp_path):
  config = _config(blip2_opt_vqav2, opt_path, tmp_path, source='clevr')
  with tfds.testing.mock_data(num_examples=3):
    summary, written = _run(config, tmp_path / 'run')
    backbone, exit_params = evaluator.load_run(config, str(tmp_path / 'run'))
  assert backbone.fmt.image_token_id == hf_fixtures.IMAGE_TOKEN_INDEX
  assert backbone.fmt.num_query_tokens == hf_fixtures.NUM_QUERY_TOKENS
  assert backbone.fmt.image_size == hf_fixtures.IMAGE_SIZE and backbone.fmt.family == 'opt'
  assert set(summary['accuracy']) == {'exit1', 'exit2', 'backbone'}
  assert written['quality_metric'] == 'exact_match' and written['num_layers'] == 3
  assert 0.0 <= written['quality_full'] <= 1.0 and written['calibration'] is not None
  assert exits_lib.num_exits(exit_params) == 2  # what experiments/evaluate.py restores


def test_t5_checkpoint_on_coco_captions(t5_path, tmp_path):
  config = _config(blip2_t5_coco, t5_path, tmp_path)
  with config.unlocked():
    config.eval.threshold = 0.5  # calibration is covered by the clevr run
  with tfds.testing.mock_data(num_examples=4):
    _, written = _run(config, tmp_path / 'run')
    backbone = pipeline.load_backbone(config, str(tmp_path / 'run'))
  assert backbone.fmt.family == 't5' and backbone.fmt.decoder_start_id == 0  # the checkpoint's start id
  assert written['quality_metric'] == 'CIDEr' and np.isfinite(written['quality_full'])
  assert written['num_layers'] == 3 and written['exit_layers'] == [1, 2]


def _write_vqav2(root, split, image_ids, rng):
  """The official VQAv2 layout with two questions per image (answers: one word, ten annotators)."""
  os.makedirs(root / f'{split}2014', exist_ok=True)
  questions, annotations = [], []
  for image_id in image_ids:
    pixels = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / f'{split}2014' / f'COCO_{split}2014_{image_id:012d}.jpg')
    for k, (question, answer) in enumerate((('what colour is it?', 'red'), ('is there a circle?', 'yes'))):
      qid = image_id * 1000 + k
      questions.append({'image_id': image_id, 'question': question, 'question_id': qid})
      answers = [{'answer': answer if i < 7 else 'no', 'answer_confidence': 'yes', 'answer_id': i + 1}
                 for i in range(10)]
      annotations.append({'question_id': qid, 'image_id': image_id, 'answers': answers,
                          'multiple_choice_answer': answer, 'answer_type': 'other',
                          'question_type': question.split()[0]})
  with open(root / f'v2_OpenEnded_mscoco_{split}2014_questions.json', 'w') as f:
    json.dump({'questions': questions}, f)
  with open(root / f'v2_mscoco_{split}2014_annotations.json', 'w') as f:
    json.dump({'annotations': annotations}, f)


@pytest.fixture(scope='module')
def vqav2_root(tmp_path_factory):
  root = tmp_path_factory.mktemp('vqav2')
  rng = np.random.default_rng(0)
  _write_vqav2(root, 'train', range(1, 6), rng)
  _write_vqav2(root, 'val', range(100, 105), rng)
  return root


def test_vqav2_splits_are_disjoint_and_seeds_only_reorder(vqav2_root, opt_path):
  config = _config(blip2_opt_vqav2, opt_path, vqav2_root)
  load = lambda split, n, c=config: sources.load_examples(c, split, n, 8)
  test, calibration = load('test', 4), load('calibration', 4)
  assert test['image'].shape == (4, 8, 8, 3) and test['image'].dtype == np.uint8
  assert len(test['answers'][0]) == 10 and 'captions' not in test
  pairs = lambda e: list(zip(e['question'], map(bytes, e['image'])))
  assert not set(pairs(test)) & set(pairs(calibration))
  with config.unlocked():
    config.data.test_seed += 1
  reordered = load('test', 4)
  assert set(pairs(reordered)) == set(pairs(test)) and pairs(reordered) != pairs(test)
  with pytest.raises(ValueError, match=r"split 'train' .* has only 10 examples, 11 requested"):
    load('train', 11)


def test_vqav2_from_disk_trains_and_evaluates(vqav2_root, opt_path, tmp_path):
  config = _config(blip2_opt_vqav2, opt_path, vqav2_root)
  with config.unlocked():
    config.eval.threshold = 0.5  # calibration is covered by the clevr run
  _, written = _run(config, tmp_path / 'run')
  assert written['quality_metric'] == 'exact_match' and 0.0 <= written['quality_early_exit'] <= 1.0


@pytest.mark.parametrize('override, message', [
    (dict(data_dir=''), r"data.source='vqav2' needs data.data_dir"),
    (dict(data_dir='/nonexistent/vqav2'), r"data.data_dir='/nonexistent/vqav2' is not a directory"),
    (dict(task='caption'), r"data.task='caption' is not available from data.source='vqav2'"),
    (dict(source='imagenet'), r"data.source='imagenet'; expected one of"),
])
def test_bad_data_fields_fail_before_anything_runs(override, message, opt_path, vqav2_root):
  config = _config(blip2_opt_vqav2, opt_path, vqav2_root, **override)
  with pytest.raises(ValueError, match=message):
    pipeline.validate_config(config)


def test_pretrained_path_and_exit_layers_are_checked(opt_path, vqav2_root):
  config = _config(blip2_opt_vqav2, '/nonexistent/ckpt', vqav2_root)
  with pytest.raises(ValueError, match=r"model.pretrained_path='/nonexistent/ckpt' is not a directory"):
    pipeline.validate_config(config)
  config = _config(blip2_opt_vqav2, opt_path, vqav2_root)
  with config.unlocked():
    config.exits.layers = (1, 3)
  with pytest.raises(ValueError, match=r'exits.layers=\(1, 3\).*\[1, 2\].*3 LM layers'):
    pipeline.validate_config(config)
