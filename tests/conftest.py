"""Shared fixtures: one `:smoke` training run through the CLI, reused by the tests that read a finished workdir."""

import os
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_train_cli(workdir, *overrides, config='experiments/configs/vqa.py:smoke'):
  """(completed process, seconds) of ``experiments/train.py`` in a fresh process, as a user runs it."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT))  # as `pip install -e .` would
  start = time.time()
  out = subprocess.run([sys.executable, 'experiments/train.py', f'--config={config}', f'--workdir={workdir}',
                        *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  return out, time.time() - start


@pytest.fixture(scope='session')
def smoke_run(tmp_path_factory):
  """A finished `:smoke` run (backbone, exits, evaluation): (workdir, completed process). Read-only."""
  workdir = tmp_path_factory.mktemp('smoke')
  out, seconds = run_train_cli(workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  print(f'\n:smoke CLI run (backbone + exits + eval): {seconds:.1f} s')
  return workdir, out
