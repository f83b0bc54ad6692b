"""Multi-process (multi-host) runs: start `jax.distributed`, split the global batch, assemble global arrays.

One process runs per host (TPU VM worker, or SLURM task / GPU node). Every process runs the same
program; `jax.devices()` then lists the devices of all hosts, `parallel.make_mesh` builds the 'data'
mesh over all of them, and a jitted step runs on the whole mesh. Each process only feeds its own
devices: it loads its contiguous share of every global batch (`batching.process_split` with
`jax.process_index()`), and `make_global_batch` turns that host-local numpy batch into one global
`jax.Array` sharded over 'data'. On a single process everything here degrades to the one-host case.

Typical use, at the top of a launcher (before anything touches a JAX device)::

  distributed.initialize()                    # no-op on one process; auto-detects TPU pods / SLURM
  info = distributed.global_batch_info(config.train.batch_size)
  mesh = parallel.make_mesh()
  for batch in batches:                       # the same global batch order on every process
    local = batching.process_split(batch, info.process_index, info.process_count)
    state, metrics = step(state, distributed.make_global_batch(local, mesh))

See docs/scaling.md for the launch commands.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from free_jax.training import parallel
from free_jax.training.parallel import DATA

PyTree = Any

# What `jax.distributed.initialize` raises when it is given no address and detects no cluster
# (no TPU pod metadata, SLURM or Open MPI variables): that is a single-process run.
_NO_CLUSTER_DETECTED = 'coordinator_address should be defined.'


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Connects this process to the others of a multi-process run; returns whether there are several.

  With no arguments JAX auto-detects the cluster (Cloud TPU pod slices, SLURM, Open MPI) and a
  plain single-process run is left alone (no coordinator is started). Give all three arguments for
  a hand-launched run (e.g. ``('10.0.0.1:1234', 2, 0)`` on the first of two GPU hosts). Must be
  called before any JAX computation; calling it again is harmless.

  Args:
    coordinator_address: 'host:port' of process 0, reachable from every process.
    num_processes: number of processes (hosts) in the run.
    process_id: this process's index in [0, num_processes).

  Returns:
    True if this run spans several processes.
  """
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  if num_processes == 1:
    return False
  auto = coordinator_address is None and num_processes is None and process_id is None
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  except ValueError as e:
    if auto and str(e) == _NO_CLUSTER_DETECTED:
      logging.info('jax.distributed: no cluster detected, running as a single process')
      return False
    raise
  logging.info('jax.distributed: process %d of %d, %d local of %d devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return jax.process_count() > 1


@dataclasses.dataclass(frozen=True)
class BatchInfo:
  """How one global batch splits over processes and devices.

  Attributes:
    global_size: examples per step over all devices.
    per_process: examples this process loads (`batching.process_split` share).
    per_device: examples per device.
    process_index: this process.
    process_count: processes of the run.
  """

  global_size: int
  per_process: int
  per_device: int
  process_index: int
  process_count: int

  @property
  def rows(self) -> slice:
    """This process's rows of the global batch (what `batching.process_split` takes)."""
    return slice(self.process_index * self.per_process, (self.process_index + 1) * self.per_process)


def global_batch_info(global_batch_size: int, *, process_index: int | None = None,
                      process_count: int | None = None, local_device_count: int | None = None) -> BatchInfo:
  """Per-process and per-device batch sizes; a clear error when `global_batch_size` does not split.

  The keyword arguments default to this run's `jax.process_index()`, `jax.process_count()` and
  `jax.local_device_count()` (every process is assumed to drive the same number of devices).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  local = jax.local_device_count() if local_device_count is None else local_device_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, {process_count})')
  devices = process_count * local
  if global_batch_size <= 0 or global_batch_size % devices:
    raise ValueError(f'global batch size {global_batch_size} must be a positive multiple of the {devices} '
                     f'devices ({process_count} processes x {local} local devices)')
  return BatchInfo(global_size=global_batch_size, per_process=global_batch_size // process_count,
                   per_device=global_batch_size // devices, process_index=process_index,
                   process_count=process_count)


def make_global_batch(local_batch: PyTree, mesh: Mesh) -> PyTree:
  """This process's rows of a batch (numpy [B / processes, ...] leaves) -> global `jax.Array`s [B, ...].

  The result is sharded on its leading axis over the mesh's 'data' axis, ready for a jitted step;
  process p's rows become global rows [p * B / processes, (p + 1) * B / processes) when the mesh lists
  devices in process order (as `parallel.make_mesh` does with `jax.devices()`).
  """
  leaves = jax.tree_util.tree_leaves_with_path(local_batch)
  sizes = {jax.tree_util.keystr(path): np.shape(leaf)[0] if np.ndim(leaf) else None for path, leaf in leaves}
  if len(set(sizes.values())) > 1 or None in sizes.values():
    raise ValueError(f'make_global_batch: all leaves need the same leading (batch) dimension, got {sizes}')
  if sizes:
    parallel.check_batch_size(next(iter(sizes.values())) * jax.process_count(), mesh)
  sharding = NamedSharding(mesh, P(DATA))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
