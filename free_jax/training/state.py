"""Train states of the two stages: the embedded backbone (stage 1) and the FREE exits (stage 2).

Both are plain pytrees (flax struct dataclasses), so they jit, shard (replicated) and checkpoint
(orbax `StandardSave`) as they are. Optimizers are *not* in the state — the step closes over the
optax transforms — and the frozen backbone is never part of `FreeState`: it cannot get Adam moments
or updates by construction.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

PyTree = Any


@flax.struct.dataclass
class FreeState:
  """Stage 2: exits (generators) and per-exit discriminators with their optimizer states.

  Attributes:
    step: int32[] number of completed steps.
    exits: exit params (`free_jax.exits`), leaves [E, ...].
    discriminators: `Discriminators` params, leaves [E, ...].
    g_opt_state: optimizer state of `exits`.
    d_opt_state: optimizer state of `discriminators`.
  """

  step: jax.Array
  exits: PyTree
  discriminators: PyTree
  g_opt_state: PyTree
  d_opt_state: PyTree


def create_free_state(exits: PyTree, discriminators: PyTree, g_tx: optax.GradientTransformation,
                      d_tx: optax.GradientTransformation) -> FreeState:
  return FreeState(step=jnp.zeros((), jnp.int32), exits=exits, discriminators=discriminators,
                   g_opt_state=g_tx.init(exits), d_opt_state=d_tx.init(discriminators))


@flax.struct.dataclass
class BackboneState:
  """Stage 1: the whole embedded BLIP-2, trained end to end with cross-entropy (+ grounding).

  Attributes:
    step: int32[] number of completed steps.
    params: `Blip2Model` params.
    probe: the grounding probe (`free_jax.training.grounding`), ``{}`` when grounding is off; it is
      discarded after training.
    opt_state: optimizer state of ``(params, probe)``.
  """

  step: jax.Array
  params: PyTree
  probe: PyTree
  opt_state: PyTree


def create_backbone_state(params: PyTree, tx: optax.GradientTransformation,
                          probe: PyTree | None = None) -> BackboneState:
  probe = {} if probe is None else probe
  return BackboneState(step=jnp.zeros((), jnp.int32), params=params, probe=probe,
                       opt_state=tx.init((params, probe)))
