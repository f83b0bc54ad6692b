"""The recipe screen: does any of FREE's untested choices let adversarial exits beat CE-only exits?

Each `Variant` is FREE's config with a few fields changed. It runs at every label fraction next to its control: a
CE-only run (or, for the KD variant, KD alone) given the same change wherever that change touches CE-only training
(exit init, the generator's optimizer, clipping), at the same steps, on the same backbone, data and seed. Every run

* logs a learning curve: teacher-forced answer accuracy of every exit on held-out calibration questions every
  ``validate_every`` steps (`pipeline.train_loop`), so the step count can be read off where both have converged;
* is scored on the test split question by question (`teacher_scores`), so a variant and its control are compared
  paired (`paired`: McNemar's exact test per exit, and a bootstrap interval of the difference).

Runs live in ``workdir/screen/<run>/`` (checkpoints, metrics.jsonl, ``test_right.npz``, ``record.json``) and a
re-run reuses every finished one. `write_results` writes ``screen.json``, ``screen.md`` and one curve plot per label
fraction. The decision rule and the figures are in results/screen.md; docs/reproduction.md explains the screen.
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

from free_jax import configs, workdir_lock
from free_jax.eval import analysis, paired, teacher_scores
from free_jax.training import checkpoint, free_step, parallel, pipeline
from free_jax.training import logging as metrics_logging

SCREEN_DIR = 'screen'
RECORD_FILE = 'record.json'
RIGHT_FILE = 'test_right.npz'
JSON_FILE = 'screen.json'
MARKDOWN_FILE = 'screen.md'
SIGNIFICANCE = 0.05
# Fields a control (CE-only or KD-only) copies from its variant: they change how any exit trains, not the game.
_SHARED_PREFIXES = ('exits.', 'train.g_learning_rate', 'train.grad_clip', 'train.warmup_steps', 'free.term_clip')


@dataclasses.dataclass(frozen=True)
class Variant:
  """FREE with `overrides` (dotted config path -> value), against `control_mode` with the shared ones."""

  overrides: Mapping[str, Any]
  description: str
  mode: str = 'semi_supervised'
  control_mode: str = 'ce_only'

  @property
  def control_overrides(self) -> dict[str, Any]:
    return {k: v for k, v in self.overrides.items() if k.startswith(_SHARED_PREFIXES)}


VARIANTS = {
    'free': Variant({}, 'the default recipe: adversarial weight 1 on every real token, G 3e-4 / D 1e-4, one '
                        'global clip, exits initialised from the next layer'),
    'adv0.3': Variant({'free.adv_weight': 0.3}, 'adversarial weight 0.3'),
    'adv0.1': Variant({'free.adv_weight': 0.1}, 'adversarial weight 0.1'),
    'adv_targets': Variant({'free.adv_positions': 'targets'}, 'the adversarial game on the answer positions only'),
    'd_lr_3e-4': Variant({'train.d_learning_rate': 3e-4}, 'D learning rate = G learning rate (3e-4)'),
    'd_lr_1e-3': Variant({'train.d_learning_rate': 1e-3}, 'D learning rate 1e-3 > G 3e-4 (two timescales)'),
    'lr_1e-4': Variant({'train.g_learning_rate': 1e-4}, 'G = D = 1e-4 (the official code)'),
    'term_clip': Variant({'free.term_clip': 1.0, 'train.grad_clip': 0.0},
                         'each term clipped to norm 1 on its own, no global clip'),
    'no_clip': Variant({'train.grad_clip': 0.0}, 'no gradient clipping'),
    'disc_wide': Variant({'discriminator.hidden': 512}, 'discriminator width 512 (default 128)'),
    'disc_deep': Variant({'discriminator.depth': 4}, 'discriminator depth 4 (default 2)'),
    'random_init': Variant({'exits.init': 'random'}, 'exits initialised at random (the official code)'),
    'kd': Variant({}, 'FREE + KD (no labels) against KD alone', mode='unsupervised_kd', control_mode='kd_only'),
}


@dataclasses.dataclass(frozen=True)
class Screen:
  """Which variants, at which label fractions and seeds, for how many exit steps.

  Attributes:
    variants: names in `VARIANTS`.
    label_fractions: shares of ``data.num_train`` whose labels CE may see.
    seeds: replicate offsets added to ``seed`` and ``data.seed`` (the test split stays fixed).
    steps: exit training steps of every run (``train.steps``).
    validate_every: steps between the learning curve's points.
    overrides: config fields every run gets (dotted path -> value).
  """

  variants: tuple[str, ...]
  label_fractions: tuple[float, ...] = (0.01, 0.1)
  seeds: tuple[int, ...] = (0,)
  steps: int = 6000
  validate_every: int = 250
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def run_config(base: ml_collections.ConfigDict, screen: Screen, mode: str, overrides: Mapping[str, Any],
               fraction: float, seed: int) -> ml_collections.ConfigDict:
  """One run's config: the screen's settings, then the run's mode, overrides, label share and seed."""
  c = copy.deepcopy(base)
  for path, value in {**screen.overrides, 'train.steps': screen.steps,
                      'train.validate_every': screen.validate_every, **overrides}.items():
    configs.set_field(c, path, value)
  c.free.mode = mode
  c.data.label_fraction = fraction if 'ce' in free_step.MODES[mode][1] else 0.0
  c.seed, c.data.seed = base.seed + seed, base.data.seed + seed
  return c


def run_name(base: ml_collections.ConfigDict, c: ml_collections.ConfigDict) -> str:
  """`mode-labels<pct>-seed<s>-<hash of what differs from the base>`: equal configs share one run."""
  changed = {k: v for k, v in _flat(c).items() if _flat(base).get(k) != v}
  pct = f'{100 * c.data.label_fraction:g}'
  return f'{c.free.mode}-labels{pct}-seed{c.seed}-{checkpoint.config_hash(changed)[:8]}'


def _flat(c: ml_collections.ConfigDict, prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in c.items():
    if isinstance(v, ml_collections.ConfigDict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def pairs(base: ml_collections.ConfigDict, screen: Screen) -> list[dict]:
  """Every (variant, fraction, seed) with its run config and its control's."""
  out = []
  for name in screen.variants:
    if name not in VARIANTS:
      raise ValueError(f'unknown variant {name!r}; expected names from {tuple(VARIANTS)}')
    v = VARIANTS[name]
    labelled = 'ce' in free_step.MODES[v.mode][1]
    for fraction in (screen.label_fractions if labelled else screen.label_fractions[:1]):
      for seed in screen.seeds:
        out.append({'variant': name, 'label_fraction': fraction if labelled else 0.0, 'seed': seed,
                    'run': run_config(base, screen, v.mode, v.overrides, fraction, seed),
                    'control': run_config(base, screen, v.control_mode, v.control_overrides, fraction, seed)})
  return out


def validate(config: ml_collections.ConfigDict, screen: Screen) -> list[dict]:
  """Checks every run's config before anything is trained; returns `pairs`."""
  if not screen.label_fractions or not all(0 < f <= 1 for f in screen.label_fractions):
    raise ValueError(f'label_fractions={screen.label_fractions} must be non-empty and in (0, 1]')
  if not screen.seeds or len(set(screen.seeds)) != len(screen.seeds):
    raise ValueError(f'seeds={screen.seeds} must be non-empty and distinct')
  if screen.steps < 1 or screen.validate_every < 1:
    raise ValueError(f'steps={screen.steps} and validate_every={screen.validate_every} must be >= 1')
  found = pairs(config, screen)
  for p in found:
    for c in (p['run'], p['control']):
      pipeline.validate_config(c)
  return found


# ---------------------------------------------------------------------------------------------------
# Running.


def run_one(config: ml_collections.ConfigDict, run_dir: str, backbone: pipeline.Backbone, mesh,
            scorer: teacher_scores.TeacherScorer, test: dict) -> dict:
  """Trains (or resumes) one run and scores it on the test split; a finished run's record is read back."""
  record_path = os.path.join(run_dir, RECORD_FILE)
  if os.path.exists(record_path):
    with open(record_path) as f:
      return json.load(f)
  start = time.perf_counter()
  with workdir_lock.hold(run_dir):  # two screens may share a workdir, never a run
    state = pipeline.exit_stage(config, run_dir, backbone, mesh)
  train_s = time.perf_counter() - start
  scores = scorer(state.exits, test)
  np.savez(os.path.join(run_dir, RIGHT_FILE), right=scores.right, names=np.asarray(scores.names))
  curve = [{k: v for k, v in r.items() if k == 'step' or k.startswith('val/')}
           for r in metrics_logging.read_metrics(run_dir) if any(k.startswith('val/') for k in r)]
  record = {'mode': config.free.mode, 'label_fraction': config.data.label_fraction, 'seed': config.seed,
            'steps': config.train.steps, 'test_answer_acc': scores.answer_accuracy(),
            'test_token_acc': scores.token_accuracy(), 'curve': curve, 'train_s': train_s,
            'num_test': int(scores.right.shape[1])}
  with open(record_path + '.tmp', 'w') as f:
    json.dump(record, f, indent=1)
  os.replace(record_path + '.tmp', record_path)
  return record


def _right(run_dir: str) -> np.ndarray:
  with np.load(os.path.join(run_dir, RIGHT_FILE)) as f:
    return f['right']


def run_screen(config: ml_collections.ConfigDict, workdir: str, screen: Screen, out_dir: str | None = None,
               log: Callable[[str], None] = print) -> list[dict]:
  """Runs every variant and control of `screen` on `config`'s backbone; returns the rows, written to `out_dir`
  (when given) as each pair finishes.

  A row = one variant at one label fraction: its test accuracies and its control's, per exit, mean over
  seeds, and the paired comparison per exit (`paired.compare` over the seeds' test questions).
  """
  found = validate(config, screen)
  workdir = os.path.abspath(workdir)
  mesh = parallel.make_mesh()
  backbone = pipeline.backbone_stage(config, workdir, mesh)
  scorer = teacher_scores.TeacherScorer(backbone, config.exits.layers, config.data.task, config.train.batch_size)
  test = pipeline.load_examples(config, 'test', config.data.num_test, backbone.fmt.image_size)
  records, rows = {}, {}
  for p in found:
    for role in ('control', 'run'):
      name = run_name(config, p[role])
      if name not in records:
        log(f'[screen] {p["variant"]} ({role}) labels={100 * p["label_fraction"]:g}% seed={p["seed"]}: {name}')
        run_dir = os.path.join(workdir, SCREEN_DIR, name)
        records[name] = dict(run_one(p[role], run_dir, backbone, mesh, scorer, test), run=name,
                             right=_right(run_dir))
      p[f'{role}_name'] = name
    rows.setdefault((p['variant'], p['label_fraction']), []).append(p)
    out = [_row(variant, fraction, group, records) for (variant, fraction), group in rows.items()]
    if out_dir is not None:  # after every pair: a long screen shows what it has so far
      write_results(out, out_dir, screen)
  return out


def _row(variant: str, fraction: float, group: Sequence[dict], records: Mapping[str, dict]) -> dict:
  runs = [records[p['run_name']] for p in group]
  controls = [records[p['control_name']] for p in group]
  names = list(runs[0]['test_answer_acc'])
  mean = lambda rs, name: float(np.mean([r['test_answer_acc'][name] for r in rs]))
  comparisons = {}
  for i, name in enumerate(names[:-1]):  # the exits; the backbone row is the same for both
    comparisons[name] = paired.compare(np.stack([r['right'][i] for r in runs]),
                                       np.stack([r['right'][i] for r in controls])).to_dict()
  v = VARIANTS[variant]
  return {'variant': variant, 'description': v.description, 'mode': v.mode, 'control_mode': v.control_mode,
          'label_fraction': fraction, 'seeds': [p['seed'] for p in group], 'steps': runs[0]['steps'],
          'exit_names': names[:-1], 'backbone': mean(runs, names[-1]),
          'answer_acc': {n: mean(runs, n) for n in names[:-1]},
          'control_answer_acc': {n: mean(controls, n) for n in names[:-1]},
          'paired': comparisons, 'runs': [r['run'] for r in runs], 'controls': [r['run'] for r in controls],
          'curves': {'run': [r['curve'] for r in runs], 'control': [r['curve'] for r in controls]},
          'num_test': runs[0]['num_test']}


# ---------------------------------------------------------------------------------------------------
# Reporting.


def verdict(row: Mapping[str, Any]) -> str:
  """'FREE better' / 'FREE worse' at p < SIGNIFICANCE on any exit (worse wins a tie: no cherry-picking), else
  'no difference'."""
  tests = row['paired'].values()
  if any(t['p_value'] < SIGNIFICANCE and t['diff'] < 0 for t in tests):
    return 'worse'
  if any(t['p_value'] < SIGNIFICANCE and t['diff'] > 0 for t in tests):
    return 'better'
  return 'no difference'


def markdown(rows: Sequence[Mapping[str, Any]], screen: Screen) -> str:
  first = rows[0]
  exits = first['exit_names']
  lines = ['# The FREE recipe screen: each variant against its control, paired', '',
           f'{screen.steps} exit steps per run; seeds {list(screen.seeds)}; test split of {first["num_test"]} '
           f'questions; teacher-forced answer accuracy per exit (backbone {first["backbone"]:.3f}). Each cell: '
           'variant vs control (difference, McNemar p). Verdict: "better" / "worse" when some exit differs at '
           f'p < {SIGNIFICANCE} ("worse" first).']
  for fraction in sorted({r['label_fraction'] for r in rows}):
    title = 'no labels' if fraction == 0 else f'{100 * fraction:g}% labels'
    header = ['variant', 'control', *exits, 'verdict']
    lines += ['', f'## {title}', '', '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for r in (r for r in rows if r['label_fraction'] == fraction):
      cells = [f"{r['answer_acc'][n]:.3f} vs {r['control_answer_acc'][n]:.3f} "
               f"({r['paired'][n]['diff']:+.3f}, p={r['paired'][n]['p_value']:.2g})" for n in exits]
      lines.append('| ' + ' | '.join([f"{r['variant']}: {r['description']}", r['control_mode'], *cells,
                                      verdict(r)]) + ' |')
    lines += ['', f'![learning curves, {title}](curves_labels{100 * fraction:g}.png)']
  return '\n'.join(lines) + '\n'


def write_results(rows: Sequence[Mapping[str, Any]], out_dir: str, screen: Screen) -> list[str]:
  """screen.json, screen.md and one learning-curve plot per label fraction; returns the paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, JSON_FILE), os.path.join(out_dir, MARKDOWN_FILE)]
  with open(paths[0], 'w') as f:
    json.dump([{k: v for k, v in r.items() if k != 'curves'} for r in rows], f, indent=1)
  with open(paths[1], 'w') as f:
    f.write(markdown(rows, screen))
  for fraction in sorted({r['label_fraction'] for r in rows}):
    curves, seen = {}, set()
    for r in (r for r in rows if r['label_fraction'] == fraction):
      for role, names in (('run', r['runs']), ('control', r['controls'])):
        for seed, run, curve in zip(r['seeds'], names, r['curves'][role]):
          if run in seen:
            continue  # a control shared by several variants: one line
          seen.add(run)
          label = r['variant'] if role == 'run' else f"{r['control_mode']} (control of {r['variant']})"
          label += f' seed {seed}' if len(r['seeds']) > 1 else ''
          curves[label] = ([p['step'] for p in curve],
                           [np.mean([p[f'val/{n}/answer_acc'] for n in r['exit_names']]) for p in curve])
    paths.append(analysis.plot_learning_curves(
        curves, os.path.join(out_dir, f'curves_labels{100 * fraction:g}.png'), xlabel='exit training step',
        ylabel='mean exit answer accuracy (validation)',
        title='no labels' if fraction == 0 else f'{100 * fraction:g}% labels'))
  return paths
