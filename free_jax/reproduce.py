"""The reproduction study: FREE against its baselines on one frozen backbone, over label fractions and seeds.

Does what the paper claims hold on this benchmark? (1) adversarial exits beat cross-entropy exits when
labels are scarce; (2) they reduce overthinking and the mid-crisis dip; (3) >= 1.51x speedup at
comparable quality. `run_study` answers with measured numbers:

* One backbone for every row (`pipeline.backbone_stage`, cached in ``workdir/backbone``: the same one
  experiments/train.py trains and reuses), the same exit layers, the same evaluation and threshold
  calibration (`eval.evaluator.early_exit_evaluation`: calibrated on the same split, same risk level).
* A row = (method, label fraction); each is run for every seed and aggregated (mean and spread).
  Methods (`METHODS`) are a training mode of `training.free_step` plus an exit decision. Work that is
  identical by construction is done once: methods that use no labels are trained once per seed and
  reported for every fraction (``labels_used: False``), and `pabee` decides with patience over the
  very exits `ce_only` trained.
* Rows live in ``workdir/reproduce/<training run>/`` (orbax checkpoints, metrics) with their
  evaluation in ``<training run>/<decision>-<eval hash>/eval/``; a re-run reuses whatever finished.
* `write_results` writes ``reproduction.json`` (a list of rows), ``reproduction.md`` (a table that can
  be pasted, the claims checked in words) and the PNGs: per-layer quality per method, and quality vs
  measured decode speedup over the threshold sweep.

The grids (`GRIDS`) are sized for this machine; docs/reproduction.md documents them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
import scipy.stats

from free_jax import configs
from free_jax.eval import analysis, evaluator, paired, teacher_scores
from free_jax.training import checkpoint, free_step, parallel, pipeline

STUDY_DIR = 'reproduce'
JSON_FILE = 'reproduction.json'
MARKDOWN_FILE = 'reproduction.md'
RECORD_FILE = 'record.json'  # a run's figures and timings, next to its eval/
PAPER_SPEEDUP = 1.51  # the paper's headline speedup
RIGHT_FILE = 'test_right.npz'  # a run's teacher-forced right/wrong per exit and test question, next to its record
SIGNIFICANCE = 0.05
# free.* fields a method's recipe may change (`Method.overrides`); they name its training directory.
_RECIPE_FIELDS = ('adv_weight', 'adv_positions', 'term_clip', 'ce_weight', 'kd_weight')
# Scalars of an evaluation summary (or derived from it) that rows aggregate over seeds.
_SCALARS = ('quality', 'quality_full', 'speedup_decode_wallclock', 'speedup_layers',
            'speedup_end_to_end_wallclock', 'speedup_at_comparable_quality', 'threshold', 'mean_exit_layer',
            'overthinking_rate', 'mid_crisis_dip', 'naive_mid_crisis_dip', 'mean_exit_quality', 'test_risk',
            'train_s', 'eval_s')


@dataclasses.dataclass(frozen=True)
class Method:
  """How a method's exits are trained (``free.mode``) and how tokens decide to leave (``eval.confidence``)."""

  mode: str
  confidence: str = 'max_prob'
  description: str = ''
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # config fields (dotted path -> value)

  @property
  def uses_labels(self) -> bool:
    return 'ce' in free_step.MODES[self.mode][1]


METHODS = {
    'free': Method('semi_supervised', description='FREE: adversarial + CE on the labelled share'),
    'ce_only': Method('ce_only', description='DeeBERT-style exits: CE on the labelled share'),
    'kd_only': Method('kd_only', description='KD from the final layer, no GAN, no labels'),
    'cosine': Method('cosine', description='cosine feature alignment (no GAN) + CE on the labelled share'),
    'pabee': Method('ce_only', 'patience', 'PABEE: patience over the ce_only exits (no retraining)'),
    'free_unsup_kd': Method('unsupervised_kd', description='FREE unsupervised: adversarial + KD'),
    'free_unsup_pseudo': Method('unsupervised_pseudo',
                                description="FREE unsupervised: adversarial + CE on the backbone's answers"),
}


@dataclasses.dataclass(frozen=True)
class Grid:
  """A study: rows = methods x label fractions, each run for every seed.

  Attributes:
    methods: names in `METHODS`.
    label_fractions: shares of ``data.num_train`` whose labels the label-using methods may see.
    seeds: replicate offsets added to ``seed`` (exit/discriminator init) and ``data.seed`` (labelled
      subset, data order, calibration split); the test split (``data.test_seed``) stays fixed.
    overrides: config fields every row gets (dotted path -> value), e.g. a shorter exit training.
    smoke: shrink the config first (`configs.smoke`).
    comparable_drop: "comparable quality" = at most this far below the full model (absolute).
  """

  methods: tuple[str, ...]
  label_fractions: tuple[float, ...]
  seeds: tuple[int, ...]
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  smoke: bool = False
  comparable_drop: float = 0.01


GRIDS = {
    # 12 exit trainings + 15 evaluations per seed on the small 8-layer backbone (docs/reproduction.md).
    'full': Grid(methods=tuple(METHODS), label_fractions=(0.01, 0.1, 1.0), seeds=(0, 1, 2),
                 overrides={'train.steps': 300, 'train.warmup_steps': 30, 'train.log_every': 50,
                            'train.checkpoint_every': 150, 'data.num_calibration': 300, 'data.num_test': 400,
                            'eval.risk_delta': 0.05, 'eval.num_sweep_thresholds': 5,
                            'eval.num_calibration_thresholds': 5,
                            'eval.timing_examples': 48, 'eval.timing_repeats': 3}),
    'smoke': Grid(methods=('free', 'ce_only', 'pabee', 'free_unsup_kd'), label_fractions=(0.5, 1.0),
                  seeds=(0,),
                  overrides={'data.num_calibration': 12, 'data.num_test': 12, 'eval.risk_delta': 0.2,
                             'eval.risk_epsilon': 0.2, 'eval.timing_examples': 4, 'eval.timing_repeats': 1,
                             'eval.max_new_tokens': 3},
                  smoke=True),
}


def get_grid(grid: str | Grid) -> Grid:
  if isinstance(grid, Grid):
    return grid
  if grid not in GRIDS:
    raise ValueError(f'grid={grid!r}; expected one of {tuple(GRIDS)}')
  return GRIDS[grid]


def _check_grid(grid: Grid) -> None:
  unknown = [m for m in grid.methods if m not in METHODS]
  if unknown:
    raise ValueError(f'unknown methods {unknown}; expected names from {tuple(METHODS)}')
  bad = [f for f in grid.label_fractions if not 0.0 < f <= 1.0]
  if bad or not grid.label_fractions:
    raise ValueError(f'label_fractions={grid.label_fractions} must be non-empty and in (0, 1]')
  if not grid.seeds or len(set(grid.seeds)) != len(grid.seeds):
    raise ValueError(f'seeds={grid.seeds} must be non-empty and distinct')


def validate(config: ml_collections.ConfigDict, grid: str | Grid) -> ml_collections.ConfigDict:
  """Checks the grid and every row's config before anything is built; returns the study's base config."""
  grid = get_grid(grid)
  _check_grid(grid)
  base = study_config(config, grid)
  checked = set()
  for method in grid.methods:
    for fraction in grid.label_fractions:
      c = row_config(base, method, fraction, grid.seeds[0])
      if (c.free.mode, c.data.label_fraction) not in checked:
        checked.add((c.free.mode, c.data.label_fraction))
        pipeline.validate_config(c)
  return base


def study_config(config: ml_collections.ConfigDict, grid: Grid) -> ml_collections.ConfigDict:
  """A copy of `config` with the grid's shrinking and overrides applied (the base of every row)."""
  c = copy.deepcopy(config)
  if grid.smoke:
    configs.smoke(c)
  for path, value in grid.overrides.items():
    configs.set_field(c, path, value)
  return c


def row_config(base: ml_collections.ConfigDict, method: str, label_fraction: float,
               seed: int) -> ml_collections.ConfigDict:
  """The config of one run: the method's mode and decision, its label share and the seed replicate."""
  m = METHODS[method]
  c = copy.deepcopy(base)
  for path, value in m.overrides.items():
    configs.set_field(c, path, value)
  c.free.mode = m.mode
  c.eval.confidence = m.confidence
  c.data.label_fraction = label_fraction if m.uses_labels else 0.0  # label-free: one run for every fraction
  c.seed = base.seed + seed
  c.data.seed = base.data.seed + seed
  return c


def _fraction_name(fraction: float) -> str:
  return f'{100 * fraction:g}'


def run_dirs(workdir: str, config: ml_collections.ConfigDict) -> tuple[str, str]:
  """(training dir, evaluation dir) of a row config; equal configs share them, which is the deduplication."""
  name = f'{config.free.mode}-labels{_fraction_name(config.data.label_fraction)}-seed{config.seed}'
  recipe = {k: config.free[k] for k in _RECIPE_FIELDS if config.free[k] != configs.base_config().free[k]}
  recipe.update({k: config.train[k] for k in ('g_learning_rate', 'd_learning_rate', 'grad_clip')
                 if config.train[k] != configs.base_config().train[k]})
  if recipe:  # a method with its own recipe (`Method.overrides`) trains apart from the default one
    name += f'-{checkpoint.config_hash(recipe)[:8]}'
  train_dir = os.path.join(workdir, STUDY_DIR, name)
  eval_hash = checkpoint.config_hash({'eval': config.eval.to_dict(), 'test_seed': config.data.test_seed,
                                      'num_test': config.data.num_test, 'calibration_seed': config.data.seed,
                                      'calibration': config.data.num_calibration})
  return train_dir, os.path.join(train_dir, f'{config.eval.confidence}-{eval_hash[:8]}')


# ---------------------------------------------------------------------------------------------------
# Running.


def best_speedup(sweep: Sequence[Mapping[str, float]], quality_full: float, drop: float) -> float:
  """Largest measured decode speedup of a sweep point within `drop` of the full model's quality (else 1)."""
  ok = [s['speedup_decode_wallclock'] for s in sweep if s['quality'] >= quality_full - drop - 1e-12]
  return float(max(ok, default=1.0))


def run_record(summary: Mapping[str, Any], comparable_drop: float) -> dict:
  """The per-seed figures of one evaluated run (`early_exit_evaluation`'s summary)."""
  per_exit = dict(summary['per_exit_quality'])
  curve = list(per_exit.values())
  layers = (*summary['exit_layers'], summary['num_layers'])
  naive = np.asarray(summary['per_layer_quality_naive'])[np.asarray(layers) - 1]
  return {
      'quality': summary['quality_early_exit'],
      'quality_full': summary['quality_full'],
      'speedup_decode_wallclock': summary['speedup_decode_wallclock'],
      'speedup_layers': summary['speedup_layers'],
      'speedup_end_to_end_wallclock': summary['speedup_end_to_end_wallclock'],
      'speedup_at_comparable_quality': best_speedup(summary['sweep'], summary['quality_full'],
                                                    comparable_drop),
      'threshold': summary['threshold'],
      'mean_exit_layer': summary['mean_exit_layer'],
      'overthinking_rate': summary['overthinking_rate'],
      'mid_crisis_dip': analysis.mid_crisis_dip(curve),
      'naive_mid_crisis_dip': analysis.mid_crisis_dip(naive),
      'mean_exit_quality': float(np.mean(curve[:-1])),
      'test_risk': summary['test_risk'],
      'per_exit_quality': per_exit,
      'naive_quality_at_exits': dict(zip(per_exit, naive.tolist())),
      'sweep': [dict(s) for s in summary['sweep']],
      'exit_layers': list(summary['exit_layers']),
      'num_layers': summary['num_layers'],
      'quality_metric': summary['quality_metric'],
      'num_test': summary['num_test'],
  }


def run_one(config: ml_collections.ConfigDict, workdir: str, backbone: pipeline.Backbone, mesh,
            comparable_drop: float) -> dict:
  """Trains (or restores) a row's exits and evaluates them; a finished run's record is read back as is.
  Its per-question teacher-forced scores on the test split go to `RIGHT_FILE` (the paired tests)."""
  train_dir, eval_dir = run_dirs(workdir, config)
  record_path = os.path.join(eval_dir, RECORD_FILE)
  if os.path.exists(record_path):
    with open(record_path) as f:
      return json.load(f)
  start = time.perf_counter()
  state = pipeline.exit_stage(config, train_dir, backbone, mesh)  # a finished training is only restored
  train_s = time.perf_counter() - start
  start = time.perf_counter()
  summary = evaluator.early_exit_evaluation(config, eval_dir, backbone, state.exits)
  eval_s = time.perf_counter() - start
  test = pipeline.load_examples(config, 'test', config.data.num_test, backbone.fmt.image_size)
  scores = teacher_scores.TeacherScorer(backbone, config.exits.layers, config.data.task,
                                        config.train.batch_size)(state.exits, test)
  np.savez(os.path.join(eval_dir, RIGHT_FILE), right=scores.right)
  record = run_record(summary, comparable_drop)
  record.update(train_s=train_s, eval_s=eval_s, run=os.path.relpath(eval_dir, workdir))
  with open(record_path + '.tmp', 'w') as f:
    json.dump(record, f, indent=1)
  os.replace(record_path + '.tmp', record_path)
  return record


def _t95(n: int) -> float:
  """Two-sided 95% Student-t quantile for the mean of n seeds (0 for one seed: no spread to scale)."""
  return float(scipy.stats.t.ppf(0.975, n - 1)) if n > 1 else 0.0


def aggregate(records: Sequence[Mapping[str, Any]]) -> dict:
  """Mean and spread over seeds: ``k`` (mean), ``k_std`` (sample std; 0 for one seed) and ``k_ci95`` (half-width
  of the 95% t-interval of the mean over seeds) of every scalar, per-exit quality averaged per exit, sweep
  averaged per threshold index."""
  out = {}
  for k in _SCALARS:
    values = np.asarray([r[k] for r in records], np.float64)
    out[k] = float(values.mean())
    out[f'{k}_std'] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    out[f'{k}_ci95'] = _t95(len(values)) * out[f'{k}_std'] / np.sqrt(len(values))
  for k in ('per_exit_quality', 'naive_quality_at_exits'):
    out[k] = {name: float(np.mean([r[k][name] for r in records])) for name in records[0][k]}
  out['per_exit_quality_std'] = {name: float(np.std([r['per_exit_quality'][name] for r in records],
                                                    ddof=1 if len(records) > 1 else 0))
                                 for name in records[0]['per_exit_quality']}
  out['sweep'] = [{key: float(np.mean([r['sweep'][i][key] for r in records])) for key in point}
                  for i, point in enumerate(records[0]['sweep'])]
  for k in ('exit_layers', 'num_layers', 'quality_metric', 'num_test'):
    out[k] = records[0][k]
  out['runs'] = [r['run'] for r in records]
  return out


def run_study(config: ml_collections.ConfigDict, workdir: str, grid: str | Grid = 'full',
              out_dir: str | None = None, log: Callable[[str], None] = print) -> list[dict]:
  """Runs every row of `grid` on `config`'s backbone (trained first if not cached) and writes the results.

  Args:
    config: an experiment config (e.g. experiments/configs/vqa.py); the grid is applied to a copy.
    workdir: holds ``backbone/`` (shared with experiments/train.py) and ``reproduce/`` (the rows).
    grid: a name in `GRIDS` or a `Grid`.
    out_dir: where `write_results` writes (None: not written).
    log: progress lines.

  Returns:
    The rows (see `write_results`), in grid order: methods x label fractions.
  """
  grid = get_grid(grid)
  base = validate(config, grid)
  workdir = os.path.abspath(workdir)  # orbax refuses relative checkpoint paths
  start = time.perf_counter()
  mesh = parallel.make_mesh()
  backbone = pipeline.backbone_stage(base, workdir, mesh)
  backbone_s = time.perf_counter() - start
  done, rows = {}, []
  for method in grid.methods:
    for fraction in grid.label_fractions:
      records = []
      for seed in grid.seeds:
        c = row_config(base, method, fraction, seed)
        key = run_dirs(workdir, c)
        if key not in done:
          log(f'[reproduce] {method} labels={_fraction_name(fraction)}% seed={seed}: '
              f'{os.path.relpath(key[0], workdir)}')
          done[key] = run_one(c, workdir, backbone, mesh, grid.comparable_drop)
        records.append(done[key])
      m = METHODS[method]
      rows.append({'method': method, 'label_fraction': fraction, 'labels_used': m.uses_labels,
                   'mode': m.mode, 'confidence': m.confidence, 'description': m.description,
                   'seeds': list(grid.seeds), **aggregate(records)})
  add_paired(rows, workdir)
  wall_s = time.perf_counter() - start
  log(f'[reproduce] {len(rows)} rows from {len(done)} runs in {wall_s:.0f} s '
      f'(backbone stage {backbone_s:.0f} s)')
  if out_dir is not None:
    runs_s = sum(r['train_s'] + r['eval_s'] for r in done.values())
    write_results(rows, out_dir, grid, meta={'wall_s': wall_s, 'backbone_s': backbone_s, 'runs': len(done),
                                             'runs_s': runs_s})
  return rows


def add_paired(rows: Sequence[dict], workdir: str, reference: str = 'ce_only') -> None:
  """Adds ``paired_vs_<reference>`` to every other row that has a `reference` row at its label fraction: per exit,
  `paired.compare` over the seeds' test questions (seed i against seed i), and ``mean_exit``: the paired-bootstrap
  interval of the difference in the share of exits right per question (the claims' figure)."""
  def right(row):
    return np.stack([np.load(os.path.join(workdir, run, RIGHT_FILE))['right'] for run in row['runs']])

  for row in rows:
    ref = _find(rows, reference, row['label_fraction'])
    if ref is None or ref is row:
      continue
    a, b = right(row), right(ref)  # bool[S, E + 1, N]
    exits = list(row['per_exit_quality'])[:-1]
    result = {name: paired.compare(a[:, i], b[:, i]).to_dict() for i, name in enumerate(exits)}
    share_a, share_b = a[:, :-1].mean(1), b[:, :-1].mean(1)
    low, high = paired.paired_bootstrap(share_a, share_b)
    result['mean_exit'] = {'diff': float(share_a.mean() - share_b.mean()), 'low': low, 'high': high}
    row[f'paired_vs_{reference}'] = result


# ---------------------------------------------------------------------------------------------------
# Reporting.


def _pm(row: Mapping[str, Any], key: str, fmt: str = '.3f') -> str:
  """mean ± half-width of its 95% interval over seeds (the mean alone for one seed)."""
  text = format(row[key], fmt)
  return f"{text} ± {format(row.get(f'{key}_ci95', 0.0), fmt)}" if len(row['seeds']) > 1 else text


def _find(rows, method: str, fraction: float):
  return next((r for r in rows if r['method'] == method and r['label_fraction'] == fraction), None)


def _sampling_variance(share, num_test: int):
  """Binomial variance of a share of ``num_test`` test questions."""
  share = np.clip(share, 0.0, 1.0)
  return share * (1 - share) / num_test


def _compare(a: Mapping, b: Mapping, key: str, lower_is_better: bool = False) -> tuple[str, float]:
  """(verdict, a - b): 'holds' when the 95% interval of a - b lies on a's better side, 'does not hold' when on
  the worse side, else inconclusive. The interval combines the seeds' 95% t-intervals of both means and the
  test split's sampling error (95% normal; the split is shared by the seeds, so more seeds do not shrink it):
  binomial for shares of the test questions; a mid-crisis dip is a difference of two accuracies near the exits'
  mean."""
  diff = a[key] - b[key]
  if key == 'mid_crisis_dip':
    sampling = sum(2 * _sampling_variance(r['mean_exit_quality'], r['num_test']) for r in (a, b))
  else:
    sampling = sum(_sampling_variance(r[key], r['num_test']) for r in (a, b))
  error = float(np.sqrt(a.get(f'{key}_ci95', 0.0)**2 + b.get(f'{key}_ci95', 0.0)**2 + 1.96**2 * sampling))
  better = -diff if lower_is_better else diff
  if better > error:
    return 'holds', diff
  if better < -error:
    return 'does not hold', diff
  return f'inconclusive (inside the 95% interval, ±{error:.3f})', diff


def paired_verdict(result: Mapping[str, Mapping[str, float]]) -> tuple[str, str]:
  """(verdict, per-exit text) of one paired comparison (`add_paired`): 'holds' when the mean-exit interval lies
  above 0 and no exit is significantly worse (McNemar p < SIGNIFICANCE), 'does not hold' when the interval lies
  below 0 or some exit is significantly worse, else 'inconclusive'."""
  exits = {k: v for k, v in result.items() if k != 'mean_exit'}
  worse = any(t['p_value'] < SIGNIFICANCE and t['diff'] < 0 for t in exits.values())
  mean = result['mean_exit']
  if worse or mean['high'] < 0:
    verdict = 'does not hold'
  elif mean['low'] > 0:
    verdict = 'holds'
  else:
    verdict = 'inconclusive (the paired 95% interval holds 0)'
  tests = ', '.join(f"{k} {t['diff']:+.3f} (McNemar p={t['p_value']:.2g})" for k, t in exits.items())
  return verdict, tests


def claims(rows: Sequence[Mapping[str, Any]], comparable_drop: float) -> list[str]:
  """The paper's three claims checked on the rows, one markdown bullet per comparison (FREE vs CE exits)."""
  lines = []
  naive = list(rows[0]['naive_quality_at_exits'].values())
  flat = 2 * np.sqrt(_sampling_variance(rows[0]['quality_full'], rows[0]['num_test']))
  if max(naive) - min(naive) <= max(comparable_drop, flat):
    lines.append(f'- **Caveat: the backbone is as good at layer {rows[0]["exit_layers"][0]} as at the end** '
                 f'(naive exits through the frozen head: {" / ".join(f"{q:.3f}" for q in naive)}, within two '
                 'standard errors of each other), so exits cannot lose quality and the comparisons below do '
                 'not test the claims; train a stronger backbone first.')
  # No dip in the backbone's own per-layer curve: nothing for any exit training to reduce, so no 2b row.
  no_crisis = rows[0]['naive_mid_crisis_dip'] == 0
  if no_crisis:
    lines.append(f'- (2b) a smaller mid-crisis dip **cannot be tested here**: the backbone\'s quality rises '
                 f'monotonically with depth (naive exits through the frozen head, at the exit layers then the last: '
                 f'{" / ".join(f"{q:.3f}" for q in naive)}), so there is no dip to reduce.')
  fractions = sorted({r['label_fraction'] for r in rows})
  for fraction in fractions:
    free, ce = _find(rows, 'free', fraction), _find(rows, 'ce_only', fraction)
    if free is None or ce is None:
      continue
    pct = _fraction_name(fraction)
    verdict, tests = paired_verdict(free['paired_vs_ce_only'])
    mean = free['paired_vs_ce_only']['mean_exit']
    lines.append(f'- (1) adversarial exits beat CE exits at {pct}% labels: **{verdict}** — mean exit '
                 f'quality {_pm(free, "mean_exit_quality")} (FREE) vs {_pm(ce, "mean_exit_quality")} (CE), paired '
                 f'difference {mean["diff"]:+.3f} (95% interval {mean["low"]:+.3f} to {mean["high"]:+.3f}, test '
                 f'questions and seeds resampled); per exit {tests}; early-exit quality {_pm(free, "quality")} vs '
                 f'{_pm(ce, "quality")}.')
    verdict, diff = _compare(free, ce, 'overthinking_rate', lower_is_better=True)
    lines.append(f'- (2a) less overthinking at {pct}% labels: **{verdict}** — '
                 f'{_pm(free, "overthinking_rate")} (FREE) vs {_pm(ce, "overthinking_rate")} (CE).')
    verdict, diff = _compare(free, ce, 'mid_crisis_dip', lower_is_better=True)
    lines += [] if no_crisis else [f'- (2b) smaller mid-crisis dip at {pct}% labels: **{verdict}** — dip '
                 f'{_pm(free, "mid_crisis_dip")} (FREE) vs {_pm(ce, "mid_crisis_dip")} (CE); naive exits '
                 f'(frozen head) {free["naive_mid_crisis_dip"]:.3f}.']
    fast = free['speedup_at_comparable_quality']
    verdict = 'holds' if fast >= PAPER_SPEEDUP else 'does not hold'
    best, measured, layers = (_pm(free, k, '.2f') for k in ('speedup_at_comparable_quality',
                                                            'speedup_decode_wallclock', 'speedup_layers'))
    lines.append(f'- (3) >= {PAPER_SPEEDUP}x measured decode speedup within {100 * comparable_drop:g} point '
                 f'of the full model at {pct}% labels: **{verdict}** — best {best}x over the sweep; at the '
                 f'calibrated threshold {measured}x measured ({layers}x in layers) for quality '
                 f'{_pm(free, "quality")} vs {free["quality_full"]:.3f} full.')
  return lines


def markdown(rows: Sequence[Mapping[str, Any]], grid: Grid, meta: Mapping[str, Any] | None = None) -> str:
  """The results as markdown: settings, one table per label fraction, the claims, the figures."""
  first = rows[0]
  metric = first['quality_metric']
  exit_names = list(first['per_exit_quality'])
  lines = ['# FREE reproduction on the embedded benchmark', '',
           f'Backbone: {first["num_layers"]}-layer LM, exits after layers {first["exit_layers"]}; full-model '
           f'{metric} {first["quality_full"]:.3f}. Seeds: {list(grid.seeds)}'
           + (' (mean ± half-width of its 95% t-interval over seeds).' if len(grid.seeds) > 1
              else ' (one seed: no spread).'), '',
           'Quality = test-split early-exit quality at the calibrated threshold; speedups are measured '
           'decode wall clock (batch 1) and layer counts; "best ≤ x pt" = largest measured speedup over '
           f'the threshold sweep within {100 * grid.comparable_drop:g} point of the full model. Per-exit '
           'quality is teacher-forced; the mid-crisis dip is measured on it (exits then final layer). '
           'Methods marked † use no labels: one run, reported for every fraction.']
  if meta:
    lines += ['', f'{meta["runs"]} runs; their training and evaluation took {meta["runs_s"] / 60:.1f} min '
                  f'in all (when each was run; this invocation: {meta["wall_s"] / 60:.1f} min, of which '
                  f'backbone stage {meta["backbone_s"] / 60:.1f} min).']
  header = ['method', metric, 'Δ vs full', 'decode speedup', 'layer speedup',
            f'best ≤{100 * grid.comparable_drop:g}pt', 'overthinking', 'mid-crisis dip',
            'per-exit quality (' + ' / '.join(exit_names) + ')']
  for fraction in sorted({r['label_fraction'] for r in rows}):
    lines += ['', f'## {_fraction_name(fraction)}% labels', '', '| ' + ' | '.join(header) + ' |',
              '|' + '---|' * len(header)]
    for r in (r for r in rows if r['label_fraction'] == fraction):
      per_exit = ' / '.join(f'{v:.3f}' for v in r['per_exit_quality'].values())
      lines.append('| ' + ' | '.join([
          r['method'] + ('' if r['labels_used'] else ' †'), _pm(r, 'quality'),
          f'{r["quality"] - r["quality_full"]:+.3f}', _pm(r, 'speedup_decode_wallclock', '.2f') + 'x',
          _pm(r, 'speedup_layers', '.2f') + 'x', _pm(r, 'speedup_at_comparable_quality', '.2f') + 'x',
          _pm(r, 'overthinking_rate'), _pm(r, 'mid_crisis_dip'), per_exit]) + ' |')
  lines += ['', '## The paper\'s claims on this benchmark', '', *claims(rows, grid.comparable_drop), '',
            '## Figures', '']
  for fraction in sorted({r['label_fraction'] for r in rows}):
    name = _fraction_name(fraction)
    lines.append(f'![per-layer quality, {name}% labels](per_layer_quality_labels{name}.png) '
                 f'![quality vs speedup, {name}% labels](quality_vs_speedup_labels{name}.png)')
  return '\n'.join(lines) + '\n'


def write_results(rows: Sequence[Mapping[str, Any]], out_dir: str, grid: Grid,
                  meta: Mapping[str, Any] | None = None) -> list[str]:
  """Writes reproduction.json, reproduction.md and two PNGs per label fraction; returns the paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, JSON_FILE), os.path.join(out_dir, MARKDOWN_FILE)]
  with open(paths[0], 'w') as f:
    json.dump(list(rows), f, indent=1)
  with open(paths[1], 'w') as f:
    f.write(markdown(rows, grid, meta))
  for fraction in sorted({r['label_fraction'] for r in rows}):
    here = [r for r in rows if r['label_fraction'] == fraction]
    name = _fraction_name(fraction)
    layers = (*here[0]['exit_layers'], here[0]['num_layers'])
    curves = {'naive exits (frozen head)': list(here[0]['naive_quality_at_exits'].values())}
    curves.update({r['method']: list(r['per_exit_quality'].values()) for r in here})
    paths.append(analysis.plot_per_layer_quality(
        curves, os.path.join(out_dir, f'per_layer_quality_labels{name}.png'), layers=layers,
        quality_label=f'teacher-forced {here[0]["quality_metric"]}', title=f'{name}% labels'))
    sweeps = {r['method']: ([s['speedup_decode_wallclock'] for s in r['sweep']],
                            [s['quality'] for s in r['sweep']]) for r in here}
    paths.append(analysis.plot_quality_vs_speedup(
        sweeps,
        os.path.join(out_dir, f'quality_vs_speedup_labels{name}.png'), full_quality=here[0]['quality_full'],
        quality_label=here[0]['quality_metric'], title=f'{name}% labels'))
  return paths
