"""What the launchers in ``experiments/`` share: flag parsing and failures that end in one line naming the cause.

    app.run(main, flags_parser=cli.parse_flags)
    cli.run_or_exit(pipeline.train_and_evaluate, config, workdir)

A user error (bad config or input, a missing or damaged file, a full or read-only disk) is printed as one
line, ``error: ...``, with no traceback; anything else (a bug) keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from typing import Any

# Errors that are the user's or the machine's, not the code's.
_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError)
_OS_CAUSES = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.ENOENT, errno.EIO)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing where a bad ``--config.*`` override exits with one line naming the field."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
    message = ' '.join(str(e).replace('\\n', ' ').replace('\\', '').replace("'", '').strip('"').split())
    overrides = [a.split('=')[0] for a in argv[1:] if a.startswith('--config.')]
    raise SystemExit(f'config error: {message} (overrides: {", ".join(overrides) or "none"})') from None


def _os_cause(error: BaseException) -> OSError | None:
  """The first OSError with a telling errno in the exception's chain (orbax wraps disk errors in its own)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _OS_CAUSES:
      return error
    error = error.__cause__ or error.__context__
  return None


def describe(error: BaseException) -> str | None:
  """One line naming a user error's cause, or None for an unexpected error (a bug)."""
  cause = _os_cause(error)
  if cause is not None:
    where = f': {cause.filename}' if cause.filename else ''
    return f'{cause.strerror or errno.errorcode.get(cause.errno, cause.errno)} (errno {cause.errno}){where}'
  if isinstance(error, _USER_ERRORS):
    message = ' '.join(str(error).split())
    if 'RESOURCE_EXHAUSTED' in message:  # tensorstore's disk-full error (orbax saves through it)
      message = f'disk full or over quota: {message}'
    return message
  return None


def run_or_exit(fn: Callable[..., Any], *args, exit_now: bool = True, **kwargs) -> Any:
  """fn(*args, **kwargs); a user error exits (status 1) with ``error: <cause>`` as the last line.

  With `exit_now` the process ends right after that line: background writers that failed with the same error
  (orbax's async saves) would otherwise print their tracebacks at interpreter shutdown, after it. What was
  saved is already on disk or in a temporary directory that the next run removes.
  """
  try:
    return fn(*args, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    message = describe(e)
    if message is None:
      raise
    sys.stdout.flush()
    print(f'error: {message}', file=sys.stderr, flush=True)
    if exit_now:
      os._exit(1)  # pylint: disable=protected-access
    raise SystemExit(1) from None
