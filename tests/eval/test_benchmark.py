"""Tests for free_jax.eval.benchmark and the weight-bytes cost model (free_jax.inference.cost)."""

import numpy as np
import pytest

from free_jax.eval import benchmark
from free_jax.inference import confidence
from free_jax.inference.cost import WeightBytes
from free_jax.inference.early_exit import EarlyExitDecoder
from free_jax.models.opt import OPTConfig
from free_jax.models.t5 import T5Stack
from free_jax.models.t5_layers import T5Config

TINY = OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, ffn_dim=64,
                 max_position_embeddings=64, word_embed_proj_dim=32)
EXITS = (1, 2)


def test_weight_bytes_count_layers_exits_and_heads():
  stack, lm_params, exit_params = benchmark.random_model(TINY, EXITS)
  w = WeightBytes.of(lm_params, exit_params, EXITS)
  layer = 4 * (4 * (32 * 32 + 32) + (32 * 64 + 64) + (64 * 32 + 32) + 2 * 2 * 32)  # float32 attention, MLP, norms
  assert w.segments == (layer, layer, 2 * layer) and w.exits == (layer, layer)
  head = 4 * (64 * 32 + 2 * 32)  # float32 tied embedding + final norm
  assert w.head == head
  assert w.full_step == 4 * layer + head
  assert w.step(0) == layer + layer + head                  # segment 0, exit 0 and its head
  assert w.step(2) == 4 * layer + 2 * layer + 3 * head      # never: every layer, both exits, three heads
  assert w.ideal_speedup(0) == pytest.approx(w.full_step / w.step(0))
  # A decode's bytes follow its passes: schedule [0, 2, 0] with the prompt caught up at step 1.
  decoder = EarlyExitDecoder(stack, EXITS, max_new_tokens=3, eos_token_id=None)
  prompt, valid = np.ones((1, 5), np.int32), np.ones((1, 5), bool)
  out = decoder(*decoder.prepare(lm_params, exit_params), prompt, valid, depth_schedule=[0, 2, 0])
  np.testing.assert_array_equal(out.segment_passes, [3, 2, 2])  # prompt pass + the step's own, per deep segment
  expected = 3 * (layer + layer) + 2 * (layer + layer) + 2 * (2 * layer) + (1 + 3 + 1) * head
  assert w.decode(out.segment_passes, out.step_depth, int(out.num_steps)) == expected


def test_benchmark_reports_speedups_against_the_ideal():
  stack, lm_params, exit_params = benchmark.random_model(TINY, EXITS)
  result = benchmark.benchmark_decoding(stack, lm_params, exit_params, EXITS, batch_size=2, prompt_length=4,
                                        max_new_tokens=3, repeats=1, schedules={'replay': [0, 2, 1]})
  assert 'step_s' in result['full']  # a difference of timings: its sign is not behaviour
  always, never, replay = (result['early_exit'][k] for k in ('0.0', str(confidence.NEVER_EXIT), 'replay'))
  w = WeightBytes(**{k: tuple(v) if isinstance(v, list) else v for k, v in result['weight_bytes'].items()})
  assert always['step_ideal'] == pytest.approx(w.ideal_speedup(0))
  assert never['step_ideal'] == pytest.approx(w.ideal_speedup(len(EXITS)))
  assert replay['step_depths'] == [0, 2, 1]
  for entry in (always, never, replay):
    assert entry['share_of_ideal'] == pytest.approx(entry['speedup'] / entry['ideal'])


def test_op_counts_follow_the_depth_and_patterns_repeat():
  stack, lm_params, exit_params = benchmark.random_model(TINY, EXITS)
  patterns = benchmark.periodic_schedules(['0', '02'], 3, len(EXITS))
  assert patterns == {'0': [0, 0, 0], '02': [0, 2, 0]}
  result = benchmark.benchmark_decoding(stack, lm_params, exit_params, EXITS, batch_size=1, prompt_length=4,
                                        max_new_tokens=3, repeats=1, thresholds=(0.0, confidence.NEVER_EXIT),
                                        schedules=patterns, per_step=False, op_counts=True)
  ops = {name: entry['ops_per_call'] for name, entry in result['early_exit'].items()}
  assert ops['0'] == ops['0.0']  # the pattern and the threshold make the same decisions
  # Exit 0 everywhere runs fewer ops than the exit-free decoder; never exiting runs more (the exits on top).
  assert ops['0'] < result['full']['ops_per_call'] < ops[str(confidence.NEVER_EXIT)]
  assert ops['0'] < ops['02'] < ops[str(confidence.NEVER_EXIT)]
  assert result['early_exit']['0']['ops_ratio'] == pytest.approx(result['full']['ops_per_call'] / ops['0'])
  with pytest.raises(ValueError, match="schedule pattern '03' must be digits 0..2"):
    benchmark.periodic_schedules(['03'], 3, len(EXITS))


def test_replayed_schedules_and_accelerator_report():
  replays = benchmark.replay_schedules([[0, 3], [0, 3], [3, 0, 1], [0, 3]], max_new_tokens=3, top=2)
  assert replays == {'replay_0-3': {'schedule': [0, 3, -1], 'count': 3},
                     'replay_3-0-1': {'schedule': [3, 0, 1], 'count': 1}}
  schedules = {'replay_0-2': [0, 2, -1], 'replay_2-0-1': [2, 0, 1]}
  report = benchmark.accelerator_report(schedules, 3, batch_sizes=(1,), prompt_length=4, new_tokens=3,
                                        model=TINY, exit_layers=EXITS, dtype=np.float32)
  result, = report['results']
  assert set(result['replayed']) == set(schedules)
  assert set(report['loop_step_s']) == {'full', 'one_exit_never'}
  weighted = benchmark.weighted_replay({'full': result['full'], 'early_exit': result['replayed']},
                                       {n: {'schedule': s, 'count': 1} for n, s in schedules.items()})
  assert weighted['share_of_ideal'] == pytest.approx(weighted['speedup'] / weighted['ideal'])


def test_layer_scaling_times_every_prefix_of_the_lm_and_refuses_other_families():
  stack, lm_params, _ = benchmark.random_model(TINY, EXITS)
  rows = benchmark.layer_scaling(stack, lm_params, batch_size=1, prompt_length=4, max_new_tokens=2, repeats=1)
  assert [r['layers'] for r in rows] == [1, 2, 3, 4] and all(r['seconds'] > 0 for r in rows)
  assert sum(r['marginal_s'] for r in rows) == pytest.approx(rows[-1]['seconds'])
  with pytest.raises(ValueError, match='layer scaling truncates an OPT LM; got T5Stack'):
    benchmark.layer_scaling(T5Stack(T5Config()), {}, batch_size=1, prompt_length=1, max_new_tokens=1, repeats=1)
