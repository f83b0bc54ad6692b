"""MetricsWriter: jsonl content, resume without duplicated steps, TensorBoard scalars; Progress bar."""

import glob
import json
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from free_jax.training import logging as metrics_logging


def _tb_scalars(workdir):
  """{(tag, step): value} from all TensorBoard event files (TFRecord framing: len, crc, data, crc)."""
  scalars = {}
  for path in sorted(glob.glob(os.path.join(workdir, metrics_logging.TENSORBOARD_DIR, 'events.*'))):
    with open(path, 'rb') as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        scalars[(value.tag, event.step)] = value.simple_value
  return scalars


def test_writes_one_json_object_per_step(tmp_path):
  with metrics_logging.MetricsWriter(tmp_path) as writer:
    record = writer.write(10, {'d_loss': jnp.float32(0.5), 'g_loss': np.float64(2.25), 'exit_0/acc': 1})
    writer.write(20, {'d_loss': 0.25, 'g_loss': 2.0})
  assert record == {'step': 10, 'd_loss': 0.5, 'g_loss': 2.25, 'exit_0/acc': 1.0}
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(line) for line in lines] == [record, {'step': 20, 'd_loss': 0.25, 'g_loss': 2.0}]
  scalars = _tb_scalars(tmp_path)
  assert scalars[('g_loss', 10)] == 2.25 and scalars[('d_loss', 20)] == 0.25


def test_resume_drops_records_after_the_restore_point(tmp_path):
  with metrics_logging.MetricsWriter(tmp_path, tensorboard=False) as writer:
    for step in (10, 20, 30):
      writer.write(step, {'loss': step / 10})
  # Interrupted after step 30; the last checkpoint is at step 20: step 30 will be recomputed.
  with metrics_logging.MetricsWriter(tmp_path, resume_step=20, tensorboard=False) as writer:
    writer.write(30, {'loss': 3.5})
    writer.write(40, {'loss': 4.0})
  records = metrics_logging.read_metrics(tmp_path)
  assert [(r['step'], r['loss']) for r in records] == [(10, 1.0), (20, 2.0), (30, 3.5), (40, 4.0)]
  # A fresh run (no checkpoint) starts the file over.
  metrics_logging.MetricsWriter(tmp_path, tensorboard=False).close()
  assert metrics_logging.read_metrics(tmp_path) == []


def test_non_scalar_metric_is_a_clear_error(tmp_path):
  with metrics_logging.MetricsWriter(tmp_path, tensorboard=False) as writer:
    with pytest.raises(ValueError, match=r"metric 'per_exit_acc' must be a scalar, got shape \(3,\)"):
      writer.write(1, {'per_exit_acc': np.zeros(3)})


def test_progress_shows_live_losses():
  progress = metrics_logging.Progress(total_steps=100, initial_step=20, keys=('g_loss',))
  progress.update(30, {'step': 30, 'd_loss': 0.5, 'g_loss': jnp.float32(1.25)})
  assert progress._bar.n == 30  # pylint: disable=protected-access
  assert progress._bar.postfix == 'g_loss=1.25'  # pylint: disable=protected-access
  progress.close()
