"""The reproduction study: the smoke grid end to end via the CLI, shared runs, resume, aggregation, claims."""

import json
import os
import pathlib
import numpy as np
import pytest

from experiments.configs import vqa
from free_jax import reproduce
from tests.conftest import run_study_cli

ROW_KEYS = {'method', 'label_fraction', 'quality', 'speedup_decode_wallclock', 'speedup_layers',
            'per_exit_quality', 'overthinking_rate', 'mid_crisis_dip', 'seeds', 'labels_used', 'sweep',
            'quality_std', 'quality_ci95'}


def _cli(workdir, out):
  return run_study_cli(workdir, out)


def _checkpoint_files(workdir):
  files = (pathlib.Path(workdir) / reproduce.STUDY_DIR).rglob('*')
  return {str(p.relative_to(workdir)): p.stat().st_mtime_ns
          for p in files if p.is_file() and 'checkpoints' in p.parts}


@pytest.fixture(scope='module')
def study(smoke_study):
  return smoke_study


def test_smoke_study_writes_rows_tables_and_plots(study):
  grid = reproduce.GRIDS['smoke']
  out = study / 'results'
  rows = json.loads((out / reproduce.JSON_FILE).read_text())
  assert [(r['method'], r['label_fraction']) for r in rows] == [
      (m, f) for m in grid.methods for f in grid.label_fractions]
  for r in rows:
    assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
    assert 0 <= r['quality'] <= 1 and 0 <= r['overthinking_rate'] <= 1 and r['mid_crisis_dip'] >= 0
    assert r['speedup_decode_wallclock'] > 0 and r['speedup_layers'] > 0
    assert list(r['per_exit_quality']) == ['exit1', 'exit2', 'final']
    assert r['per_exit_quality']['final'] == rows[0]['per_exit_quality']['final']  # one backbone
    assert r['quality_full'] == rows[0]['quality_full']
  free = [r for r in rows if r['method'] == 'free']
  assert all(set(r['paired_vs_ce_only']) == {'exit1', 'exit2', 'mean_exit'} for r in free)
  md = (out / reproduce.MARKDOWN_FILE).read_text()
  for m in grid.methods:
    assert f'| {m}' in md
  assert '## 50% labels' in md and '## 100% labels' in md and "## The paper's claims" in md
  for name in ('per_layer_quality_labels50.png', 'quality_vs_speedup_labels50.png',
               'per_layer_quality_labels100.png', 'quality_vs_speedup_labels100.png'):
    assert (out / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_identical_runs_are_shared(study):
  rows = json.loads((study / 'results' / reproduce.JSON_FILE).read_text())
  by = {(r['method'], r['label_fraction']): r for r in rows}
  # Label-free: one run reported for every fraction, marked.
  unsup = [by['free_unsup_kd', f] for f in (0.5, 1.0)]
  assert unsup[0]['runs'] == unsup[1]['runs'] and not unsup[0]['labels_used']
  assert unsup[0]['quality'] == unsup[1]['quality']
  # PABEE decides with patience over the exits ce_only trained (same training dir, own evaluation).
  for f in (0.5, 1.0):
    pabee, ce = by['pabee', f]['runs'][0], by['ce_only', f]['runs'][0]
    assert os.path.dirname(pabee) == os.path.dirname(ce) and pabee != ce
    assert by['pabee', f]['per_exit_quality'] == by['ce_only', f]['per_exit_quality']
  assert by['free', 0.5]['runs'] != by['free', 1.0]['runs']
  trained = sorted(p.name for p in (study / reproduce.STUDY_DIR).iterdir())
  assert trained == ['ce_only-labels100-seed0', 'ce_only-labels50-seed0', 'semi_supervised-labels100-seed0',
                     'semi_supervised-labels50-seed0', 'unsupervised_kd-labels0-seed0']


def test_rerun_reuses_every_finished_run(study, tmp_path):
  before = _checkpoint_files(study)
  _cli(study, tmp_path)
  assert _checkpoint_files(study) == before  # nothing retrained
  assert (json.loads((tmp_path / reproduce.JSON_FILE).read_text())
          == json.loads((study / 'results' / reproduce.JSON_FILE).read_text()))


def _record(quality, exits, speedups=(1.0, 2.0), seed_run='r'):
  """A run record as `run_record` makes it, from a hand-built evaluation summary."""
  summary = {'quality_early_exit': quality, 'quality_full': 0.9, 'speedup_decode_wallclock': 1.8,
             'speedup_layers': 2.0, 'speedup_end_to_end_wallclock': 1.5, 'threshold': 0.9,
             'mean_exit_layer': 4.0, 'overthinking_rate': 0.1, 'test_risk': 0.01, 'exit_layers': [2, 4, 6],
             'num_layers': 8, 'quality_metric': 'exact_match', 'num_test': 10_000,
             'per_exit_quality': dict(zip(['exit2', 'exit4', 'exit6', 'final'], exits)),
             'per_layer_quality_naive': [0.1, 0.6, 0.5, 0.3, 0.4, 0.7, 0.8, 0.9],
             'sweep': [{'threshold': 1.0, 'quality': 0.9, 'speedup_decode_wallclock': speedups[0]},
                       {'threshold': 0.5, 'quality': 0.85, 'speedup_decode_wallclock': speedups[1]}]}
  record = reproduce.run_record(summary, comparable_drop=0.01)
  record.update(train_s=1.0, eval_s=2.0, run=seed_run)
  return record


def test_run_record_and_aggregate():
  a = _record(0.8, (0.5, 0.3, 0.7, 0.9), speedups=(1.0, 3.0), seed_run='a')
  b = _record(0.6, (0.7, 0.5, 0.9, 0.9), speedups=(1.2, 2.0), seed_run='b')
  assert a['mid_crisis_dip'] == pytest.approx(0.2)  # 0.5 -> 0.3 -> 0.7: recovered dip of 0.2
  assert a['naive_mid_crisis_dip'] == pytest.approx(0.3)  # the naive curve read at layers 2, 4, 6, 8
  assert a['naive_quality_at_exits'] == {'exit2': 0.6, 'exit4': 0.3, 'exit6': 0.7, 'final': 0.9}
  assert a['speedup_at_comparable_quality'] == 1.0  # 3x loses 5 points: not comparable
  assert a['mean_exit_quality'] == pytest.approx(0.5)
  row = reproduce.aggregate([a, b])
  assert row['quality'] == pytest.approx(0.7)
  assert row['quality_std'] == pytest.approx(np.std([0.8, 0.6], ddof=1))
  assert row['quality_ci95'] == pytest.approx(12.7062 * np.std([0.8, 0.6], ddof=1) / np.sqrt(2), rel=1e-4)
  assert row['per_exit_quality']['exit4'] == pytest.approx(0.4)
  assert row['sweep'][1]['speedup_decode_wallclock'] == pytest.approx(2.5)
  assert row['runs'] == ['a', 'b'] and reproduce.aggregate([a])['quality_std'] == 0.0


def _paired_rows(tmp_path, free_right, ce_right):
  """FREE and CE rows of two seeds whose runs hold these right/wrong arrays (bool[S, E + 1, N])."""
  rows = []
  for method, right in (('free', free_right), ('ce_only', ce_right)):
    runs = []
    for seed, scores in enumerate(right):
      run = tmp_path / method / str(seed)
      run.mkdir(parents=True, exist_ok=True)
      np.savez(run / reproduce.RIGHT_FILE, right=scores)
      runs.append(str(run.relative_to(tmp_path)))
    row = reproduce.aggregate([_record(0.85, tuple(right[0].mean(1)))])
    row.update(method=method, label_fraction=0.1, seeds=[0, 1], runs=runs)
    rows.append(row)
  reproduce.add_paired(rows, str(tmp_path))
  return rows


def test_claims_verdicts_follow_the_paired_tests(tmp_path):
  rng = np.random.default_rng(0)
  ce = rng.random((2, 4, 400)) < 0.6
  free = ce.copy()
  free[:, :3] |= rng.random((2, 3, 400)) < 0.3  # FREE's exits get more questions right, lose none
  rows = _paired_rows(tmp_path / 'better', free, ce)
  paired = rows[0]['paired_vs_ce_only']
  assert 'paired_vs_ce_only' not in rows[1]
  assert paired['exit2']['a_only'] == int((free[:, 0] & ~ce[:, 0]).sum()) and paired['exit2']['b_only'] == 0
  assert paired['mean_exit']['low'] > 0
  lines = reproduce.claims(rows, comparable_drop=0.01)
  assert '**holds**' in lines[0] and 'McNemar p=' in lines[0]
  assert 'inconclusive' in lines[1]  # equal overthinking
  assert '**does not hold**' in lines[3]  # best comparable speedup 1.0x < 1.51x
  assert '**does not hold**' in reproduce.claims(_paired_rows(tmp_path / 'worse', ce, free), 0.01)[0]
  assert 'inconclusive' in reproduce.claims(_paired_rows(tmp_path / 'same', ce, ce), 0.01)[0]
  for row in rows:  # a backbone that is as good at every exit cannot test the claims: said first
    row['naive_quality_at_exits'] = dict.fromkeys(row['naive_quality_at_exits'], 0.5)
  assert reproduce.claims(rows, 0.01)[0].startswith('- **Caveat')


def test_a_claim_the_backbone_cannot_test_is_said_once_not_judged(tmp_path):
  ce = np.random.default_rng(1).random((2, 4, 50)) < 0.6
  rows = _paired_rows(tmp_path, ce, ce)
  for row in rows:  # a monotone per-layer curve: no mid-crisis to reduce
    row['naive_mid_crisis_dip'] = 0.0
  lines = reproduce.claims(rows, 0.01)
  assert sum('(2b)' in line for line in lines) == 1 and 'cannot be tested here' in lines[0]


def test_bad_grids_fail_clearly():
  config = vqa.get_config('smoke')
  smoke = reproduce.GRIDS['smoke']
  with pytest.raises(ValueError, match="grid='huge'"):
    reproduce.validate(config, 'huge')
  with pytest.raises(ValueError, match=r"unknown methods \['bert'\]"):
    reproduce.validate(config, reproduce.Grid(methods=('free', 'bert'), label_fractions=(0.1,), seeds=(0,)))
  with pytest.raises(ValueError, match='label_fractions'):
    reproduce.validate(config, reproduce.Grid(methods=('free',), label_fractions=(0.0,), seeds=(0,)))
  with pytest.raises(ValueError, match="'train.stepz' names no config field"):
    reproduce.study_config(config, reproduce.Grid(methods=('free',), label_fractions=(0.1,), seeds=(0,),
                                                  overrides={'train.stepz': 3}))
  # 1% of the smoke config's 128 training examples labels nobody: named before anything runs.
  with pytest.raises(ValueError, match='data.label_fraction=0.001'):
    reproduce.validate(config, reproduce.Grid(methods=('ce_only',), label_fractions=(0.001,), seeds=(0,),
                                              smoke=smoke.smoke))
