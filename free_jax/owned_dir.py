"""Writing a directory atomically, and replacing only what the same writer wrote before.

Every writer of a whole directory (`exits_io.save_exits`, `export.save_pretrained`, `shipped.ship`) goes through
`write_directory`: the files are written to a hidden sibling and renamed into place, so a failure never leaves a
partial directory and never loses the previous one. A target is replaced only if it is empty or is a previous
output of the same writer (every entry one the writer makes, its marker file among them), and then only with
``overwrite=True``; anything else (a workdir, a user's folder, ``.``) is refused in one line before any work.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import pathlib
import secrets
import shutil
from collections.abc import Callable, Sequence


@dataclasses.dataclass(frozen=True)
class Output:
  """What a writer's directory holds.

  Attributes:
    what: the output's name in messages ('exits', 'an HF checkpoint', ...).
    marker: a file every such directory holds.
    patterns: `fnmatch` patterns of every file the writer may make (subdirectories never).
  """

  what: str
  marker: str
  patterns: Sequence[str]

  def foreign_entries(self, directory: pathlib.Path) -> list[str]:
    """Entries of `directory` this writer does not make (sorted)."""
    return sorted(e.name for e in directory.iterdir()
                  if not e.is_file() or not any(fnmatch.fnmatchcase(e.name, p) for p in self.patterns))


def check_target(directory, output: Output, overwrite: bool) -> pathlib.Path:
  """The absolute target if `output` may be written there; else a one-line FileExistsError naming why."""
  directory = pathlib.Path(os.path.abspath(directory))  # '.' and 'a/..' have no usable name or parent
  if directory.exists() and not directory.is_dir():
    raise FileExistsError(f'{directory} exists and is not a directory')
  if directory in (pathlib.Path.cwd(), *pathlib.Path.cwd().parents) and directory.is_dir():
    raise FileExistsError(f'{directory} is the current directory or holds it; not replacing it (choose a new or '
                          'empty directory)')
  if not directory.is_dir() or not any(directory.iterdir()):
    return directory
  foreign = output.foreign_entries(directory)
  if foreign or not (directory / output.marker).is_file():
    reason = (f'holds {foreign[0]!r}' + (f' and {len(foreign) - 1} more entries' if len(foreign) > 1 else '')
              if foreign else f'has no {output.marker}')
    raise FileExistsError(f'{directory} is not empty and {reason}: it is not {output.what} written here; '
                          'not replacing it (choose a new or empty directory)')
  if not overwrite:
    raise FileExistsError(f'{directory} already holds {output.what}; pass overwrite=True to replace it')
  return directory


def write_directory(directory, output: Output, write: Callable[[pathlib.Path], None],
                    overwrite: bool = False) -> pathlib.Path:
  """Calls ``write(tmp)`` on a fresh hidden sibling of `directory`, then renames it into place (`check_target`
  first and again just before the swap). Files get the umask's permissions, as any file the user writes."""
  directory = check_target(directory, output, overwrite)
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = directory.parent / f'.{directory.name}.{secrets.token_hex(4)}.partial'
  tmp.mkdir()  # not tempfile.mkdtemp: that makes it private (0700)
  old = None
  try:
    write(tmp)
    umask = os.umask(0)
    os.umask(umask)
    for entry in tmp.iterdir():  # some writers (safetensors) create files private (0600)
      os.chmod(entry, 0o666 & ~umask)
    if directory.exists():
      check_target(directory, output, overwrite)  # unchanged since the check above
      old = pathlib.Path(f'{tmp}.old')
      os.rename(directory, old)
    os.rename(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    if old is not None and old.exists() and not directory.exists():
      os.rename(old, directory)
    raise
  if old is not None:
    shutil.rmtree(old)
  return directory
