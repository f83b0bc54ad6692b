r"""Decoding throughput, full depth vs early exit: batch 1 and 8, compile times, peak memory.

  python experiments/benchmark.py --config=experiments/configs/vqa.py --workdir=workdir/vqa
  python experiments/benchmark.py --config=experiments/configs/vqa.py:smoke --workdir=/tmp/b --opt2p7b

With a finished training run in WORKDIR the trained LM and exits are timed (also at the threshold
of WORKDIR/eval/summary.json, if evaluate.py ran); otherwise a random LM of the config's embedded
shape. ``--opt2p7b`` adds a random BLIP-2-OPT-2.7B-shaped LM (batch 1, a few tokens; 5.3 GB of
parameters in bfloat16, 10.6 GB in float32). Prompts are random ids of the model's prompt length, with no EOS, so
every row decodes exactly eval.max_new_tokens tokens. Writes WORKDIR/bench/summary.json.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from free_jax.data import tokenizer as tokenizer_lib
from free_jax.eval import benchmark, evaluator
from free_jax.inference import confidence
from free_jax.models import blip2
from free_jax.training import pipeline

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file[:smoke].', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory; results go to WORKDIR/bench/summary.json.')
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['1', '8'], 'Decoding batch sizes.')
_OPT2P7B = flags.DEFINE_bool('opt2p7b', False, 'Also time a random BLIP-2-OPT-2.7B-shaped LM (bfloat16).')
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
  except ValueError as e:
    sys.exit(f'error: {e}')
  thresholds = (0.0, *extra, confidence.NEVER_EXIT)
  e = config.eval
  summary = {'model': description, 'exit_layers': list(config.exits.layers), 'num_layers': stack.num_layers,
             'backend': jax.default_backend(), 'results': []}
  for b in batch_sizes:
    summary['results'].append(benchmark.benchmark_decoding(
        stack, lm_params, exit_params, config.exits.layers, batch_size=b, prompt_length=prompt_length,
        max_new_tokens=e.max_new_tokens, repeats=e.timing_repeats, thresholds=thresholds))
  if _OPT2P7B.value:
    large = benchmark.opt_2p7b_shape()
    layers = (8, 16, 24)
    stack, lm_params, exit_params = benchmark.random_model(large, layers, jnp.dtype(_LARGE_DTYPE.value))
    summary['opt2p7b'] = {'exit_layers': list(layers), 'dtype': _LARGE_DTYPE.value, **benchmark.benchmark_decoding(
        stack, lm_params, exit_params, layers, batch_size=1, prompt_length=32 + 8,
        max_new_tokens=_LARGE_TOKENS.value, repeats=2, thresholds=(0.0, confidence.NEVER_EXIT))}
  summary['peak_memory'] = benchmark.peak_memory()
  out_dir = os.path.join(workdir, 'bench')
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  for r in summary['results'] + ([summary['opt2p7b']] if 'opt2p7b' in summary else []):
    speeds = ', '.join(f"t={t}: {v['tokens_per_s']:.1f} tok/s (x{v['speedup']:.2f})" for t, v in r['early_exit'].items())
    print(f"batch {r['batch_size']}: full {r['full']['tokens_per_s']:.1f} tok/s; early exit {speeds}")


if __name__ == '__main__':
  app.run(main)
