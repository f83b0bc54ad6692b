"""The frozen backbone on whole teacher-forced sequences: per-layer hidden states, exit predictions.

Used by exit training (`free_jax.training.free_step`) and by evaluation (teacher-forced quality of every
exit and layer), so it lives outside both. Batches follow `free_jax.data.batching.train_batch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp

from free_jax import exits as exits_lib
from free_jax.models import blip2, lm_api

PyTree = Any


def target_mask(batch: dict[str, jax.Array]) -> jax.Array:
  """bool[B, T]: positions with a next-token target, in rows that are not batch padding."""
  return batch['loss_mask'].astype(bool) & batch['valid'].astype(bool)[:, None]


@flax.struct.dataclass
class TeacherForced:
  """The frozen backbone on a whole teacher-forced sequence.

  Attributes:
    hiddens: float[L, B, T, D] output of each LM layer (``hiddens[l - 1]`` = after layers [0, l)).
    token_valid: bool[B, T] real tokens of the LM sequence (decoder tokens for T5).
    ctx: the LM context for a fresh cache of length T, shared by exits run on this sequence.
  """

  hiddens: jax.Array
  token_valid: jax.Array
  ctx: PyTree


def teacher_forced(model: blip2.Blip2Model, params: PyTree, batch: dict[str, jax.Array]) -> TeacherForced:
  """Runs all LM layers of the BLIP-2 `model` on a training batch (layout: `free_jax.data.batching`)."""
  stack = blip2.lm_stack(model.config, model.dtype)
  lm_params = params['language_model']
  seq = model.apply({'params': params}, batch['image'], batch['input_ids'], batch['attention_mask'],
                    batch.get('decoder_input_ids'), batch.get('decoder_attention_mask'), method='sequence_inputs')
  cache = stack.init_cache(*seq.valid.shape)
  h, cache, ctx = lm_api.begin_step(stack, lm_params, cache, seq.valid, encoder=seq.encoder, **seq.step_inputs)
  _, hiddens, _ = stack.run_layers(lm_params, h, cache, ctx, 0, stack.num_layers)
  return TeacherForced(hiddens=hiddens, token_valid=seq.valid, ctx=ctx)


def exit_predictions(model: blip2.Blip2Model, backbone_params: PyTree, exit_params: PyTree,
                     exit_layers: Sequence[int], batch: dict[str, jax.Array]) -> jax.Array:
  """int32[E + 1, B, T]: teacher-forced argmax tokens of every exit, then of the final layer."""
  stack = blip2.lm_stack(model.config, model.dtype)
  layers = exits_lib.validate_layers(exit_layers, stack.num_layers)
  lm_params = backbone_params['language_model']
  run = teacher_forced(model, backbone_params, batch)
  _, logits = exits_lib.apply_exits(stack, lm_params, exit_params, run.hiddens[jnp.asarray(layers) - 1],
                                    run.token_valid, run.ctx)
  final_logits = stack.logits(lm_params, stack.final_features(lm_params, run.hiddens[-1]))
  chex.assert_rank(logits, 4)
  return jnp.argmax(jnp.concatenate([logits, final_logits[None]]), -1).astype(jnp.int32)
