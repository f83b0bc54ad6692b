"""Early-exit evaluation of a trained FREE run: quality, calibration, exit statistics, measured speedups.

`early_exit_evaluation(config, workdir, backbone, exit_params)` (also the evaluator hook of
`training.pipeline.train_and_evaluate`) writes ``workdir/eval/summary.json`` and its plots:

1. Decode the test split (``data.test_seed``) with the full-depth decoder (an `EarlyExitDecoder`
   without exits: the same program structure, so timings compare like with like) and with early
   exits; score both with the task metric (VQA: exact match / VQA accuracy; captions: CIDEr).
2. Threshold: ``eval.threshold`` if >= 0, else calibrated on the 'calibration' split (`free_jax.data.sources`)
   so the early-exit output disagrees with the reference (``eval.calibration_reference``:
   the full model, or the ground truth for VQA) at most ``risk_delta`` with probability
   >= 1 - ``risk_epsilon`` (`inference.calibrate`); the test split's achieved risk is reported.
3. Wall clock: full vs early exit on the same inputs, interleaved in one process, one warm-up pass,
   then the median of ``eval.timing_repeats`` passes. "decode" times the LM decoding from prepared
   prompts (prefill included); "end_to_end" adds the image encoder, Q-Former (and T5 encoder).
4. Threshold sweep (quality vs measured decode speedup), teacher-forced quality of every exit and of
   every layer through the frozen head ("naive" exits: the mid-crisis curve), overthinking.
5. VQA: all of that per question type (``per_type``: which types are answered at shallow layers and
   which need depth, with each type's majority-answer rate as its chance level).

For patience, the swept/calibrated "threshold" is the patience k (largest = most conservative).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from free_jax import exits as exits_lib
from free_jax import exits_io, teacher_forcing, workdir_lock
from free_jax.backbone import Backbone, make_input_format
from free_jax.data import batching, sources
from free_jax.data import tokenizer as tokenizer_lib
from free_jax.eval import analysis, metrics
from free_jax.inference import calibrate as calibrate_lib
from free_jax.inference import confidence as conf_lib
from free_jax.inference import cost as cost_lib
from free_jax.inference.early_exit import PREFILL_MODES, PROPAGATION_MODES, EarlyExitDecoder, layer_cost
from free_jax.models.hf_tensors import read_json
from free_jax.models import blip2
from free_jax.vlm import EarlyExitVLM

PyTree = Any
EVAL_DIR = 'eval'
SUMMARY_FILE = 'summary.json'


def _metric_name(task: str) -> str:
  return 'exact_match' if task == 'vqa' else 'CIDEr'


def score(task: str, predictions: Sequence[str], examples: dict) -> tuple[float, np.ndarray | None]:
  """(corpus quality, per-example scores or None) of generated texts against the examples' references."""
  if task == 'vqa':
    if 'answers' in examples:  # VQAv2-style: ten human answers per question
      mean, per = metrics.vqa_accuracy_batch(predictions, examples['answers'])
    else:
      mean, per = metrics.exact_match_batch(predictions, examples['answer'])
    return mean, np.asarray(per)
  references = examples.get('captions') or [[c] for c in examples['caption']]
  return metrics.caption_scores(list(predictions), [list(r) for r in references])['CIDEr'], None


class Evaluator:
  """Decoders, prepared inputs and timing for one trained run (see the module docstring)."""

  def __init__(self, config: ml_collections.ConfigDict, backbone: Backbone, exit_params: PyTree):
    self.config, self.backbone, self.exit_params = config, backbone, exit_params
    self.task = config.data.task
    model = backbone.model
    self.stack = blip2.lm_stack(model.config, model.dtype)
    self.exit_layers = tuple(config.exits.layers)
    if exits_lib.num_exits(exit_params) != len(self.exit_layers):
      raise ValueError(f'exit_params hold {exits_lib.num_exits(exit_params)} exits but exits.layers='
                       f'{self.exit_layers}')
    e = config.eval
    tok = backbone.tokenizer
    common = dict(max_new_tokens=e.max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    self.early = EarlyExitDecoder(self.stack, self.exit_layers, confidence=e.confidence, prefill=e.prefill,
                                  propagation=e.propagation, **common)
    self.full = EarlyExitDecoder(self.stack, (), **common)
    # Decoding form (per-layer arrays), made once: see `EarlyExitDecoder.prepare`.
    self.lm_params, self.decode_exit_params = self.early.prepare(backbone.params['language_model'], exit_params)
    self.weights = cost_lib.WeightBytes.of(self.lm_params, self.decode_exit_params, self.exit_layers)
    self._speculative = {}
    self._prompt_fn = jax.jit(self._prompt_inputs)
    self._teacher_fn = jax.jit(self._teacher_forced)

  # --- inputs -----------------------------------------------------------------------------------

  def _prompt_inputs(self, params, image, input_ids, attention_mask):
    """Device-side decoder inputs: (prompt, encoder) from pixels and prompt ids (`Blip2Model.decoder_inputs`;
    the prompt validity is known on the host, `batches`)."""
    prompt, _, encoder = self.backbone.model.apply({'params': params}, image, input_ids, attention_mask,
                                                   method='decoder_inputs')
    return prompt, encoder

  def batches(self, examples: dict, limit: int = 0, batch_size: int | None = None) -> list[dict]:
    """Generation batches (`batch_size` rows, default eval.batch_size; images on device) with host-side prompt
    validity."""
    n = batching.num_rows(examples)
    if limit:
      examples = batching.take(examples, np.arange(min(limit, n)))
    out = []
    for chunk in batching.iterate_batches(examples, batch_size or self.config.eval.batch_size, 0, shuffle=False,
                                          num_epochs=1, drop_remainder=False):
      b = batching.generation_batch(chunk, self.backbone.tokenizer, self.backbone.fmt, self.task)
      if self.backbone.model.config.is_encoder_decoder:
        valid = np.ones((len(b['valid']), 1), bool)
      else:
        valid = b['attention_mask'].astype(bool)
      out.append({'image': jax.device_put(b['image']), 'input_ids': jax.device_put(b['input_ids']),
                  'attention_mask': jax.device_put(b['attention_mask']), 'valid': valid, 'rows': b['valid']})
    return out

  def prompts(self, batch: dict):
    return self._prompt_fn(self.backbone.params, batch['image'], batch['input_ids'], batch['attention_mask'])

  # --- decoding -----------------------------------------------------------------------------------

  def _setting(self, value: float) -> dict:
    """Decoder keyword arguments for a threshold (or, for patience, k)."""
    if self.config.eval.confidence == 'patience':
      return {'patience': int(round(value))}
    return {'thresholds': value}

  def decode(self, decoder: EarlyExitDecoder, batches: list[dict], prepared: list, value: float = 0.0):
    """Host arrays over valid rows: (tokens int[N, T], exit_index int[N, T], cost, full-depth cost), the
    costs as float[2] [layers executed, weight bytes read] (`inference.cost`)."""
    setting = self._setting(value) if decoder.num_exits else {}
    outs = [decoder(self.lm_params, self.decode_exit_params, p, b['valid'], encoder=enc, **setting)
            for b, (p, enc) in zip(batches, prepared)]
    tokens, exits, cost, full_cost = [], [], np.zeros(2), np.zeros(2)
    for b, o in zip(batches, jax.device_get(outs)):
      tokens.append(o.tokens[b['rows']])
      exits.append(o.exit_index[b['rows']])
      steps = int(o.num_steps)
      depth = o.step_depth[:steps]
      if decoder.num_exits:
        spent = self.weights.decode(o.segment_passes, o.step_depth, steps)
      else:
        spent = steps * self.weights.full_step
      cost += (layer_cost(depth, decoder.exit_layers, self.stack.num_layers).sum(), spent)
      full_cost += (steps * self.stack.num_layers, steps * self.weights.full_step)
    return np.concatenate(tokens), np.concatenate(exits), cost, full_cost

  def step_depths(self, decoder: EarlyExitDecoder, batches: list[dict], prepared: list, value: float) -> list:
    """Per batch, the exit each decode step stopped at (int lists): a run's decisions, to replay elsewhere."""
    setting = self._setting(value) if decoder.num_exits else {}
    outs = jax.device_get([decoder(self.lm_params, self.decode_exit_params, p, b['valid'], encoder=enc, **setting)
                           for b, (p, enc) in zip(batches, prepared)])
    return [o.step_depth[:int(o.num_steps)].tolist() for o in outs]

  def texts(self, tokens: np.ndarray) -> list[str]:
    return tokenizer_lib.decode(self.backbone.tokenizer, tokens)

  # --- timing -------------------------------------------------------------------------------------

  def time_pass(self, decoder: EarlyExitDecoder, batches: list[dict], prepared: list | None, value: float) -> float:
    """Seconds for one pass over `batches` (prompts recomputed when `prepared` is None: end to end)."""
    setting = self._setting(value) if decoder.num_exits else {}
    start = time.perf_counter()
    outs = []
    for i, b in enumerate(batches):
      prompt, encoder = prepared[i] if prepared is not None else self.prompts(b)
      outs.append(decoder(self.lm_params, self.decode_exit_params, prompt, b['valid'], encoder=encoder, **setting))
    jax.block_until_ready(outs)
    return time.perf_counter() - start

  def speculative_decoder(self, draft_exit: int, max_draft: int) -> EarlyExitDecoder:
    """The lossless draft-and-verify decoder with exit `draft_exit` drafting up to `max_draft` tokens."""
    key = (draft_exit, max_draft)
    if key not in self._speculative:
      self._speculative[key] = dataclasses.replace(self.early, mode='speculative', draft_exit=draft_exit,
                                                   max_draft=max_draft)
    return self._speculative[key]

  def time_interleaved(self, batches: list[dict], prepared: list | None, value: float, repeats: int,
                       decoder: EarlyExitDecoder | None = None) -> dict:
    """Median seconds of full vs early exit (or `decoder`), alternating passes after one warm-up each."""
    times = {'full': [], 'early_exit': []}
    for r in range(repeats + 1):
      for name, decoder_ in (('full', self.full), ('early_exit', decoder or self.early)):
        t = self.time_pass(decoder_, batches, prepared, value)
        if r:
          times[name].append(t)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {'full_s': medians['full'], 'early_exit_s': medians['early_exit'],
            'speedup': medians['full'] / medians['early_exit'], 'repeats': repeats}

  # --- teacher forcing ----------------------------------------------------------------------------

  def _teacher_forced(self, params, exit_params, batch):
    """int32 argmax tokens of every exit [E, B, T] and of every layer through the frozen head [L, B, T]."""
    run = teacher_forcing.teacher_forced(self.backbone.model, params, batch)
    _, logits = exits_lib.apply_exits(self.stack, params['language_model'], exit_params,
                                      run.hiddens[jnp.asarray(self.exit_layers) - 1], run.token_valid, run.ctx)
    lm = params['language_model']
    naive = jax.lax.map(lambda h: jnp.argmax(self.stack.logits(lm, self.stack.final_features(lm, h)), -1),
                        run.hiddens)
    return jnp.argmax(logits, -1).astype(jnp.int32), naive.astype(jnp.int32)

  def teacher_forced_quality(self, examples: dict) -> dict:
    """Per-exit and per-layer teacher-forced quality, and overthinking (answers for VQA, tokens for captions).

    VQA: an example is right at an exit when every target token (answer and EOS) is its argmax given
    the true prefix. Captions: tokens are the examples.
    """
    exit_right, layer_right, kinds = [], [], []
    for chunk in batching.iterate_batches(examples, self.config.train.batch_size, 0, shuffle=False, num_epochs=1,
                                          drop_remainder=False):
      batch = batching.train_batch(chunk, self.backbone.tokenizer, self.backbone.fmt, self.task)
      exit_tokens, layer_tokens = jax.device_get(self._teacher_fn(self.backbone.params, self.exit_params, batch))
      mask = teacher_forcing.target_mask(batch) & batch['valid'][:, None]
      for tokens, out in ((exit_tokens, exit_right), (layer_tokens, layer_right)):
        hit = tokens == batch['labels'][None]
        if self.task == 'vqa':
          out.append((hit | ~mask[None]).all(-1)[:, batch['valid']])
        else:
          out.append(hit[:, mask])
      if self.task == 'vqa':
        kinds += list(np.asarray(chunk.get('question_type', [''] * len(batch['valid'])))[batch['valid']])
    exit_right, layer_right = np.concatenate(exit_right, 1), np.concatenate(layer_right, 1)
    final = layer_right[-1]
    out = {'per_exit': analysis.per_exit_quality(np.concatenate([exit_right, final[None]])).tolist(),
           'per_layer_naive': analysis.per_exit_quality(layer_right).tolist(),
           'overthinking_rate': analysis.overthinking_rate(exit_right, final),
           'naive_overthinking_rate': analysis.overthinking_rate(layer_right[:-1], final),
           'unit': 'answer' if self.task == 'vqa' else 'token', 'per_type': {}}
    kinds = np.asarray(kinds)
    for kind in sorted(set(kinds) - {''}):  # the difficulty gradient: which types need depth
      rows = kinds == kind
      out['per_type'][kind] = {
          'count': int(rows.sum()),
          'per_exit': analysis.per_exit_quality(np.concatenate([exit_right, final[None]]), rows).tolist(),
          'per_layer_naive': analysis.per_exit_quality(layer_right, rows).tolist()}
    return out


def _per_type(examples: dict, teacher: dict, full_scores, early_scores) -> dict:
  """Per question type: teacher-forced quality of every exit and layer, and the generated answers' accuracy
  at full depth and with early exit (and the majority-answer baseline, the type's chance level)."""
  kinds = np.asarray(examples.get('question_type', []))
  out = {}
  for kind, row in teacher.items():
    rows = kinds == kind
    answers = collections.Counter(np.asarray(examples['answer'])[rows].tolist())
    out[kind] = dict(row, majority_answer=answers.most_common(1)[0][1] / rows.sum(),
                     full=float(np.mean(full_scores[rows])), early_exit=float(np.mean(early_scores[rows])))
  return out


def _losses(ev: Evaluator, predictions: np.ndarray, reference_tokens: np.ndarray, examples: dict) -> np.ndarray:
  """float[K, n] calibration losses of predictions int[K, n, T] against the configured reference."""
  if ev.config.eval.calibration_reference == 'full_model':
    return calibrate_lib.disagreement_losses(predictions, reference_tokens)
  if ev.config.eval.calibration_reference == 'ground_truth':
    if ev.task != 'vqa':
      raise ValueError("eval.calibration_reference='ground_truth' needs a per-example 0/1 metric (task 'vqa')")
    return np.stack([1.0 - score('vqa', ev.texts(p), examples)[1] for p in predictions])
  raise ValueError(f"eval.calibration_reference={ev.config.eval.calibration_reference!r}; expected "
                   "'full_model' or 'ground_truth'")


def threshold_grid(ev: Evaluator, count: int) -> np.ndarray:
  """`count` settings from the most conservative to the most aggressive (thresholds, or patience k: all of them).

  Thresholds: 1, then 1 - g for g geometric from 1e-3 to 1 (for 11: 1, 0.999, 0.998, 0.995, 0.99, 0.978, 0.954,
  0.9, 0.785, 0.536, 0). A trained exit's confidence crowds near 1, so an even grid leaves the thresholds that
  lose less than a point (0.95-0.999 here) untested and calibration jumps from full depth to a 2-point loss.
  """
  if ev.config.eval.confidence == 'patience':
    return np.arange(len(ev.exit_layers) + 1, 0, -1, dtype=np.float64)
  return np.concatenate([[1.0], 1.0 - np.geomspace(1e-3, 1.0, count - 1)])


def check_eval_config(config: ml_collections.ConfigDict) -> None:
  """Every eval.* field, before any work: ValueError naming the field (`pipeline.validate_config` calls it)."""
  e = config.eval

  def check(ok: bool, message: str) -> None:
    if not ok:
      raise ValueError(message)

  def number(name: str) -> float:
    value = e[name]
    check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
          f'eval.{name}={value!r} must be a finite number')
    return value

  check(e.confidence in conf_lib.CONFIDENCE_FNS or e.confidence == 'patience',
        f'eval.confidence={e.confidence!r}; expected one of {sorted(conf_lib.CONFIDENCE_FNS)} or \'patience\'')
  number('threshold')  # < 0: calibrate; [0, 1]: fixed; > 1: never exit; NaN would silently calibrate
  check(e.calibration_reference in ('full_model', 'ground_truth'),
        f"eval.calibration_reference={e.calibration_reference!r}; expected 'full_model' or 'ground_truth'")
  check(e.calibration_reference != 'ground_truth' or config.data.task == 'vqa',
        "eval.calibration_reference='ground_truth' needs a per-example 0/1 metric (data.task='vqa')")
  for name in ('risk_delta', 'risk_epsilon'):
    check(0 < number(name) < 1, f'eval.{name}={e[name]} must be in (0, 1)')
  for name, low in (('max_new_tokens', 1), ('batch_size', 1), ('quality_batch_size', 1), ('timing_repeats', 1),
                    ('num_sweep_thresholds', 2), ('num_calibration_thresholds', 2), ('patience', 1), ('timing_examples', 0),
                    ('selection_examples', 1)):
    value = e[name]
    check(isinstance(value, int) and not isinstance(value, bool) and value >= low,
          f'eval.{name}={value!r} must be an integer >= {low}')
  lengths = tuple(e.draft_lengths)
  check(all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in lengths),
        f'eval.draft_lengths={lengths} must be positive integers')
  check(e.prefill in PREFILL_MODES, f'eval.prefill={e.prefill!r}; expected one of {PREFILL_MODES}')
  check(e.propagation in PROPAGATION_MODES, f'eval.propagation={e.propagation!r}; expected one of {PROPAGATION_MODES}')
  check(e.calibration_method in calibrate_lib.METHODS,
        f'eval.calibration_method={e.calibration_method!r}; expected one of {calibrate_lib.METHODS}')


def made_from(config: ml_collections.ConfigDict, exit_params: PyTree) -> dict:
  """What an evaluation of these exits depends on (JSON as stored: tuples become lists). A stored evaluation
  made from anything else is stale."""
  return json.loads(json.dumps({
      'exits_digest': exits_io.fingerprint(exit_params), 'eval': config.eval.to_dict(),
      'data': {k: config.data[k] for k in ('source', 'task', 'data_dir', 'test_seed', 'num_test', 'num_calibration')}}))


def _check_writable(directory: str) -> None:
  """Creates `directory` if needed; a one-line PermissionError naming it when it cannot take new files."""
  try:
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryFile(dir=directory):
      pass
  except OSError as e:
    raise PermissionError(f'{directory} is not writable: {e.strerror}') from e


def early_exit_evaluation(config: ml_collections.ConfigDict, workdir: str, backbone: Backbone,
                          exit_params: PyTree, reuse: bool = True) -> dict:
  """Runs the whole evaluation (module docstring); writes and returns ``workdir/eval/summary.json``.

  With `reuse`, a summary already made from these exits and settings (`made_from`) is returned as it is: a
  finished run is not evaluated twice (experiments/evaluate.py passes False: it always measures again).
  """
  check_eval_config(config)
  inputs = made_from(config, exit_params)
  path = os.path.join(workdir, EVAL_DIR, SUMMARY_FILE)
  if reuse and os.path.isfile(path):
    stored = read_json(path)
    if stored.get('made_from') == inputs:
      return stored
  with workdir_lock.hold(workdir):  # one run per workdir (a second one is refused, naming this one)
    return _evaluate(config, workdir, backbone, exit_params, inputs)


def _evaluate(config: ml_collections.ConfigDict, workdir: str, backbone: Backbone, exit_params: PyTree,
              inputs: dict) -> dict:
  e = config.eval
  out_dir = os.path.join(workdir, EVAL_DIR)
  path = os.path.join(out_dir, SUMMARY_FILE)
  _check_writable(out_dir)  # before the work, not when saving the plots
  ev = Evaluator(config, backbone, exit_params)
  image_size = backbone.fmt.image_size
  test = sources.load_examples(config, 'test', config.data.num_test, image_size)
  test_batches = ev.batches(test)
  test_prompts = [ev.prompts(b) for b in test_batches]
  full_tokens, _, _, _ = ev.decode(ev.full, test_batches, test_prompts)
  quality_full, full_scores = score(ev.task, ev.texts(full_tokens), test)
  grid = threshold_grid(ev, e.num_sweep_thresholds)
  # Passes that need only tokens decode in larger batches: a row's tokens do not depend on its batch.
  test_quality = ev.batches(test, batch_size=e.quality_batch_size)
  test_quality_prompts = [ev.prompts(b) for b in test_quality]

  calibration = None
  if e.threshold >= 0:
    value = float(e.threshold)
  else:
    cal = sources.load_examples(config, 'calibration', config.data.num_calibration, image_size)
    cal_batches = ev.batches(cal, batch_size=e.quality_batch_size)
    cal_prompts = [ev.prompts(b) for b in cal_batches]
    reference, _, _, _ = ev.decode(ev.full, cal_batches, cal_prompts)
    candidates = threshold_grid(ev, e.num_calibration_thresholds)
    predictions = np.stack([ev.decode(ev.early, cal_batches, cal_prompts, v)[0] for v in candidates])
    result = calibrate_lib.calibrate(candidates, _losses(ev, predictions, reference, cal), e.risk_delta,
                                     e.risk_epsilon, e.calibration_method)
    calibration = result.to_dict()
    value = result.threshold
    if e.confidence == 'patience' and result.index is None:
      value = float(len(ev.exit_layers) + 1)  # patience beyond the number of exits never exits

  tokens, exit_index, cost, full_cost = ev.decode(ev.early, test_batches, test_prompts, value)
  quality_early, early_scores = score(ev.task, ev.texts(tokens), test)
  test_risk = float(_losses(ev, tokens[None], full_tokens, test).mean())
  generated = exit_index >= 0
  depth_layers = np.asarray((*ev.exit_layers, ev.stack.num_layers))
  histogram = analysis.exit_histogram(exit_index[generated], len(ev.exit_layers) + 1)

  timing_count = e.timing_examples or config.data.num_test
  timed = test_batches[:-(-timing_count // e.batch_size)]
  decode_timing = ev.time_interleaved(timed, test_prompts[:len(timed)], value, e.timing_repeats)
  e2e_timing = ev.time_interleaved(timed, None, value, e.timing_repeats)

  sweep = []
  for v in grid:
    sw_tokens = ev.decode(ev.early, test_quality, test_quality_prompts, v)[0]
    # Layers and bytes per token at eval.batch_size, on the examples whose wall clock is measured.
    _, _, sw_cost, sw_full = ev.decode(ev.early, timed, test_prompts[:len(timed)], v)
    # Interleaved with full-depth passes per threshold: a machine's speed drifts over a sweep.
    sw_timing = ev.time_interleaved(timed, test_prompts[:len(timed)], v, min(3, e.timing_repeats))
    sweep.append({'threshold': float(v), 'quality': score(ev.task, ev.texts(sw_tokens), test)[0],
                  'speedup_layers': sw_full[0] / sw_cost[0], 'speedup_ideal': sw_full[1] / sw_cost[1],
                  'speedup_decode_wallclock': sw_timing['speedup']})

  speculative = None
  if e.draft_lengths and e.confidence != 'patience':
    speculative = speculative_evaluation(ev, value, full_tokens, test, test_batches, test_prompts, len(timed))

  teacher = ev.teacher_forced_quality(test)
  names = [f'exit{l}' for l in ev.exit_layers] + ['final']
  summary = {
      'quality_metric': _metric_name(ev.task),
      'quality_full': quality_full,
      'quality_early_exit': quality_early,
      'threshold': value,
      'confidence': e.confidence,
      'prefill': e.prefill,
      'propagation': e.propagation,
      'calibration': calibration,
      'test_risk': test_risk,
      'calibration_reference': e.calibration_reference,
      'num_layers': ev.stack.num_layers,
      'exit_layers': list(ev.exit_layers),
      'mean_exit_layer': float(depth_layers[exit_index[generated]].mean()),
      'exit_histogram': dict(zip(names, histogram.tolist())),
      'step_depths': ev.step_depths(ev.early, test_batches, test_prompts, value),
      'speedup_layers': full_cost[0] / cost[0],
      'speedup_ideal': full_cost[1] / cost[1],  # weight bytes read (`inference.cost`)
      'speedup_decode_wallclock': decode_timing['speedup'],
      'speedup_end_to_end_wallclock': e2e_timing['speedup'],
      'timing': {'decode': decode_timing, 'end_to_end': e2e_timing, 'examples': min(timing_count, config.data.num_test),
                 'batch_size': e.batch_size, 'max_new_tokens': e.max_new_tokens,
                 'compile_s': {'full': ev.full.compile(ev.lm_params, None, test_prompts[0][0], timed[0]['valid'],
                                                       test_prompts[0][1])[1],
                               'early_exit': ev.early.compile(ev.lm_params, ev.decode_exit_params, test_prompts[0][0],
                                                              timed[0]['valid'], test_prompts[0][1])[1]},
                 'backend': jax.default_backend()},
      'per_exit_quality': dict(zip(names, teacher['per_exit'])),
      'per_exit_quality_unit': teacher['unit'],
      'per_layer_quality_naive': teacher['per_layer_naive'],
      'per_type': _per_type(test, teacher['per_type'], full_scores, early_scores),
      'overthinking_rate': teacher['overthinking_rate'],
      'naive_overthinking_rate': teacher['naive_overthinking_rate'],
      'sweep': sweep,
      'speculative': speculative,
      'num_test': config.data.num_test,
      'test_seed': config.data.test_seed,
      'exits_digest': inputs['exits_digest'],  # which exits this evaluates (`EarlyExitVLM.load`)
      'made_from': inputs,
  }
  plots = []

  def staged(name: str) -> str:
    plots.append(name)
    return os.path.join(out_dir, f'.{name}.partial.png')

  analysis.plot_quality_vs_speedup(
      {f'FREE exits ({e.confidence})': ([s['speedup_decode_wallclock'] for s in sweep],
                                        [s['quality'] for s in sweep])},
      staged('quality_vs_speedup.png'), full_quality=quality_full, quality_label=summary['quality_metric'])
  # Both curves at the exit layers and the last layer, so they share an x axis.
  at = np.asarray((*ev.exit_layers, ev.stack.num_layers)) - 1
  analysis.plot_per_layer_quality(
      {'naive exits (frozen head)': np.asarray(teacher['per_layer_naive'])[at], 'FREE exits': teacher['per_exit']},
      staged('per_layer_quality.png'), layers=at + 1,
      quality_label=f'teacher-forced {teacher["unit"]} accuracy')
  if summary['per_type']:
    analysis.plot_per_layer_quality(
        {kind: row['per_layer_naive'] for kind, row in summary['per_type'].items()},
        staged('per_type_per_layer.png'), quality_label='teacher-forced answer accuracy',
        title='per question type, every layer through the frozen head', xlabel='layer')
  analysis.plot_exit_histogram(histogram, staged('exit_histogram.png'), labels=names)
  modes = {'full': (quality_full, 1.0), f'early exit ({value:g})': (quality_early, decode_timing['speedup'])}
  if speculative is not None:
    modes[f"speculative (exit {speculative['draft_layer']}, k={speculative['max_draft']})"] = (
        speculative['quality'], speculative['speedup_decode_wallclock'])
  analysis.plot_modes(modes, staged('modes.png'), quality_label=summary['quality_metric'])
  with open(path + '.tmp', 'w') as f:
    json.dump(summary, f, indent=1)
  # The plots take seconds; they replace the old ones only now, next to the summary they belong to.
  for name in plots:
    os.replace(os.path.join(out_dir, f'.{name}.partial.png'), os.path.join(out_dir, name))
  os.replace(path + '.tmp', path)
  return summary


def speculative_evaluation(ev: Evaluator, value: float, full_tokens: np.ndarray, test: dict, test_batches: list,
                           test_prompts: list, timed: int) -> dict:
  """Lossless self-speculative decoding: (draft exit, k) chosen on the calibration split by measured
  speed, then its tokens, statistics and wall-clock on the test split (drafting while confident >= `value`).

  Returns the summary's 'speculative' entry; 'identical_to_full' must hold (the decode is lossless).
  """
  config, e = ev.config, ev.config.eval
  cal = sources.load_examples(config, 'calibration', config.data.num_calibration, ev.backbone.fmt.image_size)
  cal_batches = ev.batches(cal, limit=min(timed * e.batch_size, e.selection_examples, config.data.num_calibration))
  cal_prompts = [ev.prompts(b) for b in cal_batches]
  choices = []
  for i in range(len(ev.exit_layers)):
    for k in e.draft_lengths:
      timing = ev.time_interleaved(cal_batches, cal_prompts, value, min(3, e.timing_repeats),
                                   decoder=ev.speculative_decoder(i, k))
      choices.append({'draft_exit': i, 'draft_layer': ev.exit_layers[i], 'max_draft': k,
                      'speedup_decode_wallclock': timing['speedup']})
  best = max(choices, key=lambda c: c['speedup_decode_wallclock'])
  decoder = ev.speculative_decoder(best['draft_exit'], best['max_draft'])
  outs = jax.device_get([decoder(ev.lm_params, ev.decode_exit_params, p, b['valid'], value, encoder=enc)
                         for b, (p, enc) in zip(test_batches, test_prompts)])
  tokens = np.concatenate([o.tokens[b['rows']] for b, o in zip(test_batches, outs)])
  drafted = sum(int(o.drafted[b['rows']].sum()) for b, o in zip(test_batches, outs))
  accepted = sum(int(o.accepted[b['rows']].sum()) for b, o in zip(test_batches, outs))
  rounds = sum(int(o.rounds) for o in outs)
  spent = sum(ev.weights.speculative(o.segment_passes, int(o.rounds), best['draft_exit']) for o in outs)
  # Full greedy runs one step per generated token of its longest row.
  eos = ev.backbone.tokenizer.eos_token_id
  steps = [max(int(np.argmax(r == eos)) + 1 if (r == eos).any() else len(r) for r in o.tokens) for o in outs]
  full_bytes = sum(steps) * ev.weights.full_step
  timing = ev.time_interleaved(test_batches[:timed], test_prompts[:timed], value, e.timing_repeats, decoder=decoder)
  return {**best, 'threshold': value, 'choices': choices,
          'identical_to_full': bool(np.array_equal(tokens, full_tokens)),
          'quality': score(ev.task, ev.texts(tokens), test)[0],
          'acceptance': accepted / drafted if drafted else 0.0, 'drafted': drafted, 'accepted': accepted,
          'rounds': rounds, 'tokens_per_round': accepted / rounds + 1 if rounds else 0.0,
          'speedup_ideal': full_bytes / spent, 'speedup_decode_wallclock': timing['speedup'], 'timing': timing}


def load_run(config: ml_collections.ConfigDict, workdir: str) -> tuple[Backbone, PyTree]:
  """The finished backbone and exit params of a training run in `workdir` (nothing is trained here), with
  the input format fitted to `config`'s data; exits trained after other layers than ``exits.layers`` are
  refused."""
  vlm = EarlyExitVLM.load(workdir, dtype={'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[config.model.dtype])
  if tuple(config.exits.layers) != vlm.exit_layers:
    raise exits_io.ExitsMismatchError(f'exits.layers={tuple(config.exits.layers)}, but the exits in {workdir} '
                                      f'were trained after layers {vlm.exit_layers}')
  backbone = vlm.backbone
  fmt = make_input_format(config, backbone.model.config, backbone.tokenizer)
  return dataclasses.replace(backbone, fmt=fmt), vlm.exit_params
