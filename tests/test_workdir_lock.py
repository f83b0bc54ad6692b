"""One run per workdir: a second run is refused naming the first; a killed run leaves nothing locked."""

import os
import signal
import subprocess
import sys
import time

import pytest

from free_jax import workdir_lock
from tests.conftest import ROOT, run_train_cli

_HOLDER = ('import sys, time\nfrom free_jax import workdir_lock\nwith workdir_lock.hold(sys.argv[1]):\n'
           '  print("held", flush=True)\n  time.sleep(600)\n')


def _hold_in_another_process(workdir):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT))
  process = subprocess.Popen([sys.executable, '-c', _HOLDER, str(workdir)], env=env, stdout=subprocess.PIPE, text=True)
  assert process.stdout.readline().strip() == 'held'
  return process


def test_a_live_holder_is_named_and_a_killed_one_frees_the_workdir(tmp_path):
  holder = _hold_in_another_process(tmp_path)
  try:
    with pytest.raises(workdir_lock.WorkdirBusyError, match=rf'{tmp_path} is in use by another run \(pid '
                                                             rf'{holder.pid} on .* since .*: -c {tmp_path}\); wait for it'):
      with workdir_lock.hold(str(tmp_path)):
        pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with workdir_lock.hold(str(tmp_path)):  # the kernel dropped the dead run's lock
    with workdir_lock.hold(str(tmp_path)):  # and this process may nest its own
      pass


def test_train_cli_refuses_a_workdir_in_use_before_any_work(tmp_path):
  holder = _hold_in_another_process(tmp_path)
  try:
    start = time.time()
    out, _ = run_train_cli(tmp_path)
    assert out.returncode == 1 and 'Traceback' not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(f'error: {tmp_path} is in use by another run (pid {holder.pid}')
    assert time.time() - start < 120
    assert sorted(os.listdir(tmp_path)) == [workdir_lock.LOCK_FILE]  # nothing written by the refused run
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
