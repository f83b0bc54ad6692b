"""Launcher failures end in one line naming the cause (`free_jax.cli`)."""

import errno

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
