"""One run per workdir: a lock that names its holder and is released when the holder ends, however it ends.

Two processes training or evaluating in one workdir would overwrite each other's checkpoints and summaries (orbax
fails with an internal message at best). `hold(workdir)` takes an exclusive `fcntl.flock` on
``workdir/.free_jax.lock`` and writes who holds it (pid, host, command, start time) into the file; a second run
is refused in one line that names the holder. The kernel drops a flock when its process exits, killed or not,
so a dead run never leaves the workdir locked; the file itself stays, harmless. The same process may nest
`hold` on one workdir (training, then its evaluation).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator

LOCK_FILE = '.free_jax.lock'
_HELD: dict[str, int] = {}  # realpath of a lock file -> nesting depth in this process


class WorkdirBusyError(ValueError):
  """The workdir is held by another live run."""


def _holder(fd: int) -> str:
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    info = json.loads(os.read(fd, 65536).decode() or '{}')
  except (OSError, ValueError):
    info = {}
  if not info:
    return 'another process'
  return (f"pid {info.get('pid')} on {info.get('host')} since {info.get('started')}: "
          f"{info.get('command', '?')}")


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds `workdir` (created if needed) for this process; WorkdirBusyError if another live run holds it."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.realpath(os.path.join(workdir, LOCK_FILE))
  if path in _HELD:
    _HELD[path] += 1
    try:
      yield
    finally:
      _HELD[path] -= 1
    return
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirBusyError(f'{workdir} is in use by another run ({_holder(fd)}); wait for it to finish or '
                             'choose another workdir') from None
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname(), 'command': ' '.join(sys.argv),
                             'started': datetime.datetime.now().isoformat(timespec='seconds')}).encode())
    _HELD[path] = 1
    try:
      yield
    finally:
      del _HELD[path]
  finally:
    os.close(fd)  # releases the flock
