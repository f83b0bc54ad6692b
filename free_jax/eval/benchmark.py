"""Decoding throughput of full-depth vs early-exit decoding against the weight-bytes ideal (`cost`).

The LM decoders (`inference.early_exit.EarlyExitDecoder`, and the exit-free one as the full-depth
baseline) run on random prompts of a fixed length for ``max_new_tokens`` tokens with no EOS, so every
row generates exactly N tokens and tokens/s = B * N / seconds. Full and early-exit passes alternate
(one warm-up each, then the median of `repeats`). Early exit is timed at several thresholds: 0
(every token leaves at the first exit: the upper bound of the speedup), > 1 (never: the cost of
carrying the exits), any given ones (e.g. the calibrated threshold of a trained run), and replayed
depth schedules (a trained run's per-step decisions on another model shape).

`opt_2p7b_shape` builds a random BLIP-2-OPT-2.7B-shaped language model (bfloat16) for the
"large" measurement, `memory_bound_shape` the CPU one, `accelerator_report` the one for a GPU or TPU.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import re
import resource
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from free_jax import exits as exits_lib
from free_jax.inference import confidence as conf_lib
from free_jax.inference import cost
from free_jax.inference.early_exit import EarlyExitDecoder, layer_cost
from free_jax.models.opt import OPTConfig, OPTStack

PyTree = Any


def opt_2p7b_shape(max_positions: int = 2048) -> OPTConfig:
  """The language model of BLIP-2-OPT-2.7B (facebook/opt-2.7b): 32 layers, width 2560."""
  return OPTConfig(vocab_size=50272, hidden_size=2560, num_hidden_layers=32, num_attention_heads=32,
                   ffn_dim=10240, max_position_embeddings=max_positions, word_embed_proj_dim=2560)


def memory_bound_shape() -> OPTConfig:
  """A random OPT LM too large for CPU caches (0.8 GB float32), so a decode step is memory-bound as on an
  accelerator: 16 layers, width 1024, vocabulary 8192 (exits after layers 4, 8, 12)."""
  return OPTConfig(vocab_size=8192, hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, ffn_dim=4096,
                   max_position_embeddings=1024, word_embed_proj_dim=1024)


# Memory bandwidth (GB/s) of common accelerators, for the weight-read floor of a decode step.
BANDWIDTH_GBPS = {'H200': 4800, 'H100': 3350, 'A100': 2039, 'L4': 300, 'TPU v4': 1200, 'TPU v5 lite': 819,
                  'TPU v5e': 819, 'TPU v5p': 2765, 'TPU v6 lite': 1640, 'T4': 320}


def device_bandwidth_gbps() -> float | None:
  """The first device's memory bandwidth from `BANDWIDTH_GBPS` by its kind, None when unknown."""
  kind = jax.devices()[0].device_kind
  return next((v for k, v in BANDWIDTH_GBPS.items() if k.lower() in kind.lower()), None)


def replay_schedules(step_depths: Sequence[Sequence[int]], max_new_tokens: int, top: int = 4) -> dict:
  """The `top` most frequent per-call depth sequences of a run, padded to N with -1 (steps not run).

  Returns {name: {'schedule': int[N], 'count': n}}.
  """
  counts = {}
  for depths in step_depths:
    key = tuple(int(d) for d in depths) + (-1,) * (max_new_tokens - len(depths))
    counts[key] = counts.get(key, 0) + 1
  ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
  return {'replay_' + '-'.join(str(d) for d in key if d >= 0): {'schedule': list(key), 'count': n}
          for key, n in ranked}


def weighted_replay(result: dict, replays: dict) -> dict:
  """Speedup and ideal of a run's replayed schedules, weighted by how often the run made each."""
  names = [n for n in replays if n in result['early_exit']]
  weight = lambda n: replays[n]['count']
  full = sum(weight(n) for n in names) * result['full']['seconds']
  mode = sum(weight(n) * result['early_exit'][n]['seconds'] for n in names)
  ideal = sum(weight(n) for n in names) / sum(weight(n) / result['early_exit'][n]['ideal'] for n in names)
  return {'speedup': full / mode, 'ideal': ideal, 'share_of_ideal': full / mode / ideal,
          'schedules': {n: replays[n] for n in names}}


def peak_memory() -> dict:
  """Peak host RSS of this process and, where the backend reports it, peak device memory (bytes)."""
  out = {'host_peak_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    out['device_peak_bytes'] = int(stats['peak_bytes_in_use'])
  return out


def periodic_schedules(patterns: Sequence[str], max_new_tokens: int, num_exits: int) -> dict:
  """Forced depth schedules from digit patterns repeated over the N steps ('03': exit 0, then the final
  layer, alternating; E = the final layer): {pattern: int[N]}. Raises ValueError naming a bad pattern."""
  schedules = {}
  for pattern in patterns:
    if not pattern or not pattern.isdigit() or max(int(c) for c in pattern) > num_exits:
      raise ValueError(f'schedule pattern {pattern!r} must be digits 0..{num_exits} (exit index; {num_exits} = the '
                       'final layer)')
    schedules[pattern] = [int(pattern[t % len(pattern)]) for t in range(max_new_tokens)]
  return schedules


def instruction_names(compiled) -> frozenset:
  """The names of a compiled executable's HLO instructions (what `executed_ops` counts in a trace)."""
  return frozenset(re.findall(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=', compiled.as_text(), re.M))


def executed_ops(run, names: frozenset, calls: int = 2) -> float | None:
  """XLA ops one call of `run` executes, on CPU (mean over `calls` profiled calls); None on other backends.

  On XLA:CPU every executed op (a fusion, a dot, a conditional, each pass of a loop body's ops) costs
  microseconds whatever its size, so at small widths a call's time follows this count more than its FLOPs;
  unlike a timing it does not drift with the machine. Counted from a `jax.profiler` trace: the events named
  after an instruction of the executable `run` calls (`names`, from `instruction_names`).
  """
  if jax.default_backend() != 'cpu':
    return None
  jax.block_until_ready(run())
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(directory):
      for _ in range(calls):
        jax.block_until_ready(run())
    path, = glob.glob(os.path.join(directory, '**', '*.trace.json.gz'), recursive=True)
    with gzip.open(path) as f:
      events = json.load(f)['traceEvents']
  return sum(e.get('ph') == 'X' and e.get('name') in names for e in events) / calls


def _seconds(run) -> float:
  start = time.perf_counter()
  jax.block_until_ready(run())
  return time.perf_counter() - start


def _random_prompt(stack, batch_size: int, prompt_length: int, seed: int, prompt_vocab: int | None):
  """(int32[B, P] random ids from [0, prompt_vocab or the vocabulary), bool[B, P] all valid)."""
  vocab = prompt_vocab or stack.vocab_size
  ids = np.asarray(jax.random.randint(jax.random.PRNGKey(seed), (batch_size, prompt_length), 0, vocab), np.int32)
  return ids, np.ones((batch_size, prompt_length), bool)


def interleaved_medians(runs: dict, repeats: int) -> dict:
  """Median seconds of each run, timed round-robin after one warm-up pass (machine speed drifts)."""
  times = {name: [] for name in runs}
  for r in range(repeats + 1):
    for name, run in runs.items():
      seconds = _seconds(run)
      if r:
        times[name].append(seconds)
  return {name: statistics.median(ts) for name, ts in times.items()}


def benchmark_decoding(stack, lm_params: PyTree, exit_params: PyTree, exit_layers: Sequence[int], *,
                       batch_size: int, prompt_length: int, max_new_tokens: int, repeats: int,
                       thresholds: Sequence[float] = (0.0, conf_lib.NEVER_EXIT),
                       schedules: dict | None = None, seed: int = 0, prompt_vocab: int | None = None,
                       per_step: bool = True, op_counts: bool = False) -> dict:
  """Full-depth vs early-exit decoding on random prompt ids, against the weight-bytes ideal (`cost`).

  Args:
    stack, lm_params: the LM (`lm_api.DecoderStack`, e.g. `OPTStack`) and its params.
    exit_params, exit_layers: the exits (`free_jax.exits`).
    batch_size, prompt_length, max_new_tokens: the decoded shape B, P, N.
    repeats: timed passes per decoder (after one warm-up), interleaved.
    thresholds: early-exit thresholds to time (0: every token at exit 0; > 1: never exit).
    schedules: name -> int[N] depth schedule to replay (`EarlyExitDecoder.__call__`'s depth_schedule).
    prompt_vocab: prompt ids are drawn from [0, prompt_vocab) (default: the embedding table size).
    per_step: also time 1-token calls, so a decode step's cost is (time of N tokens - time of 1) / (N - 1).
    op_counts: also count the XLA ops a call executes (`executed_ops`; CPU only, else None).

  Returns:
    {'batch_size', 'prompt_length', 'max_new_tokens', 'repeats', 'full': {...}, 'early_exit': {name: {...}}}:
    per decoder the median 'seconds' of a call, 'tokens_per_s', 'compile_s' and, with per_step, 'step_s';
    per early-exit setting also 'speedup' (full / these seconds), 'ideal' (full / these weight bytes, the
    whole call), 'share_of_ideal', the same per decode step ('step_speedup', 'step_ideal',
    'step_share_of_ideal'), 'speedup_layers' and 'mean_exit_index'; with op_counts, per decoder 'ops_per_call'
    and per early-exit setting 'ops_ratio' (full's ops / these).
  """
  ids, valid = _random_prompt(stack, batch_size, prompt_length, seed, prompt_vocab)
  lengths = (max_new_tokens, 1) if per_step and max_new_tokens > 1 else (max_new_tokens,)
  full = {n: EarlyExitDecoder(stack, (), max_new_tokens=n, eos_token_id=None) for n in lengths}
  early = {n: EarlyExitDecoder(stack, tuple(exit_layers), max_new_tokens=n, eos_token_id=None) for n in lengths}
  lm_params, exit_params = early[max_new_tokens].prepare(lm_params, exit_params)
  weights = cost.WeightBytes.of(lm_params, exit_params, tuple(exit_layers))
  settings = {str(float(t)): dict(thresholds=t) for t in thresholds}
  for name, schedule in (schedules or {}).items():
    settings[name] = dict(depth_schedule=np.asarray(schedule, np.int32))

  def decode(n, setting):
    kwargs = {k: (v[:n] if k == 'depth_schedule' else v) for k, v in setting.items()}
    return early[n](lm_params, exit_params, ids, valid, **kwargs)

  call = lambda n, setting: lambda: decode(n, setting).tokens

  runs = {('full', n): (lambda n=n: full[n](lm_params, None, ids, valid).tokens) for n in lengths}
  runs.update({(name, n): call(n, setting) for name, setting in settings.items() for n in lengths})
  compiled = {'full': full[max_new_tokens].compile(lm_params, None, ids, valid),
              'early_exit': early[max_new_tokens].compile(lm_params, exit_params, ids, valid)}
  compile_s = {name: c[1] for name, c in compiled.items()}
  seconds = interleaved_medians(runs, repeats)
  if op_counts:  # each executable's HLO parsed once, not once per setting it runs
    names = {kind: instruction_names(c[0]) for kind, c in compiled.items()}
    ops = lambda name, kind: executed_ops(runs[(name, max_new_tokens)], names[kind])

  def timing(name):
    out = {'seconds': seconds[(name, max_new_tokens)],
           'tokens_per_s': batch_size * max_new_tokens / seconds[(name, max_new_tokens)]}
    if len(lengths) == 2:
      out['step_s'] = (seconds[(name, max_new_tokens)] - seconds[(name, 1)]) / (max_new_tokens - 1)
    return out

  result = {'batch_size': batch_size, 'prompt_length': prompt_length, 'max_new_tokens': max_new_tokens,
            'repeats': repeats, 'weight_bytes': dataclasses.asdict(weights),
            'full': {**timing('full'), 'compile_s': compile_s['full']}, 'early_exit': {}}
  if op_counts:
    result['full']['ops_per_call'] = ops('full', 'full')
  full_timing = result['full']
  for name, setting in settings.items():
    outs = {n: jax.device_get(decode(n, setting)) for n in lengths}
    out = outs[max_new_tokens]
    steps = int(out.num_steps)
    depth = np.asarray(out.step_depth)[:steps]
    bytes_n = weights.decode(out.segment_passes, out.step_depth, steps)
    entry = {**timing(name), 'compile_s': compile_s['early_exit'],
             'speedup': full_timing['seconds'] / seconds[(name, max_new_tokens)],
             'ideal': weights.full_step * steps / bytes_n,
             'speedup_layers': depth.size * stack.num_layers / layer_cost(depth, tuple(exit_layers),
                                                                        stack.num_layers).sum(),
             'mean_exit_index': float(np.asarray(out.exit_index).mean()),
             'step_depths': depth.tolist()}
    entry['share_of_ideal'] = entry['speedup'] / entry['ideal']
    if op_counts:
      entry['ops_per_call'] = ops(name, 'early_exit')
      entry['ops_ratio'] = result['full']['ops_per_call'] / entry['ops_per_call'] if entry['ops_per_call'] else None
    if len(lengths) == 2:
      one = outs[1]
      step_bytes = (bytes_n - weights.decode(one.segment_passes, one.step_depth, int(one.num_steps))) / (steps - 1)
      entry['step_speedup'] = full_timing['step_s'] / entry['step_s']
      entry['step_ideal'] = weights.full_step / step_bytes
      entry['step_share_of_ideal'] = entry['step_speedup'] / entry['step_ideal']
    result['early_exit'][name] = entry
  return result


def layer_scaling(stack: OPTStack, lm_params: PyTree, *, batch_size: int, prompt_length: int, max_new_tokens: int,
                  repeats: int, seed: int = 0, prompt_vocab: int | None = None) -> list[dict]:
  """Seconds of a full-depth greedy call on the first k layers of an OPT LM, k = 1..L (the same exit-free program).

  What a layer costs where it sits: early exit saves what the skipped layers would have cost, and on a CPU
  that is not a constant. While k layers' weights fit a cache level a layer costs its ops; past it every layer
  of the call waits on memory (the shipped 8-layer LM holds 4 MB of float32 weights), so stopping after 2 of
  8 layers can save more than 6/8 of the time, or, on a machine with a larger cache, less.

  Returns: per k, {'layers': k, 'seconds': median seconds of a call, 'marginal_s': seconds(k) - seconds(k - 1)}
  (the whole call for k = 1).
  """
  if not isinstance(stack, OPTStack):
    raise ValueError(f'layer scaling truncates an OPT LM; got {type(stack).__name__}')
  ids, valid = _random_prompt(stack, batch_size, prompt_length, seed, prompt_vocab)
  prepared, _ = EarlyExitDecoder(stack, (), max_new_tokens, None).prepare(lm_params, ())
  runs = {}
  for k in range(1, stack.num_layers + 1):
    sub = OPTStack(dataclasses.replace(stack.config, num_hidden_layers=k), stack.dtype)
    decoder = EarlyExitDecoder(sub, (), max_new_tokens=max_new_tokens, eos_token_id=None)
    params = {**prepared, 'layers': prepared['layers'][:k]}
    runs[k] = lambda d=decoder, p=params: d(p, None, ids, valid).tokens
  seconds = interleaved_medians(runs, repeats)
  return [{'layers': k, 'seconds': s, 'marginal_s': s - seconds.get(k - 1, 0.0)} for k, s in seconds.items()]


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


def accelerator_report(replay_schedules: dict, replay_tokens: int, batch_sizes: Sequence[int] = (1, 8, 32),
                       prompt_length: int = 40, new_tokens: int = 16, model: OPTConfig | None = None,
                       exit_layers: Sequence[int] = (8, 16, 24), dtype=jnp.bfloat16) -> dict:
  """The decoding report for one GPU or TPU (a few minutes on an H100-class device).

  A random bfloat16 OPT-2.7B-shaped LM (exits after layers 8, 16, 24) at each batch size: full depth,
  every token at exit 0 and never exiting (per call and per step, against the weight-bytes ideal), the
  trained run's replayed decisions (`replay_schedules`, N = `replay_tokens`), compile times, device
  memory and the full-depth step against the weight-read floor (weight bytes / memory bandwidth). Then
  what the decode loop itself costs per step on this backend: a 2-layer width-64 LM, where weights are
  negligible, with and without an exit (the predicate and conditional of one segment).
  """
  layers = tuple(exit_layers)
  stack, lm_params, exit_params = random_model(model or opt_2p7b_shape(), layers, dtype)
  bandwidth = device_bandwidth_gbps()
  results = []
  for b in batch_sizes:
    result = benchmark_decoding(stack, lm_params, exit_params, layers, batch_size=b, prompt_length=prompt_length,
                                max_new_tokens=new_tokens, repeats=3)
    if replay_schedules:
      replayed = benchmark_decoding(stack, lm_params, exit_params, layers, batch_size=b,
                                    prompt_length=prompt_length, max_new_tokens=replay_tokens, repeats=3,
                                    thresholds=(), schedules=replay_schedules, per_step=False)
      result['replayed'] = replayed['early_exit']
    if bandwidth:
      floor = (sum(result['weight_bytes']['segments']) + result['weight_bytes']['head']) / (bandwidth * 1e9)
      result['weight_read_floor_s'] = floor
      result['full_step_over_floor'] = result['full']['step_s'] / floor
    results.append(result)
  tiny = OPTConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                   max_position_embeddings=256, word_embed_proj_dim=64)
  tiny_stack, tiny_params, tiny_exits = random_model(tiny, (1,))
  loop = benchmark_decoding(tiny_stack, tiny_params, tiny_exits, (1,), batch_size=1, prompt_length=8,
                            max_new_tokens=64, repeats=5, thresholds=(conf_lib.NEVER_EXIT,))
  return {'device': jax.devices()[0].device_kind, 'bandwidth_gbps': bandwidth, 'results': results,
          'loop_step_s': {'full': loop['full']['step_s'],
                          'one_exit_never': loop['early_exit'][str(conf_lib.NEVER_EXIT)]['step_s']},
          'peak_memory': peak_memory()}


def identity_after(lm_params: PyTree, exit_params: tuple, layer: int, draft_exit: int) -> tuple[PyTree, tuple]:
  """OPT params (decoding form) whose layers >= `layer` and whose draft exit add nothing to the residual
  stream (zero attention-output and fc2 projections): the same compute and bytes, but the draft exit then
  predicts exactly what the full model does, a drafter with 100% acceptance."""
  def silent(p):
    return {**p, 'self_attn': {**p['self_attn'], 'out_proj': jax.tree.map(jnp.zeros_like, p['self_attn']['out_proj'])},
            'mlp': {**p['mlp'], 'fc2': jax.tree.map(jnp.zeros_like, p['mlp']['fc2'])}}
  layers = tuple(silent(p) if l >= layer else p for l, p in enumerate(lm_params['layers']))
  exits = list(exit_params)
  one = jax.tree.map(lambda x: x[0], exits[draft_exit]['layers'])
  exits[draft_exit] = {**exits[draft_exit], 'layers': jax.tree.map(lambda x: x[None], silent(one))}
  return {**lm_params, 'layers': layers}, tuple(exits)


def benchmark_speculative(stack, lm_params: PyTree, exit_params: PyTree, exit_layers: Sequence[int], *,
                          draft_exit: int, max_draft: int, batch_size: int, prompt_length: int,
                          max_new_tokens: int, repeats: int, thresholds: Sequence[float] = (0.0,),
                          seed: int = 0, prompt_vocab: int | None = None) -> dict:
  """Speculative decoding (`EarlyExitDecoder(mode='speculative')`) against full greedy on random prompts.

  Returns {'draft_exit', 'max_draft', 'batch_size', ..., 'full': {'seconds', 'tokens_per_s'},
  'speculative': {str(threshold): {'seconds', 'tokens_per_s', 'speedup', 'ideal' (weight bytes),
  'share_of_ideal', 'identical' (tokens == full greedy), 'acceptance', 'tokens_per_round', 'rounds',
  'bytes_per_token', 'layers_per_token'}}}.
  """
  ids, valid = _random_prompt(stack, batch_size, prompt_length, seed, prompt_vocab)
  full = EarlyExitDecoder(stack, (), max_new_tokens=max_new_tokens, eos_token_id=None)
  spec = EarlyExitDecoder(stack, tuple(exit_layers), max_new_tokens=max_new_tokens, eos_token_id=None,
                          mode='speculative', draft_exit=draft_exit, max_draft=max_draft)
  lm_params, exit_params = spec.prepare(lm_params, exit_params)
  weights = cost.WeightBytes.of(lm_params, exit_params, tuple(exit_layers))
  runs = {'full': lambda: full(lm_params, None, ids, valid).tokens}
  runs.update({str(float(t)): (lambda t=t: spec(lm_params, exit_params, ids, valid, t).tokens) for t in thresholds})
  seconds = interleaved_medians(runs, repeats)
  reference = np.asarray(full(lm_params, None, ids, valid).tokens)
  tokens = batch_size * max_new_tokens
  result = {'draft_exit': draft_exit, 'max_draft': max_draft, 'batch_size': batch_size,
            'prompt_length': prompt_length, 'max_new_tokens': max_new_tokens, 'repeats': repeats,
            'full': {'seconds': seconds['full'], 'tokens_per_s': tokens / seconds['full']}, 'speculative': {}}
  layer_bytes = sum(weights.segments) / stack.num_layers
  for t in thresholds:
    out = jax.device_get(spec(lm_params, exit_params, ids, valid, t))
    name, rounds = str(float(t)), int(out.rounds)
    spent = weights.speculative(out.segment_passes, rounds, draft_exit)
    drafted = int(np.sum(out.drafted))
    entry = {'seconds': seconds[name], 'tokens_per_s': tokens / seconds[name],
             'speedup': seconds['full'] / seconds[name],
             'ideal': weights.full_step * max_new_tokens / spent,
             'identical': bool(np.array_equal(np.asarray(out.tokens), reference)),
             'acceptance': float(np.sum(out.accepted)) / drafted if drafted else 0.0,
             'tokens_per_round': (max_new_tokens - 1) / max(rounds, 1), 'rounds': rounds,
             'bytes_per_token': spent / max_new_tokens, 'layers_per_token': spent / max_new_tokens / layer_bytes}
    entry['share_of_ideal'] = entry['speedup'] / entry['ideal']
    result['speculative'][name] = entry
  return result
