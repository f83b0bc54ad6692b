"""Data parallelism: one per-device step function, run with `jax.shard_map` over a 1-D 'data' mesh.

The same code runs on 1 device, 8 fake CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``)
or a TPU slice. Params and optimizer states are replicated (``P()``), batches are split on their
leading axis (``P('data')``).

Gradients: the per-device step computes its loss with the ``losses`` functions and
``axis_name=DATA``, which makes the loss the *global* masked mean (numerator and token count are
summed over devices, so devices holding different numbers of real tokens are weighted correctly).
``shard_map`` runs with ``check_vma=True``, under which the gradient of a replicated parameter is
the cross-device reduction of the per-device cotangents: the gradient of that global loss comes out
already averaged and identical on every device. Applying ``lax.pmean(grads, DATA)`` to it is a
no-op. Do NOT compute a per-device (un-reduced) loss and ``pmean`` its gradients: under
``check_vma=True`` those gradients are already *summed* over devices, so the result would be
``num_devices`` times too large.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA = 'data'

PyTree = Any


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh named 'data' over the first `num_devices` devices (all by default).

  Auto axis types let a jitted step accept host arrays too (jit places them); `shard_batch` and
  `replicate` place them explicitly to avoid the extra copy.
  """
  available = jax.device_count()
  n = available if num_devices is None else num_devices
  if not 1 <= n <= available:
    raise ValueError(f'num_devices={num_devices} must be in [1, {available}] (jax.device_count())')
  return jax.make_mesh((n,), (DATA,), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])


def check_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """The per-device batch size; a clear error if `global_batch_size` does not split evenly."""
  n = mesh.shape[DATA]
  if global_batch_size <= 0 or global_batch_size % n:
    raise ValueError(f'global batch size {global_batch_size} must be a positive multiple of the {n} '
                     f"devices of the '{DATA}' mesh")
  return global_batch_size // n


def _check_leading_dims(batch: PyTree, mesh: Mesh, what: str) -> None:
  leaves = jax.tree_util.tree_leaves_with_path(batch)
  sizes = {jax.tree_util.keystr(path): (leaf.shape[0] if leaf.ndim else None) for path, leaf in leaves}
  if len(set(sizes.values())) > 1 or None in sizes.values():
    raise ValueError(f'{what}: all leaves need the same leading (batch) dimension, got {sizes}')
  if sizes:
    check_batch_size(next(iter(sizes.values())), mesh)


def shard_batch(batch: PyTree, mesh: Mesh) -> PyTree:
  """Places every leaf [B, ...] split over the 'data' axis (B a multiple of the device count)."""
  _check_leading_dims(batch, mesh, 'shard_batch')
  return jax.device_put(batch, NamedSharding(mesh, P(DATA)))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places a full copy of every leaf on every device of the mesh."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def data_parallel(step_fn: Callable[..., Any], mesh: Mesh, *, batch_argnums: Sequence[int] = (1,),
                  out_specs: Any = P(), donate_argnums: Sequence[int] = ()) -> Callable[..., Any]:
  """Jits `step_fn` as a per-device program over the mesh.

  Args:
    step_fn: the per-device step, e.g. ``(state, batch) -> (state, metrics)``; inside it, batch args
      have leading dimension B / num_devices and collectives over ``DATA`` are available.
    mesh: from `make_mesh`.
    batch_argnums: positional args split on their leading axis; all other args are replicated.
    out_specs: output partitioning; replicated by default (outputs must then be device-invariant,
      e.g. reduced with the ``losses`` functions' ``axis_name`` or ``lax.pmean``).
    donate_argnums: passed to `jax.jit` (donate the train state to update it in place).

  Returns:
    A jitted function with `step_fn`'s signature taking global (unsplit) arrays.
  """
  batch_argnums = tuple(batch_argnums)

  def run(*args):
    for i in batch_argnums:
      _check_leading_dims(args[i], mesh, f'{getattr(step_fn, "__name__", "step")} argument {i}')
    in_specs = tuple(P(DATA) if i in batch_argnums else P() for i in range(len(args)))
    return jax.shard_map(step_fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)(*args)

  return jax.jit(run, donate_argnums=tuple(donate_argnums))
