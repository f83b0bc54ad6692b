"""Decoding throughput of full-depth vs early-exit decoding: tokens/s, compile time, peak memory.

The LM decoders (`inference.early_exit.EarlyExitDecoder`, and the exit-free one as the full-depth
baseline) run on random prompts of a fixed length for ``max_new_tokens`` tokens with no EOS, so every
row generates exactly N tokens and tokens/s = B * N / seconds. Full and early-exit passes alternate
(one warm-up each, then the median of `repeats`). Early exit is timed at several thresholds: 0
(every token leaves at the first exit: the upper bound of the speedup), > 1 (never: the cost of
carrying the exits) and any given ones (e.g. the calibrated threshold of a trained run).

`opt_2p7b_shape` builds a random BLIP-2-OPT-2.7B-shaped language model (bfloat16) for the
"large" measurement.
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from free_jax import exits as exits_lib
from free_jax.inference import confidence as conf_lib
from free_jax.inference.early_exit import EarlyExitDecoder, layer_cost
from free_jax.models.opt import OPTConfig, OPTStack

PyTree = Any


def opt_2p7b_shape(max_positions: int = 2048) -> OPTConfig:
  """The language model of BLIP-2-OPT-2.7B (facebook/opt-2.7b): 32 layers, width 2560."""
  return OPTConfig(vocab_size=50272, hidden_size=2560, num_hidden_layers=32, num_attention_heads=32,
                   ffn_dim=10240, max_position_embeddings=max_positions, word_embed_proj_dim=2560)


def peak_memory() -> dict:
  """Peak host RSS of this process and, where the backend reports it, peak device memory (bytes)."""
  out = {'host_peak_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    out['device_peak_bytes'] = int(stats['peak_bytes_in_use'])
  return out


def _seconds(run) -> float:
  start = time.perf_counter()
  jax.block_until_ready(run())
  return time.perf_counter() - start


def benchmark_decoding(stack, lm_params: PyTree, exit_params: PyTree, exit_layers: Sequence[int], *,
                       batch_size: int, prompt_length: int, max_new_tokens: int, repeats: int,
                       thresholds: Sequence[float] = (0.0, conf_lib.NEVER_EXIT), seed: int = 0,
                       prompt_vocab: int | None = None) -> dict:
  """Tokens/s of full-depth vs early-exit decoding on random prompt ids (see module docstring).

  Args:
    stack, lm_params: the LM (`lm_api.DecoderStack`, e.g. `OPTStack`) and its params.
    exit_params, exit_layers: the exits (`free_jax.exits`).
    batch_size, prompt_length, max_new_tokens: the decoded shape B, P, N.
    repeats: timed passes per decoder (after one warm-up).
    thresholds: early-exit thresholds to time.
    prompt_vocab: prompt ids are drawn from [0, prompt_vocab) (default: the embedding table size).

  Returns:
    {'batch_size', 'prompt_length', 'max_new_tokens', 'full': {...}, 'early_exit': {str(threshold): {...}}}
    with per decoder 'seconds' (median), 'tokens_per_s', 'compile_s' and, for early exit,
    'speedup' (full seconds / these), 'speedup_layers' and 'mean_exit_index'.
  """
  vocab = prompt_vocab or stack.config.vocab_size
  ids = np.asarray(jax.random.randint(jax.random.PRNGKey(seed), (batch_size, prompt_length), 0, vocab), np.int32)
  valid = np.ones((batch_size, prompt_length), bool)
  common = dict(max_new_tokens=max_new_tokens, eos_token_id=None)
  full = EarlyExitDecoder(stack, (), **common)
  early = EarlyExitDecoder(stack, tuple(exit_layers), **common)
  lm_params, exit_params = early.prepare(lm_params, exit_params)
  runs = {'full': lambda: full(lm_params, None, ids, valid).tokens}
  for t in thresholds:
    runs[str(float(t))] = lambda t=t: early(lm_params, exit_params, ids, valid, t).tokens
  compile_s = {'full': full.compile(lm_params, None, ids, valid)[1],
               'early_exit': early.compile(lm_params, exit_params, ids, valid)[1]}
  times = {name: [] for name in runs}
  for r in range(repeats + 1):
    for name, run in runs.items():
      seconds = _seconds(run)
      if r:  # pass 0 is the warm-up
        times[name].append(seconds)
  seconds = {name: statistics.median(ts) for name, ts in times.items()}
  tokens = batch_size * max_new_tokens
  result = {'batch_size': batch_size, 'prompt_length': prompt_length, 'max_new_tokens': max_new_tokens,
            'repeats': repeats,
            'full': {'seconds': seconds['full'], 'tokens_per_s': tokens / seconds['full'],
                     'compile_s': compile_s['full']},
            'early_exit': {}}
  for t in thresholds:
    out = early(lm_params, exit_params, ids, valid, t)
    depth = np.asarray(out.step_depth)[:int(out.num_steps)]
    name = str(float(t))
    result['early_exit'][name] = {
        'seconds': seconds[name], 'tokens_per_s': tokens / seconds[name], 'compile_s': compile_s['early_exit'],
        'speedup': seconds['full'] / seconds[name],
        'speedup_layers': depth.size * stack.num_layers / layer_cost(depth, early.exit_layers,
                                                                   stack.num_layers).sum(),
        'mean_exit_index': float(np.asarray(out.exit_index).mean())}
  return result


def random_model(config: OPTConfig, exit_layers: Sequence[int], dtype=jnp.float32, seed: int = 0):
  """(stack, lm_params, exit_params) of a random OPT LM with exits copied from the next layers.

  Both in the decoding form (`EarlyExitDecoder.prepare`), built one layer at a time: initialising
  a stacked 2.7B-parameter tree at once needs several times its size in temporaries.
  """
  stack = OPTStack(config, dtype)
  one_layer = OPTStack(dataclasses.replace(config, num_hidden_layers=1), dtype)
  keys = jax.random.split(jax.random.PRNGKey(seed), config.num_hidden_layers + 1)
  lm_params = jax.jit(one_layer.init)(keys[0])
  init_layer = jax.jit(lambda key: jax.tree.map(lambda x: x[0], one_layer.init(key)['layers']))
  lm_params['layers'] = tuple(init_layer(key) for key in keys[1:])
  exit_params = tuple({'layers': jax.tree.map(lambda x: x[None], lm_params['layers'][layer])}
                      for layer in exits_lib.validate_layers(exit_layers, config.num_hidden_layers))
  return stack, lm_params, exit_params
