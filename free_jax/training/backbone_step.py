"""Stage 1 of the embedded benchmark: the whole tiny BLIP-2 trained end to end with cross-entropy.

The embedded default needs a backbone that actually answers, so that early exits are a real test.
`make_backbone_step` is a jitted data-parallel AdamW step on teacher-forced batches, optionally plus the
grounding loss on the image prefix (`free_jax.training.grounding`, weighted by `grounding_weight`)
(`free_jax.data.batching.train_batch`: labels are pre-shifted, position t predicts token t + 1, so
the loss is ``CE(logits[:, t], labels[:, t])`` on ``loss_mask``, never shifted again here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from free_jax.models import blip2
from free_jax.teacher_forcing import target_mask
from free_jax.training import grounding, losses, parallel
from free_jax.training.state import BackboneState

PyTree = Any


def forward_logits(model: blip2.Blip2Model, params: PyTree, batch: dict[str, jax.Array]) -> jax.Array:
  """float[B, T, V] teacher-forced logits (T: LM sequence, the decoder's for T5)."""
  out = model.apply({'params': params}, batch['image'], batch['input_ids'], batch['attention_mask'],
                    batch.get('decoder_input_ids'), batch.get('decoder_attention_mask'))
  return out.logits


def _is_image_prefix(_, method_name: str) -> bool:
  return method_name == 'image_prefix'


def make_backbone_step(model: blip2.Blip2Model, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                       grounding_weight: float = 0.0
                       ) -> Callable[[BackboneState, dict], tuple[BackboneState, dict[str, jax.Array]]]:
  """The jitted step ``(state, batch) -> (state, metrics)``; state donated.

  Metrics: 'loss' (answer CE), 'token_acc', 'grad_norm', and with ``grounding_weight > 0`` 'grounding'
  (the probe's loss; the batch then needs `grounding.LABEL_KEYS` and the state a probe).
  """

  def step(state: BackboneState, batch: dict[str, jax.Array]):
    mask = target_mask(batch)

    def loss_fn(trainable):
      params, probe = trainable
      if not grounding_weight:
        logits = forward_logits(model, params, batch)
        return losses.cross_entropy(logits, batch['labels'], mask, axis_name=parallel.DATA), (logits, {})
      # The prefix the LM sees, captured from the same forward (no second vision/Q-Former pass).
      out, captured = model.apply({'params': params}, batch['image'], batch['input_ids'], batch['attention_mask'],
                                  capture_intermediates=_is_image_prefix, mutable=['intermediates'])
      (prefix,) = captured['intermediates']['image_prefix']
      ce = losses.cross_entropy(out.logits, batch['labels'], mask, axis_name=parallel.DATA)
      ground = grounding.grounding_loss(probe, prefix, batch, axis_name=parallel.DATA)
      return ce + grounding_weight * ground, (out.logits, {'loss': ce, 'grounding': ground})

    trainable = (state.params, state.probe)
    (loss, (logits, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    params, probe = optax.apply_updates(trainable, updates)
    metrics = {'loss': loss, 'grad_norm': optax.global_norm(grads),
               'token_acc': losses.token_accuracy(logits, batch['labels'], mask, axis_name=parallel.DATA), **parts}
    new_state = state.replace(step=state.step + 1, params=params, probe=probe, opt_state=opt_state)
    return new_state, jax.tree.map(lambda x: x.astype(jnp.float32), metrics)

  return parallel.data_parallel(step, mesh, batch_argnums=(1,), donate_argnums=(0,))
