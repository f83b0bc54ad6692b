"""Checkpoints of a training run: orbax `CheckpointManager` + JSON metadata, safe to resume.

Each checkpoint step holds two items:
  'state': the train-state pytree (exits, discriminators, optimizer states, rng, ...), via
           `StandardSave` / `StandardRestore`;
  'meta':  JSON: ``step``, ``data_position`` (how far the input pipeline has read), ``config_hash``,
           ``final`` (the run finished at this step) and any caller extras.

Safety rules:
* Saves are atomic (orbax writes a temporary directory and renames it), so an interrupted save never
  replaces a good checkpoint; leftover temporaries are cleaned up when the directory is reopened.
* `restore_latest` tries the newest step first; if it cannot be read it logs a warning and falls back
  to the previous one. Unreadable steps newer than the restored one are *moved aside* (to
  ``<dir>/corrupt.<step>``, kept for inspection), so training can save those step numbers again.
* A run whose latest checkpoint is ``final`` is finished (`is_finished`): launchers skip training.
* A checkpoint written with a different config hash is refused rather than silently mixed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
from absl import logging

PyTree = Any

_CORRUPT_PREFIX = 'corrupt.'


def config_hash(config: Any) -> str:
  """A stable short hash of a config (ml_collections ConfigDict or a JSON-able mapping)."""
  as_dict = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  text = json.dumps(as_dict, sort_keys=True, default=repr)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_finite(metrics: Mapping[str, Any], step: int) -> None:
  """Raises FloatingPointError naming the first metric that is NaN or inf (scalars or arrays)."""
  for name, value in metrics.items():
    value = np.asarray(value)
    if not np.all(np.isfinite(value)):
      bad = value.size - np.isfinite(value).sum()
      shown = float(value) if value.ndim == 0 else f'{bad} non-finite entries'
      raise FloatingPointError(f'metric {name!r} is not finite ({shown}) at step {step}; stopping, the last '
                               'good checkpoint is kept')


def _first_line(error: BaseException, limit: int = 200) -> str:
  text = ' '.join(str(error).split('\n')[0].split())
  return text if len(text) <= limit else text[:limit] + '...'


class UnreadableCheckpointError(ValueError):
  """Checkpoints exist but none can be read: damaged data, reported in one line (a user error, `free_jax.cli`)."""


@dataclasses.dataclass(frozen=True)
class Restored:
  """A restored checkpoint: its step, the train state and the JSON metadata."""
  step: int
  state: PyTree
  meta: dict


class Checkpointer:
  """Saves and restores train states under one directory (``<workdir>/checkpoints``).

  Args:
    directory: created if missing; existing checkpoints in it are kept.
    max_to_keep: newest checkpoints kept (older ones are deleted by orbax after a newer save succeeds).
    config_hash: if given, stored with every save and required to match on restore.
    async_save: write in a background thread (call `wait` or `close` before reading the files).
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, config_hash: str | None = None,
               async_save: bool = True):
    if max_to_keep < 1:
      raise ValueError(f'max_to_keep must be >= 1, got {max_to_keep}')
    self.directory = os.path.abspath(os.fspath(directory))  # orbax refuses relative paths (make train uses one)
    self.config_hash = config_hash
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'meta'))
    # orbax 0.12 cleans stale tmp directories in a background thread that `close` never joins. Left running, it
    # races whatever the caller does next: interpreter shutdown ("cannot schedule new futures after shutdown"), or
    # a `tfds.testing.mock_data` block that reroutes every epath call of the process to a fake filesystem.
    self._manager._maybe_await_cleanup_tmp_directory()  # pylint: disable=protected-access

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: PyTree, *, data_position: int = 0, final: bool = False,
           extra: Mapping[str, Any] | None = None) -> None:
    """Saves `state` at `step` (an error if that step already exists: checkpoints are never overwritten)."""
    step = int(step)
    if step in self._manager.all_steps():
      raise ValueError(f'checkpoint step {step} already exists in {self.directory}; refusing to overwrite it')
    meta = dict(extra or {}, step=step, data_position=int(data_position), final=bool(final),
                config_hash=self.config_hash)
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)), force=True)

  def read_meta(self, step: int) -> dict:
    """The JSON metadata of one step (cheap: no arrays are read)."""
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def is_finished(self) -> bool:
    """True if the newest checkpoint was saved with ``final=True``."""
    step = self.latest_step()
    if step is None:
      return False
    try:
      return bool(self.read_meta(step).get('final', False))
    except Exception:  # pylint: disable=broad-except
      return False  # An unreadable latest step is handled (with a warning) by `restore_latest`.

  def restore_latest(self, target: PyTree) -> Restored | None:
    """Restores the newest readable checkpoint into the structure of `target`.

    Args:
      target: a pytree with the state's structure, shapes and dtypes (concrete arrays or
        `jax.ShapeDtypeStruct`s, optionally with shardings: restored arrays get them).

    Returns:
      The restored checkpoint, or None if the directory holds no checkpoint.

    Raises:
      ValueError: the newest readable checkpoint was written with a different config hash.
      UnreadableCheckpointError: checkpoints exist but none can be read (nothing is moved or deleted then).
    """
    self.wait()
    failures = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except
        # Any read error (truncated file, bad JSON, missing array) means this step is unusable.
        logging.warning('checkpoint step %d in %s is unreadable (%s: %s); falling back to the previous one',
                        step, self.directory, type(e).__name__, e)
        failures.append((step, f'{type(e).__name__}: {_first_line(e)}'))
        continue
      meta = dict(restored.meta)
      stored_hash = meta.get('config_hash')
      if self.config_hash is not None and stored_hash is not None and stored_hash != self.config_hash:
        raise ValueError(f'checkpoint step {step} in {self.directory} was written with config hash '
                         f'{stored_hash}, this config hashes to {self.config_hash}; use a new workdir for a '
                         'different config')
      self._quarantine([step for step, _ in failures])
      return Restored(step=step, state=restored.state, meta=meta)
    if failures:
      causes = '; '.join(f'step {step}: {cause}' for step, cause in sorted(failures))
      raise UnreadableCheckpointError(
          f'no readable checkpoint in {self.directory} ({causes}); refusing to start over on top of them: '
          'move the directory aside to train this stage again')
    return None

  def _quarantine(self, steps: list[int]) -> None:
    """Moves unreadable steps aside so new saves can reuse their step numbers."""
    for step in steps:
      src = os.path.join(self.directory, str(step))
      dst = os.path.join(self.directory, f'{_CORRUPT_PREFIX}{step}')
      while os.path.exists(dst):
        dst += '_'
      os.rename(src, dst)
      logging.warning('moved unreadable checkpoint %s to %s', src, dst)
    if steps:
      self._manager.reload()

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc) -> None:
    self.close()
