"""Training metrics: ``<workdir>/metrics.jsonl``, TensorBoard scalars and a tqdm bar with live losses.

``metrics.jsonl`` has one JSON object per logged step: ``{"step": int, "<name>": float, ...}``.
On resume from a checkpoint at step s, records with step > s (written after that checkpoint by the
interrupted run, and about to be recomputed) are dropped first, so the file never holds a step twice
and reads as one uninterrupted run.

TensorBoard: tensorboardX rather than ``tf.summary`` — it writes the same event files without
importing TensorFlow (seconds of start-up and a second runtime next to JAX), and its ``purge_step``
hides the interrupted run's events after the restore point, mirroring the jsonl rule.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorboardX
import tqdm

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'


def _to_float(name: str, value: Any) -> float:
  array = np.asarray(value)
  if array.size != 1:
    raise ValueError(f'metric {name!r} must be a scalar, got shape {array.shape}')
  return float(array.reshape(()))


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  """All records of ``<workdir>/metrics.jsonl`` in file order ([] if there is none)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class MetricsWriter:
  """Appends scalar metrics to ``metrics.jsonl`` and TensorBoard.

  Args:
    workdir: run directory (created if missing).
    resume_step: the step training (re)starts from — the restored checkpoint's step, 0 for a fresh
      run. Existing records with a larger step are removed.
    tensorboard: also write TensorBoard events under ``<workdir>/tensorboard``.
  """

  def __init__(self, workdir: str | os.PathLike, *, resume_step: int = 0, tensorboard: bool = True):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, METRICS_FILE)
    kept = [r for r in read_metrics(workdir) if r['step'] <= resume_step]
    # Rewrite via a temporary file so a crash here cannot lose the records being kept.
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in kept)
    os.replace(tmp, self.path)
    self._file = open(self.path, 'a')
    self._tb = (tensorboardX.SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR), purge_step=resume_step + 1)
                if tensorboard else None)

  def write(self, step: int, metrics: Mapping[str, Any]) -> dict:
    """Logs scalar metrics (python/numpy/jax scalars) for `step`; returns the record written."""
    record = {'step': int(step)}
    record.update((name, _to_float(name, v)) for name, v in metrics.items() if name != 'step')
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()
    if self._tb is not None:
      for name, value in record.items():
        if name != 'step':
          self._tb.add_scalar(name, value, record['step'])
    return record

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()

  def __enter__(self) -> 'MetricsWriter':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class Progress:
  """A tqdm bar over training steps that shows the latest values of a few metrics.

  Args:
    total_steps: the run's last step.
    initial_step: where this (possibly resumed) run starts.
    keys: metrics shown in the postfix (all given metrics if None).
  """

  def __init__(self, total_steps: int, initial_step: int = 0,
               keys: Sequence[str] | None = ('d_loss', 'g_loss'), desc: str = 'train'):
    self._keys = keys
    self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True)

  def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
    """Moves the bar to `step`; shows `metrics` (e.g. the record returned by `MetricsWriter.write`)."""
    self._bar.update(step - self._bar.n)
    if metrics:
      shown = {k: v for k, v in metrics.items() if k != 'step' and (self._keys is None or k in self._keys)}
      self._bar.set_postfix({k: f'{_to_float(k, v):.4g}' for k, v in shown.items()}, refresh=False)

  def close(self) -> None:
    self._bar.close()
