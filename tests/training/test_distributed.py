"""Multi-process runs: batch splitting, single-process no-op, and a real 2-process run on 8 CPU devices.

The 2-process test starts this file twice as a script (``python test_distributed.py PROCESS PORT DIR``),
each process with 4 fake CPU devices, joined by `jax.distributed` over localhost: the global mesh has
8 devices, as on two 4-chip hosts.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

GLOBAL_BATCH = 16
NUM_PROCESSES, LOCAL_DEVICES = 2, 4
REPO_ROOT = pathlib.Path(__file__).parents[2]
_CLUSTER_ENV_PREFIXES = ('SLURM_', 'OMPI_', 'PMI_', 'TPU_', 'MEGASCALE_', 'JAX_COORDINATOR', 'JAX_PROCESS')


def _clean_env(**extra) -> dict:
  """This environment minus anything that would make JAX detect a cluster."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(_CLUSTER_ENV_PREFIXES)}
  return dict(env, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO_ROOT), **extra)


def _full_batch() -> dict:
  """The global batch every process can regenerate (as with a seeded, deterministic input pipeline)."""
  rng = np.random.default_rng(0)
  return {'image': rng.normal(size=(GLOBAL_BATCH, 4, 4, 3)).astype(np.float32),
          'input_ids': rng.integers(0, 100, size=(GLOBAL_BATCH, 6)).astype(np.int32)}


def test_global_batch_info_splits_over_processes_and_devices():
  from free_jax.training import distributed  # pylint: disable=import-outside-toplevel
  info = distributed.global_batch_info(32, process_index=1, process_count=2, local_device_count=4)
  assert (info.per_process, info.per_device, info.rows) == (16, 4, slice(16, 32))
  single = distributed.global_batch_info(8)  # this process alone
  assert (single.process_count, single.per_process, single.rows) == (1, 8, slice(0, 8))
  with pytest.raises(ValueError, match=r'global batch size 12 must be a positive multiple of the 8 devices '
                                       r'\(2 processes x 4 local devices\)'):
    distributed.global_batch_info(12, process_index=0, process_count=2, local_device_count=4)
  with pytest.raises(ValueError, match=r'process_index=2 is not in \[0, 2\)'):
    distributed.global_batch_info(16, process_index=2, process_count=2, local_device_count=4)


def test_initialize_is_a_no_op_on_a_single_process():
  code = ('import jax; from free_jax.training import distributed\n'
          'assert distributed.initialize() is False\n'
          'assert not jax.distributed.is_initialized() and jax.process_count() == 1\n'
          'assert distributed.initialize(num_processes=1) is False\n'
          'print("ok")')
  result = subprocess.run([sys.executable, '-c', code], env=_clean_env(), cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0 and 'ok' in result.stdout, result.stderr[-3000:]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_assemble_the_global_batch_and_share_checkpoints(tmp_path):
  port = _free_port()
  from tests.fake_devices import fake_device_flags  # here, not at the top: the worker processes import this file
  flags = fake_device_flags(LOCAL_DEVICES)
  workers = [subprocess.Popen([sys.executable, __file__, str(i), str(port), str(tmp_path)],
                              env=_clean_env(XLA_FLAGS=flags), cwd=REPO_ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for i in range(NUM_PROCESSES)]
  outputs = []
  try:
    for w in workers:
      outputs.append(w.communicate(timeout=300)[0])
  finally:
    for w in workers:
      w.kill()
  for i, (w, out) in enumerate(zip(workers, outputs)):
    assert w.returncode == 0, f'process {i}:\n{out[-4000:]}'
  reports = [json.loads((tmp_path / f'report{i}.json').read_text()) for i in range(NUM_PROCESSES)]
  full = _full_batch()
  for i, report in enumerate(reports):
    assert report['devices'] == [NUM_PROCESSES * LOCAL_DEVICES, LOCAL_DEVICES]
    assert report['per_process'] == GLOBAL_BATCH // NUM_PROCESSES and report['per_device'] == 2
    # Each process saw the whole global batch through its own share of rows.
    assert report['global_sum'] == int(full['input_ids'].sum()), i
    assert report['checkpoint'] == {'step': 1, 'data_position': GLOBAL_BATCH}


def _worker(process_id: int, port: int, workdir: str) -> None:
  """One process of the 2-process run; asserts, then writes report<process_id>.json."""
  # pylint: disable=import-outside-toplevel
  from free_jax.training import distributed
  assert distributed.initialize(f'localhost:{port}', NUM_PROCESSES, process_id)
  import jax
  from jax.experimental import multihost_utils
  from free_jax.data import batching
  from free_jax.training import checkpoint, parallel

  assert distributed.initialize()  # already connected: harmless
  info = distributed.global_batch_info(GLOBAL_BATCH)
  full = _full_batch()
  local = batching.process_split(full, info.process_index, info.process_count)
  np.testing.assert_array_equal(local['input_ids'], full['input_ids'][info.rows])

  mesh = parallel.make_mesh()
  batch = distributed.make_global_batch(local, mesh)
  assert batch['image'].shape == full['image'].shape and not batch['image'].is_fully_addressable
  gathered = multihost_utils.process_allgather(batch, tiled=True)
  for key, value in full.items():
    np.testing.assert_array_equal(gathered[key], value, err_msg=key)
  with pytest.raises(ValueError, match='global batch size 6 must be a positive multiple of the 8 devices'):
    distributed.make_global_batch({'input_ids': local['input_ids'][:3]}, mesh)

  # A data-parallel step over the global batch: each device sums its rows, psum joins them.
  total = parallel.data_parallel(lambda _, b: jax.lax.psum(b['input_ids'].sum(), parallel.DATA), mesh)(
      np.zeros(()), batch)

  # Checkpoints on storage shared by all processes (orbax coordinates the writers).
  state = parallel.replicate({'w': np.arange(6, dtype=np.float32).reshape(2, 3)}, mesh)
  with checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), async_save=False) as ckpt:
    ckpt.save(1, state, data_position=GLOBAL_BATCH)
    restored = ckpt.restore_latest(state)
  np.testing.assert_array_equal(multihost_utils.process_allgather(restored.state['w'], tiled=True),
                                np.arange(6).reshape(2, 3))
  report = {'devices': [jax.device_count(), jax.local_device_count()], 'per_process': info.per_process,
            'per_device': info.per_device, 'global_sum': int(total.addressable_data(0)),
            'checkpoint': {'step': restored.step, 'data_position': restored.meta['data_position']}}
  pathlib.Path(workdir, f'report{process_id}.json').write_text(json.dumps(report))
  jax.distributed.shutdown()


if __name__ == '__main__':
  _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
