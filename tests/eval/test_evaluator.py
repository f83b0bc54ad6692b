"""Tests for free_jax.eval.evaluator on an untrained tiny BLIP-2 with untrained exits."""

import functools
import json
import os

import jax
import pytest

from experiments.configs import vqa
from free_jax import exits as exits_lib
from free_jax.eval import evaluator
from free_jax.inference import confidence
from free_jax.training import pipeline

KEYS = ('quality_metric', 'quality_full', 'quality_early_exit', 'threshold', 'num_layers', 'mean_exit_layer',
        'exit_histogram', 'speedup_layers', 'speedup_decode_wallclock', 'speedup_end_to_end_wallclock',
        'per_exit_quality', 'overthinking_rate')


def _config(**eval_overrides):
  c = vqa.get_config('smoke')
  c.data.num_test, c.data.num_calibration = 6, 8
  c.eval.timing_repeats, c.eval.timing_examples, c.eval.max_new_tokens = 1, 3, 3
  for k, v in eval_overrides.items():
    c.eval[k] = v
  return c


@functools.cache
def _run():
  config = _config()
  backbone = pipeline.untrained_backbone(config)
  exit_params = exits_lib.init_exit_params(backbone.model.lm_stack(), backbone.params['language_model'],
                                           config.exits.layers, init='random', rng=jax.random.PRNGKey(1))
  return backbone, exit_params


def test_always_exit_summary(tmp_path):
  backbone, exit_params = _run()
  config = _config(threshold=0.0)
  summary = evaluator.early_exit_evaluation(config, str(tmp_path), backbone, exit_params)
  assert set(KEYS) <= set(summary)
  with open(tmp_path / 'eval' / 'summary.json') as f:
    assert json.load(f) == json.loads(json.dumps(summary))
  for png in ('quality_vs_speedup.png', 'per_layer_quality.png', 'exit_histogram.png', 'per_type_per_layer.png'):
    assert os.path.getsize(tmp_path / 'eval' / png) > 0
  first, layers = config.exits.layers[0], summary['num_layers']
  counts = summary['exit_histogram']
  assert counts[f'exit{first}'] == sum(counts.values()) > 0  # every token left at the first exit
  assert summary['mean_exit_layer'] == first
  # Every step ran `first` backbone layers and one exit layer.
  assert summary['speedup_layers'] == pytest.approx(layers / (first + 1))
  assert list(summary['per_exit_quality']) == [f'exit{l}' for l in config.exits.layers] + ['final']
  assert len(summary['per_layer_quality_naive']) == layers
  assert summary['per_layer_quality_naive'][-1] == summary['per_exit_quality']['final']
  assert 0 <= summary['overthinking_rate'] <= 1 and 0 <= summary['quality_early_exit'] <= 1
  assert summary['speedup_decode_wallclock'] > 0 and summary['timing']['decode']['repeats'] == 1
  assert summary['test_seed'] == config.data.test_seed
  assert [s['threshold'] for s in summary['sweep']] == pytest.approx([1.0, 0.999, 0.0])  # denser near 1
  # Per question type: counts add up, and the type-weighted means are the overall figures.
  per_type = summary['per_type']
  assert sum(t['count'] for t in per_type.values()) == config.data.num_test
  weighted = lambda f: sum(f(t) * t['count'] for t in per_type.values()) / config.data.num_test
  assert weighted(lambda t: t['full']) == pytest.approx(summary['quality_full'])
  assert weighted(lambda t: t['early_exit']) == pytest.approx(summary['quality_early_exit'])
  assert weighted(lambda t: t['per_layer_naive'][-1]) == pytest.approx(summary['per_layer_quality_naive'][-1])
  assert all(len(t['per_exit']) == len(config.exits.layers) + 1 and 0 < t['majority_answer'] <= 1
             for t in per_type.values())


def test_calibrated_threshold(tmp_path):
  backbone, exit_params = _run()
  config = _config(threshold=-1.0, risk_delta=0.2, risk_epsilon=0.2, num_calibration_thresholds=5,
                   num_sweep_thresholds=3)
  summary = evaluator.early_exit_evaluation(config, str(tmp_path), backbone, exit_params)
  calibration = summary['calibration']
  assert calibration['method'] == 'ltt' and calibration['n'] == config.data.num_calibration
  # The candidates are their own (denser) grid; the timed sweep has its own count.
  assert calibration['thresholds'] == pytest.approx([1.0, 0.999, 0.99, 0.9, 0.0])
  assert [s['threshold'] for s in summary['sweep']] == pytest.approx([1.0, 0.999, 0.0])
  assert summary['threshold'] == calibration['threshold']
  if calibration['index'] is None:
    assert summary['threshold'] == confidence.NEVER_EXIT
    assert summary['quality_early_exit'] == summary['quality_full'] and summary['test_risk'] == 0
  else:
    assert calibration['risks'][calibration['index']] <= config.eval.risk_delta
  assert 0 <= summary['test_risk'] <= 1


def test_bad_eval_config(tmp_path):
  backbone, exit_params = _run()
  with pytest.raises(ValueError, match="eval.confidence='margin'"):
    evaluator.early_exit_evaluation(_config(confidence='margin'), str(tmp_path), backbone, exit_params)
  for name in ('selection_examples', 'num_calibration_thresholds'):
    with pytest.raises(ValueError, match=f'eval.{name}=0 must be an integer'):
      evaluator.early_exit_evaluation(_config(**{name: 0}), str(tmp_path), backbone, exit_params)
  with pytest.raises(ValueError, match='exit_params hold 2 exits'):
    config = _config()
    config.exits.layers = (1, 2, 3)
    evaluator.early_exit_evaluation(config, str(tmp_path), backbone, exit_params)


def test_speculative_mode_is_chosen_on_calibration_and_lossless(tmp_path):
  backbone, exit_params = _run()
  config = _config(threshold=0.3, draft_lengths=(1, 2))
  summary = evaluator.early_exit_evaluation(config, str(tmp_path), backbone, exit_params)
  spec = summary['speculative']
  assert spec['identical_to_full']  # lossless whatever the (untrained) drafter
  assert spec['quality'] == summary['quality_full']
  assert len(spec['choices']) == 2 * len(config.exits.layers)
  assert spec['speedup_decode_wallclock'] > 0 and 0 <= spec['acceptance'] <= 1
  assert (spec['draft_exit'], spec['max_draft']) in {(c['draft_exit'], c['max_draft']) for c in spec['choices']}
  assert os.path.getsize(tmp_path / 'eval' / 'modes.png') > 0


def test_bad_draft_lengths_are_refused(tmp_path):
  backbone, exit_params = _run()
  with pytest.raises(ValueError, match=r'eval.draft_lengths=\(0,\) must be positive integers'):
    evaluator.early_exit_evaluation(_config(draft_lengths=(0,)), str(tmp_path), backbone, exit_params)
