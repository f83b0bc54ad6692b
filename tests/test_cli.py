"""Launcher failures end in one line naming the cause (`free_jax.cli`)."""

import errno
import logging
import os
import subprocess
import sys

import pytest

from free_jax import cli


def _disk_full():
  try:
    raise OSError(errno.ENOSPC, 'No space left on device', '/ckpt/10/state/d/0')
  except OSError as e:
    raise RuntimeError('the async save thread failed') from e  # how orbax reports it


def test_the_cause_of_a_wrapped_disk_error_is_the_last_line(capsys):
  with pytest.raises(SystemExit):
    cli.run_or_exit(_disk_full, exit_now=False)
  assert capsys.readouterr().err.splitlines()[-1] == 'error: No space left on device (errno 28): /ckpt/10/state/d/0'
  tensorstore = ValueError('RESOURCE_EXHAUSTED: Error writing "params.x/0.0": Failed writing: "/ckpt/d/1"')
  assert cli.describe(tensorstore).startswith('disk full or over quota: RESOURCE_EXHAUSTED')


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(capsys):
  def bad_input():
    raise ValueError('eval.threshold=nan must be\n a finite number')
  with pytest.raises(SystemExit):
    cli.run_or_exit(bad_input, exit_now=False)
  assert capsys.readouterr().err == 'error: eval.threshold=nan must be a finite number\n'
  with pytest.raises(ZeroDivisionError):
    cli.run_or_exit(lambda: 1 / 0, exit_now=False)


def test_a_wrapped_disk_error_without_a_file_name_is_named_by_its_wrapper():
  try:
    try:
      raise OSError(errno.ENOSPC, 'No space left on device')
    except OSError as e:
      raise ValueError('RESOURCE_EXHAUSTED: Error writing local file "/ckpt/10/_sharding"') from e
  except ValueError as wrapped:
    assert cli.describe(wrapped) == ('No space left on device (errno 28): RESOURCE_EXHAUSTED: Error writing local '
                                     'file "/ckpt/10/_sharding"')


def test_orbax_background_errors_keep_their_line_but_not_their_traceback():
  cli.run_or_exit(lambda: None, exit_now=False)  # installs the filter, as every launcher does
  record = logging.LogRecord('absl', logging.ERROR, os.path.join('site-packages', 'orbax', 'checkpoint', '_src',
                                                                 'futures', 'future.py'), 387,
                             'save thread raised: disk full', None, (OSError, OSError(errno.ENOSPC, 'full'), None))
  logging.getLogger('absl').handle(record)
  assert record.exc_info is None and record.getMessage() == 'save thread raised: disk full'
  ours = logging.LogRecord('absl', logging.ERROR, '/work/free_jax/training/pipeline.py', 1, 'a bug', None,
                           (ZeroDivisionError, ZeroDivisionError(), None))
  logging.getLogger('absl').handle(ours)
  assert ours.exc_info is not None  # everything else keeps its traceback


def test_closed_event_loop_reports_of_writer_threads_are_silent_and_others_are_not(capsys, monkeypatch):
  monkeypatch.setattr(sys, 'excepthook', sys.__excepthook__)
  cli.run_or_exit(lambda: None, exit_now=False)
  sys.excepthook(RuntimeError, RuntimeError('Event loop is closed'), None)
  assert capsys.readouterr().err == ''
  sys.excepthook(RuntimeError, RuntimeError('something else'), None)
  assert capsys.readouterr().err.strip().splitlines()[-1] == 'RuntimeError: something else'


def test_the_error_line_is_last_even_while_a_background_thread_keeps_writing_to_stderr():
  # A thread that writes to stderr (through Python and through the file descriptor, as C libraries do) for as
  # long as the process lives: nothing it writes may follow the one-line error.
  script = '''
import os, sys, threading, time
from free_jax import cli
sys.setswitchinterval(1e-6)  # the threads interleave as often as they can

def chatter():
  while True:
    sys.stderr.write("Traceback (most recent call last):\\n    RuntimeError\\n")
    os.write(2, b"    RuntimeError\\n")
    time.sleep(1e-4)

def fail():
  for _ in range(4):
    threading.Thread(target=chatter, daemon=True).start()
  time.sleep(0.05)
  raise ValueError("the backbone checkpoint is unreadable")

cli.run_or_exit(fail)
'''
  for _ in range(10):
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 1
    assert out.stderr.splitlines()[-1] == 'error: the backbone checkpoint is unreadable'
