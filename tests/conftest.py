"""Shared fixtures: one `:smoke` training run through the CLI (and one smoke study on it), made once for the whole
suite and reused by the tests that read a finished workdir."""

import os
import pathlib
import shutil
import subprocess
import sys
import time

import filelock
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# One persistent XLA compilation cache for the whole suite: both xdist workers and every process they start
# (the CLI tests) read it, so the smoke programs compiled once are loaded, not compiled, by every later run
# (a `:smoke` train.py run: 96 s -> 30 s here). Set before anything imports jax; keyed by the programs
# themselves (and the jax version), so an entry can never stand for another program.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', str(ROOT / '.pytest_cache' / 'jax_compilation_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
# The tests assert behaviour on tiny models, so most of the suite's time is XLA compiling, not running: LLVM at
# -O0 cuts the suite's CPU time by ~30% (17.5 -> 13 min here). The CLI and notebook subprocesses inherit it;
# benchmarks and user runs keep the default optimisation level.
os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()


def run_train_cli(workdir, *overrides, config='experiments/configs/vqa.py:smoke'):
  """(completed process, seconds) of ``experiments/train.py`` in a fresh process, as a user runs it."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT))  # as `pip install -e .` would
  start = time.time()
  out = subprocess.run([sys.executable, 'experiments/train.py', f'--config={config}', f'--workdir={workdir}',
                        *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  return out, time.time() - start


def _made_once(tmp_path_factory, name: str, make) -> pathlib.Path:
  """A directory that `make(path)` fills once per test session, shared by every xdist worker: the first worker
  to ask makes it under a file lock, the others wait and read it (both workers would otherwise run the same
  minutes-long CLI job). A failed `make` leaves no directory behind, so each asker raises its own error."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent  # the session's directory, above each worker's own
  path, done = root / name, root / f'{name}.done'
  with filelock.FileLock(str(root / f'{name}.lock')):
    if not done.exists():
      shutil.rmtree(path, ignore_errors=True)
      path.mkdir()
      try:
        make(path)
      except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
      done.touch()
  return path


@pytest.fixture(scope='session')
def smoke_run(tmp_path_factory):
  """A finished `:smoke` run (backbone, exits, evaluation): (workdir, completed process). Read-only."""
  def make(path):
    out, seconds = run_train_cli(path / 'run')
    assert out.returncode == 0, out.stderr[-3000:]
    (path / 'stdout.txt').write_text(out.stdout)
    (path / 'stderr.txt').write_text(out.stderr)
    print(f'\n:smoke CLI run (backbone + exits + eval): {seconds:.1f} s')

  path = _made_once(tmp_path_factory, 'smoke', make)
  out = subprocess.CompletedProcess(args='train.py', returncode=0, stdout=(path / 'stdout.txt').read_text(),
                                    stderr=(path / 'stderr.txt').read_text())
  return path / 'run', out


def run_study_cli(workdir, out, *flags):
  """Seconds of ``experiments/reproduce.py --grid=smoke`` in a fresh process (asserts it succeeded)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT))
  start = time.time()
  result = subprocess.run([sys.executable, 'experiments/reproduce.py', '--grid=smoke', f'--workdir={workdir}',
                           f'--out={out}', *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
  assert result.returncode == 0, result.stderr[-3000:]
  return time.time() - start


@pytest.fixture(scope='session')
def smoke_study(smoke_run, tmp_path_factory):
  """A finished smoke study (results in ``workdir/results``) on the `smoke_run` backbone (copied: the same
  config trains the same backbone, so the study's backbone stage is skipped). Read-only."""
  def make(workdir):
    shutil.copytree(smoke_run[0] / 'backbone', workdir / 'backbone')
    seconds = run_study_cli(workdir, workdir / 'results')
    print(f'\nsmoke study (5 exit trainings + 7 evaluations): {seconds:.1f} s')

  return _made_once(tmp_path_factory, 'study', make)
