"""What the launchers in ``experiments/`` share: flag parsing and failures that end in one line naming the cause.

    app.run(main, flags_parser=cli.parse_flags)
    cli.run_or_exit(pipeline.train_and_evaluate, config, workdir)

A user error (bad config or input, a missing or damaged file, a full or read-only disk) is printed as one
line, ``error: ...``, with no traceback; anything else (a bug) keeps its traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

# transformers' "PyTorch was not found" notice is advice, not a problem: free_jax uses only its tokenizers and
# image processors. Set before any launcher imports transformers.
os.environ.setdefault('TRANSFORMERS_NO_ADVISORY_WARNINGS', '1')

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
    if isinstance(e, (AttributeError, KeyError)):  # ml_collections names only the missing key
      field = message.split()[0] if message else '?'
      named = [o for o in overrides if o.split('.')[-1] == field] or overrides
      hint = message[len(field):].strip()
      message = f'{named[0] if named else field}: no such config field' + (f' ({hint})' if hint else '')
    raise SystemExit(f'config error: {message} (overrides: {", ".join(overrides) or "none"})') from None


def _chain(error: BaseException) -> list[BaseException]:
  """The exception and the ones it was raised from or while handling, outermost first."""
  chain = []
  while error is not None and all(error is not e for e in chain):
    chain.append(error)
    error = error.__cause__ or error.__context__
  return chain


def describe(error: BaseException) -> str | None:
  """One line naming a user error's cause, or None for an unexpected error (a bug)."""
  chain = _chain(error)
  # The first OSError with a telling errno (orbax wraps disk errors in its own, or raises one while handling
  # tensorstore's).
  cause = next((e for e in chain if isinstance(e, OSError) and e.errno in _OS_CAUSES), None)
  if cause is not None:
    # Without a file name of its own, another error of the chain names the file (tensorstore: "Error writing ...").
    named = [' '.join(str(e).split()) for e in chain if e is not cause and os.sep in str(e)]
    where = cause.filename or (named[0] if named else '')
    where = f': {where}' if where else ''
    return f'{cause.strerror or errno.errorcode.get(cause.errno, cause.errno)} (errno {cause.errno}){where}'
  if isinstance(error, _USER_ERRORS):
    message = ' '.join(str(error).split())
    if 'RESOURCE_EXHAUSTED' in message:  # tensorstore's disk-full error (orbax saves through it)
      message = f'disk full or over quota: {message}'
    return message
  return None


class _NoOrbaxThreadTracebacks(logging.Filter):
  """Keeps the one-line error that orbax's background save threads log, drops its traceback: the main thread
  raises the same error, named on the CLI's last line (a disk-full save otherwise prints hundreds of lines)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info and f'orbax{os.sep}checkpoint' in record.pathname:
      record.exc_info, record.exc_text = None, None
    return True


def _quiet_background_tracebacks() -> None:
  absl_logger = logging.getLogger('absl')  # where absl.logging (orbax's logger) records go
  if not any(isinstance(f, _NoOrbaxThreadTracebacks) for f in absl_logger.filters):
    absl_logger.addFilter(_NoOrbaxThreadTracebacks())
  if not getattr(sys.excepthook, 'quiet_closed_loops', False):
    sys.excepthook = _without_closed_loop_errors(sys.excepthook)


def _without_closed_loop_errors(hook):
  """sys.excepthook, silent for "Event loop is closed": tensorstore's writer threads print it (through
  PyErr_Print) when they report back to a failed orbax save's loop, which is already closed."""
  def excepthook(kind, value, traceback):
    if not (kind is RuntimeError and str(value) == 'Event loop is closed'):
      hook(kind, value, traceback)
  excepthook.quiet_closed_loops = True
  return excepthook


def many_runs_process(workdir: str) -> None:
  """Settings of a launcher that trains many runs in one process (the study, the screen): absl's INFO lines off
  its screen unless --verbosity asks (orbax logs every save), and compiled programs cached on disk in
  ``workdir/jax_cache``, so runs of the same mode compile each program once."""
  import jax  # pylint: disable=g-import-not-at-top
  from absl import flags, logging as absl_logging  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS['verbosity'].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
  jax.config.update('jax_compilation_cache_dir', os.path.abspath(os.path.join(workdir, 'jax_cache')))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)


def run_or_exit(fn: Callable[..., Any], *args, exit_now: bool = True, **kwargs) -> Any:
  """fn(*args, **kwargs); a user error exits (status 1) with ``error: <cause>`` as the last line.

  With `exit_now` the process ends right after that line: background writers that failed with the same error
  (orbax's async saves) would otherwise print their tracebacks at interpreter shutdown, after it. What was
  saved is already on disk or in a temporary directory that the next run removes.
  """
  _quiet_background_tracebacks()
  try:
    return fn(*args, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    message = describe(e)
    if message is None:
      raise
    sys.stdout.flush()
    if not exit_now:
      print(f'error: {message}', file=sys.stderr, flush=True)
      raise SystemExit(1) from None
    sys.stderr.flush()
    # Background threads may still be reporting (tensorstore's "Event loop is closed"): from here on stderr goes
    # nowhere for them, and the line goes to a private copy of it, so it is the last one whatever they print.
    own_stderr = os.dup(2)
    with open(os.devnull, 'wb') as devnull:
      os.dup2(devnull.fileno(), 2)
    time.sleep(0.1)  # for writes already under way to the old stderr to land before the line
    os.write(own_stderr, f'error: {message}\n'.encode())
    os._exit(1)  # pylint: disable=protected-access
