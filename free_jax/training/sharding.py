"""The frozen backbone on the 'data' mesh: replicated or FSDP-sharded (``train.backbone_sharding``).

The exits, discriminators and optimizer states are small and stay replicated (`parallel.replicate`);
only the frozen BLIP-2 backbone is worth sharding. Two modes:

* ``'replicated'``: every device holds the whole backbone. No communication; memory = all params.
* ``'fsdp'``: each big leaf is split over the 'data' axis along its largest divisible dimension
  (ZeRO-3 / FSDP style), small leaves (norms, biases) stay replicated. A device stores ~1/N of the
  backbone at rest.

How the step gets full weights back (the all-gather) is left to XLA: the params are passed to a
`jax.jit`-ed step as committed arrays with these `NamedSharding`s, and the compiler inserts the
collectives where a computation needs more than the local shard. Two cases matter:

* The backbone forward written as plain jit (GSPMD) code, layers in a `lax.scan` over stacked
  params: XLA gathers (or keeps sharded and moves activations instead) *inside* the loop, so the
  peak holds about one layer's weights beyond the 1/N shard. This is where FSDP saves peak memory.
* A `jax.shard_map` body with ``in_specs=P()`` for the params (`parallel.data_parallel`, the FREE
  step): jit all-gathers the whole tree once at the step's entry. Correct, and the backbone takes
  1/N of memory *between* steps (evaluation copies, other stages), but the step's peak holds a full
  copy. We do not hand-write per-layer `all_gather`s inside shard_map because that would thread the
  mesh through every model module; moving the frozen forward out of the shard_map body (it needs no
  per-device collectives) gets the GSPMD behaviour instead.

See docs/scaling.md for figures and `free_jax.budget` for what each mode costs at full scale.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from free_jax.training.parallel import DATA

PyTree = Any

MODES = ('replicated', 'fsdp')
# Leaves below 2^20 elements (2 MiB in bf16) are not worth a collective: norms, biases, small tables.
MIN_SIZE_TO_SHARD = 2**20


def fsdp_spec(shape: tuple[int, ...], num_shards: int, min_size_to_shard: int = MIN_SIZE_TO_SHARD) -> P:
  """The FSDP `PartitionSpec` of one leaf: its largest dimension divisible by `num_shards` over 'data'.

  Leaves smaller than `min_size_to_shard` elements, or with no divisible dimension, are replicated.
  Ties go to the later dimension, so the leading layer axis L of stacked params [L, D, F] is only
  chosen when it is strictly the largest (a `lax.scan` slices that axis, and sharding it would make
  XLA gather the whole stack).
  """
  if num_shards == 1 or int(np.prod(shape, dtype=np.int64)) < min_size_to_shard:
    return P()
  candidates = [(size, axis) for axis, size in enumerate(shape) if size % num_shards == 0]
  if not candidates:
    return P()
  _, axis = max(candidates)
  return P(*([None] * axis + [DATA]))


def backbone_shardings(params: PyTree, mesh: Mesh, mode: str,
                       min_size_to_shard: int = MIN_SIZE_TO_SHARD) -> PyTree:
  """A `NamedSharding` per leaf of `params` (arrays or `jax.ShapeDtypeStruct`s) for `mode` in `MODES`."""
  if mode not in MODES:
    raise ValueError(f'backbone_sharding={mode!r}; expected one of {MODES}')
  if DATA not in mesh.shape:
    raise ValueError(f"the mesh has axes {tuple(mesh.shape)}; backbone sharding needs the '{DATA}' axis")
  n = mesh.shape[DATA]

  def spec(leaf):
    return P() if mode == 'replicated' else fsdp_spec(tuple(leaf.shape), n, min_size_to_shard)

  return jax.tree.map(lambda leaf: NamedSharding(mesh, spec(leaf)), params)


def place_backbone(params: PyTree, mesh: Mesh, mode: str,
                   min_size_to_shard: int = MIN_SIZE_TO_SHARD) -> PyTree:
  """`params` placed on `mesh` as `backbone_shardings` says (pass the result to a jitted step)."""
  return jax.device_put(params, backbone_shardings(params, mesh, mode, min_size_to_shard))


def bytes_per_device(tree: PyTree) -> dict[jax.Device, int]:
  """Bytes of `tree`'s (placed) arrays resident on each device, from their addressable shards."""
  totals: dict[jax.Device, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
  return totals
