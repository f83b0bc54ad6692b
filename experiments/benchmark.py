r"""Decoding throughput, full depth vs early exit: batch 1 and 8, compile times, peak memory.

  python experiments/benchmark.py --config=experiments/configs/vqa.py --workdir=workdir/vqa
  python experiments/benchmark.py --config=experiments/configs/vqa.py --workdir=workdir/vqa --memory_bound
  python experiments/benchmark.py --config=experiments/configs/vqa.py --workdir=workdir/vqa --opt2p7b \
      --opt2p7b_dtype=float32
  python experiments/benchmark.py --config=experiments/configs/vqa.py --workdir=workdir/vqa --accelerator
  python experiments/benchmark.py --config=experiments/configs/caption.py --workdir=workdir/caption \
      --batch_sizes=1 --patterns=0,1,3,03,003,000003 --op_counts

With a finished training run in WORKDIR the trained LM and exits are timed (also at the threshold
of WORKDIR/eval/summary.json, if evaluate.py ran); otherwise a random LM of the config's embedded
shape. Every speedup is reported against its weight-bytes ideal (`free_jax.inference.cost`), per call
and per decode step. ``--memory_bound`` adds a random 16-layer width-1024 OPT (0.8 GB, memory-bound on
a CPU) at prompts 64 and 512, batch 1 and 8. ``--opt2p7b`` adds a random BLIP-2-OPT-2.7B-shaped LM at
prompts 40 and 512 (batch 1), with the trained run's per-step exit decisions (evaluate.py's
``step_depths``) replayed on it. ``--patterns=0,03`` also times forced depth patterns, each repeated over
the N steps (here: every step at exit 0; exit 0 and the final layer alternating), and ``--op_counts`` counts
the XLA ops each call executes (CPU). ``--accelerator`` is the report for one GPU/TPU (bfloat16 2.7B shape,
batch 1, 8 and 32, the weight-read floor, the cost of the loop's predicates; a few minutes). Prompts are
random ids, with no EOS, so every row decodes exactly its N tokens. Writes WORKDIR/bench/summary.json.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from free_jax import cli
from free_jax.data import tokenizer as tokenizer_lib
from free_jax.eval import benchmark, evaluator
from free_jax.inference import confidence
from free_jax.models import blip2
from free_jax.training import pipeline

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file[:smoke].', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory; results go to WORKDIR/bench/summary.json.')
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['1', '8'], 'Decoding batch sizes.')
_OPT2P7B = flags.DEFINE_bool('opt2p7b', False, 'Also time a random BLIP-2-OPT-2.7B-shaped LM.')
_MEMORY_BOUND = flags.DEFINE_bool('memory_bound', False, 'Also time the memory-bound 16x1024 random OPT.')
_LAYER_SCALING = flags.DEFINE_bool('layer_scaling', False, 'Also time the LM truncated to its first 1..L layers '
                                    '(batch 1): what a layer costs where it sits on this machine.')
_ACCELERATOR = flags.DEFINE_bool('accelerator', False, 'The accelerator report (bfloat16 2.7B shape, batch 1/8/32).')
_PATTERNS = flags.DEFINE_list('patterns', [], 'Forced depth patterns to time, each repeated over the N steps: digits '
                              'E..0, the exit each step stops at (E: the final layer), e.g. 00,10,30 or 0,3,003.')
_OP_COUNTS = flags.DEFINE_bool('op_counts', False, 'Also count the XLA ops each call executes (CPU): the '
                               'machine-independent part of a call\'s cost at small widths.')
_LARGE_TOKENS = flags.DEFINE_integer('opt2p7b_new_tokens', 4, 'Tokens decoded by the 2.7B-shaped LM.')
_LARGE_DTYPE = flags.DEFINE_enum('opt2p7b_dtype', 'bfloat16', ['bfloat16', 'float32'],
                                 'Dtype of the 2.7B-shaped LM (CPUs have no bfloat16 matmul: XLA converts).')
flags.mark_flags_as_required(['config', 'workdir'])


def _model(config, workdir):
  """(description, stack, lm_params, exit_params, prompt_length, extra thresholds)."""
  try:
    backbone, exit_params = evaluator.load_run(config, workdir)
  except FileNotFoundError:
    model_config = pipeline.embedded_model_config(config.model.embedded, tokenizer_lib.embedded_tokenizer('opt'))
    stack, lm_params, exit_params = benchmark.random_model(model_config.text, config.exits.layers)
    fmt = pipeline.make_input_format(config, model_config, tokenizer_lib.embedded_tokenizer('opt'))
    return 'random embedded-shape LM', stack, lm_params, exit_params, fmt.num_query_tokens + fmt.prompt_length, ()
  thresholds = ()
  summary_path = os.path.join(workdir, evaluator.EVAL_DIR, evaluator.SUMMARY_FILE)
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      thresholds = (json.load(f)['threshold'],)
  elif config.eval.threshold >= 0:
    thresholds = (config.eval.threshold,)
  stack = blip2.lm_stack(backbone.model.config, backbone.model.dtype)
  prompt_length = 1 if backbone.model.config.is_encoder_decoder else backbone.fmt.num_query_tokens + backbone.fmt.prompt_length
  return 'trained run', stack, backbone.params['language_model'], exit_params, prompt_length, thresholds


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config, workdir = _CONFIG.value, _WORKDIR.value
  try:
    pipeline.validate_config(config)
    batch_sizes = [int(b) for b in _BATCH_SIZES.value]
    if not batch_sizes or min(batch_sizes) < 1:
      raise ValueError(f'--batch_sizes={_BATCH_SIZES.value} must be positive integers')
    description, stack, lm_params, exit_params, prompt_length, extra = _model(config, workdir)
    patterns = benchmark.periodic_schedules(_PATTERNS.value, config.eval.max_new_tokens, len(config.exits.layers))
  except ValueError as e:
    sys.exit(f'error: {e}')
  thresholds = (0.0, *extra, confidence.NEVER_EXIT)
  e = config.eval
  summary = {'model': description, 'exit_layers': list(config.exits.layers), 'num_layers': stack.num_layers,
             'backend': jax.default_backend(), 'device': jax.devices()[0].device_kind, 'results': []}
  for b in batch_sizes:
    summary['results'].append(benchmark.benchmark_decoding(
        stack, lm_params, exit_params, config.exits.layers, batch_size=b, prompt_length=prompt_length,
        max_new_tokens=e.max_new_tokens, repeats=e.timing_repeats, thresholds=thresholds, schedules=patterns,
        op_counts=_OP_COUNTS.value))
  if _LAYER_SCALING.value:
    try:
      summary['layer_scaling'] = benchmark.layer_scaling(stack, lm_params, batch_size=1, prompt_length=prompt_length,
                                                         max_new_tokens=e.max_new_tokens, repeats=e.timing_repeats)
    except ValueError as err:
      sys.exit(f'error: --layer_scaling: {err}')
  replays = benchmark.replay_schedules(_step_depths(workdir), e.max_new_tokens)
  replay_schedules = {name: r['schedule'] for name, r in replays.items()}
  if _MEMORY_BOUND.value:
    layers = (4, 8, 12)
    stack, lm_params, exit_params = benchmark.random_model(benchmark.memory_bound_shape(), layers)
    summary['memory_bound'] = [{'exit_layers': list(layers), **benchmark.benchmark_decoding(
        stack, lm_params, exit_params, layers, batch_size=b, prompt_length=p, max_new_tokens=17, repeats=3,
        prompt_vocab=8192)} for p in (64, 512) for b in (1, 8)]
    # Speculative decoding, an exit after layer 2 drafting 4 tokens a round (65 new tokens: 16 rounds): a
    # perfect drafter (the layers after it silenced, same compute) and the untrained random exit.
    draft = (2,)
    stack, lm_params, exit_params = benchmark.random_model(benchmark.memory_bound_shape(), draft)
    perfect = benchmark.identity_after(lm_params, exit_params, draft[0], 0)
    summary['memory_bound_speculative'] = [
        {'drafter': name, **benchmark.benchmark_speculative(
            stack, *params, draft, draft_exit=0, max_draft=4, batch_size=b, prompt_length=64, max_new_tokens=65,
            repeats=3, prompt_vocab=8192)}
        for name, params in (('perfect', perfect), ('random', (lm_params, exit_params))) for b in (1, 8)]
  if _OPT2P7B.value:
    layers = (8, 16, 24)
    stack, lm_params, exit_params = benchmark.random_model(benchmark.opt_2p7b_shape(), layers,
                                                           jnp.dtype(_LARGE_DTYPE.value))
    summary['opt2p7b'] = []
    for p in (40, 512):
      result = benchmark.benchmark_decoding(
          stack, lm_params, exit_params, layers, batch_size=1, prompt_length=p, max_new_tokens=_LARGE_TOKENS.value,
          repeats=1, thresholds=(0.0,), per_step=False,
          schedules={n: s[:_LARGE_TOKENS.value] for n, s in replay_schedules.items()} if p == 40 else None)
      if p == 40 and replays:
        result['replayed'] = benchmark.weighted_replay(result, replays)
      summary['opt2p7b'].append({'exit_layers': list(layers), 'dtype': _LARGE_DTYPE.value, **result})
  if _ACCELERATOR.value:
    summary['accelerator'] = benchmark.accelerator_report(replay_schedules, e.max_new_tokens)
  summary['peak_memory'] = benchmark.peak_memory()
  out_dir = os.path.join(workdir, 'bench')
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  rows = summary['results'] + summary.get('memory_bound', []) + summary.get('opt2p7b', [])
  if 'layer_scaling' in summary:
    print('first k layers, ms per call (marginal): ' + ', '.join(
        f"{r['layers']}: {1e3 * r['seconds']:.2f} ({1e3 * r['marginal_s']:+.2f})" for r in summary['layer_scaling']))
  for r in summary.get('memory_bound_speculative', []):
    v = r['speculative']['0.0']
    print(f"speculative ({r['drafter']} drafter) batch {r['batch_size']}: x{v['speedup']:.2f} of ideal x{v['ideal']:.2f}, "
          f"acceptance {v['acceptance']:.2f}, {v['tokens_per_round']:.2f} tokens/round, identical: {v['identical']}")
  for r in rows + summary.get('accelerator', {}).get('results', []):
    speeds = ', '.join(f"{t}: x{v['speedup']:.2f} of ideal x{v['ideal']:.2f} ({100 * v['share_of_ideal']:.0f}%)"
                       + (f", per step x{v['step_speedup']:.2f} ({100 * v['step_share_of_ideal']:.0f}%)"
                          if 'step_speedup' in v else '')
                       + (f", ops x{v['ops_ratio']:.2f}" if v.get('ops_ratio') else '') for t, v in r['early_exit'].items())
    step = f", step {1e3 * r['full']['step_s']:.1f} ms" if 'step_s' in r['full'] else ''
    print(f"batch {r['batch_size']} prompt {r['prompt_length']}: full {r['full']['tokens_per_s']:.1f} tok/s{step}; "
          f"{speeds}")


def _step_depths(workdir):
  """The trained run's per-call exit decisions on its test split (evaluate.py), if recorded."""
  path = os.path.join(workdir, evaluator.EVAL_DIR, evaluator.SUMMARY_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f).get('step_depths', [])


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
