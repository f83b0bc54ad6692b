"""End-to-end tests of experiments/benchmark.py and evaluate.py as command-line programs."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from experiments.configs import vqa
from free_jax.eval import analysis, evaluator

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = 'experiments/configs/vqa.py:smoke'


def _run(script, *args):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, f'experiments/{script}', f'--config={CONFIG}', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)


def test_benchmark_random_model(tmp_path):
  result = _run('benchmark.py', f'--workdir={tmp_path}', '--batch_sizes=1,2', '--config.eval.timing_repeats=1',
                '--config.eval.max_new_tokens=3', '--patterns=02', '--op_counts')
  assert result.returncode == 0, result.stderr[-2000:]
  with open(tmp_path / 'bench' / 'summary.json') as f:
    summary = json.load(f)
  assert summary['model'] == 'random embedded-shape LM'
  assert [r['batch_size'] for r in summary['results']] == [1, 2]
  first = summary['exit_layers'][0]
  for r in summary['results']:
    assert r['full']['tokens_per_s'] > 0 and r['full']['compile_s'] > 0
    always, never = r['early_exit']['0.0'], r['early_exit']['2.0']
    assert always['mean_exit_index'] == 0 and never['mean_exit_index'] == len(summary['exit_layers'])
    assert always['speedup_layers'] == pytest.approx(summary['num_layers'] / (first + 1))
    assert never['speedup_layers'] < 1  # full depth plus every exit layer
    pattern = r['early_exit']['02']
    assert pattern['step_depths'] == [0, 2, 0]
    assert always['ops_per_call'] < pattern['ops_per_call'] < never['ops_per_call']
  assert summary['peak_memory']['host_peak_rss_bytes'] > 0


@pytest.mark.parametrize('flag, error', [
    ('--batch_sizes=0', "error: --batch_sizes=['0'] must be positive integers"),
    ('--patterns=03', "error: schedule pattern '03' must be digits 0..2 (exit index; 2 = the final layer)")])
def test_bad_flags(tmp_path, flag, error):
  result = _run('benchmark.py', f'--workdir={tmp_path}', flag)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1] == error
  assert not list(tmp_path.iterdir())


def test_evaluate_needs_a_trained_run(tmp_path):
  result = _run('evaluate.py', f'--workdir={tmp_path}', '--config.data.test_seed=7')
  assert result.returncode != 0
  assert 'no training run in' in result.stderr.strip().splitlines()[-1]
  assert not list(tmp_path.iterdir())  # nothing created in a workdir that holds no run


@pytest.mark.parametrize('script', ['benchmark.py', 'evaluate.py'])
def test_exits_trained_after_other_layers_are_refused_in_one_line(script, smoke_run):
  workdir, _ = smoke_run
  before = sorted(p.name for p in (workdir / 'eval').iterdir())
  result = _run(script, f'--workdir={workdir}', "--config.exits.layers=(1,3)")
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      f'error: exits.layers=(1, 3), but the exits in {workdir} were trained after layers (1, 2)')
  assert sorted(p.name for p in (workdir / 'eval').iterdir()) == before and not (workdir / 'bench').exists()


def test_an_eval_dir_that_cannot_be_written_is_refused_before_the_evaluation(smoke_run, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(smoke_run[0], workdir, ignore=shutil.ignore_patterns('tensorboard'))
  eval_dir, summary = workdir / 'eval', (workdir / 'eval' / 'summary.json').read_bytes()
  # Root ignores permission bits; an immutable directory refuses new entries even to root.
  if subprocess.run(['chattr', '+i', str(eval_dir)], capture_output=True).returncode:
    pytest.skip('chattr +i is not available on this file system')
  try:
    result = _run('evaluate.py', f'--workdir={workdir}', '--config.eval.threshold=0.5')
  finally:
    subprocess.run(['chattr', '-i', str(eval_dir)], check=True)
  assert result.returncode == 1
  # The directory itself is named (the check before any decoding), not a plot or summary written at the end.
  assert result.stderr.strip().splitlines()[-1] == f'error: {eval_dir} is not writable: Operation not permitted'
  assert (eval_dir / 'summary.json').read_bytes() == summary


def test_an_evaluation_killed_while_plotting_leaves_the_old_summary_with_its_own_plots(smoke_run, tmp_path,
                                                                                    monkeypatch):
  workdir = tmp_path / 'run'
  shutil.copytree(smoke_run[0], workdir, ignore=shutil.ignore_patterns('tensorboard'))
  eval_dir = workdir / 'eval'
  before = {p.name: p.read_bytes() for p in eval_dir.iterdir()}
  config = vqa.get_config('smoke')
  with config.unlocked():
    config.eval.threshold = 0.5  # another evaluation than the stored one
  backbone, exit_params = evaluator.load_run(config, str(workdir))

  def killed(*args, **kwargs):
    raise KeyboardInterrupt  # as a kill between two plots would stop the run
  monkeypatch.setattr(analysis, 'plot_modes', killed)  # the last plot: the others are already drawn
  with pytest.raises(KeyboardInterrupt):
    evaluator.early_exit_evaluation(config, str(workdir), backbone, exit_params, reuse=False)
  assert {p.name: p.read_bytes() for p in eval_dir.iterdir() if not p.name.startswith('.')} == before
