"""The FREE training step: a discriminator update, then an exit update against the updated discriminator.

One jitted, data-parallel program per step (`make_free_step`):

1. Frozen backbone, teacher-forced (`teacher_forcing.teacher_forced`): the hidden state after every LM layer. The
   backbone params go through `stop_gradient` and are never given to an optimizer. A batch that carries the
   backbone's states already (`frozen_features`, computed once per example) skips that forward pass.
2. Exits (`exits.apply_exits`) on the hiddens after layers [0, l_e); ``jax.vjp`` keeps their
   pullback so the exit forward runs once for both updates.
3. Discriminator e: real = ``final_features`` of the last layer's output, fake = exit e's
   ``final_features`` (features, not vocab logits), per token, masked to real tokens. BCE (+ R1),
   one optax update (adversarial modes only).
4. Exit loss with the *updated* discriminators: the non-saturating adversarial term, whose gradient
   flows through the fake features into the exit params, plus the mode's terms (`MODES`). Its
   gradient w.r.t. features/logits is pulled back through step 2 (per term, each clipped to
   ``free.term_clip``, when that is set); one optax update.

The adversarial game (D's loss, its accuracies and the adversarial term) is played on the positions
``free.adv_positions`` names: every real token (the paper) or only the target positions.

Losses and metrics are global masked means over the 'data' mesh axis (`losses`, ``axis_name``), so
gradients of replicated params come out already averaged across devices (see `parallel`), and 1 or
8 devices compute the same step.

Token masks (bool[B, T]): ``tokens`` = real (non-padding) tokens of valid rows, used by the
adversarial, cosine and feature terms; ``targets`` = positions with a next-token target (the batch's
pre-shifted ``labels`` / ``loss_mask``: position t predicts token t + 1); ``labelled`` = targets of
rows whose labels the run may use (``data.label_fraction``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from free_jax import exits as exits_lib
from free_jax.models import blip2
from free_jax.teacher_forcing import teacher_forced
from free_jax.training import frozen_features, losses, parallel
from free_jax.training.discriminator import Discriminators
from free_jax.training.state import FreeState

PyTree = Any

# mode -> (uses the adversary, the exit-loss terms besides it).
MODES = {
    'semi_supervised': (True, ('ce',)),        # CE on labelled targets only
    'unsupervised_kd': (True, ('kd',)),        # KL from the final layer's distribution
    'unsupervised_pseudo': (True, ('pseudo',)),  # CE on the final layer's greedy tokens
    'ce_only': (False, ('ce',)),               # DeeBERT-style baseline
    'kd_only': (False, ('kd',)),
    'cosine': (False, ('cosine', 'ce')),       # the GAN replaced by cosine feature alignment
}
# free.adv_positions: the token mask of the adversarial game (`batch_masks`).
ADV_POSITIONS = ('tokens', 'targets')


def batch_masks(batch: dict[str, jax.Array], token_valid: jax.Array) -> dict[str, jax.Array]:
  """The bool[B, T] masks of the module docstring; rows with ``valid`` False (padding rows) drop out."""
  row = batch['valid'].astype(bool)[:, None]
  targets = batch['loss_mask'].astype(bool) & row
  return {'tokens': token_valid & row, 'targets': targets,
          'labelled': targets & batch['labelled'].astype(bool)[:, None]}


def make_discriminators(num_exits: int, disc_config) -> Discriminators:
  """The per-exit discriminators from ``config.discriminator``."""
  return Discriminators(num_exits=num_exits, hidden_size=disc_config.hidden, num_layers=disc_config.depth)


def make_free_step(model: blip2.Blip2Model, exit_layers: Sequence[int], free_config, disc_module: Discriminators,
                   g_tx: optax.GradientTransformation, d_tx: optax.GradientTransformation,
                   mesh: jax.sharding.Mesh) -> Callable[..., tuple[FreeState, dict[str, jax.Array]]]:
  """The jitted data-parallel step ``(state, backbone_params, batch) -> (state, metrics)``.

  Args:
    model: the frozen BLIP-2.
    exit_layers: ``exits.layers`` (validated against the LM depth).
    free_config: ``config.free`` (mode and loss weights).
    disc_module: from `make_discriminators`.
    g_tx, d_tx: optimizers of exits and discriminators.
    mesh: the 1-D 'data' mesh (`parallel.make_mesh`); the batch's leading axis is split over it.

  Returns:
    The step; `state` is donated. Metrics are float32 scalars: ``g_loss``, ``g_grad_norm``,
    ``d_loss``/``d_grad_norm`` (adversarial modes), and per exit ``exit{l}/<term>`` for the loss terms
    (``adv``, ``ce``, ``kd``, ``cosine``, ``pseudo`` as the mode uses them), ``exit{l}/grad_norm`` (its layer's
    gradient before the optimizer's clip), ``<term>_grad_norm`` (each term's gradient before its own clip, with
    ``free.term_clip`` > 0) and ``exit{l}/token_acc``
    (vs labels), ``exit{l}/agreement`` (vs the final layer), ``exit{l}/d_real_acc``, ``exit{l}/d_fake_acc``.
  """
  stack = blip2.lm_stack(model.config, model.dtype)
  layers = exits_lib.validate_layers(exit_layers, stack.num_layers)
  if free_config.mode not in MODES:
    raise ValueError(f'free.mode={free_config.mode!r}; expected one of {tuple(MODES)}')
  adversarial, terms = MODES[free_config.mode]
  cfg = free_config
  if cfg.adv_positions not in ADV_POSITIONS:
    raise ValueError(f'free.adv_positions={cfg.adv_positions!r}; expected one of {ADV_POSITIONS}')
  ax = parallel.DATA
  exit_index = jnp.asarray(layers) - 1

  def disc_logits(d_params, features):
    return disc_module.apply({'params': d_params}, features)

  def step(state: FreeState, backbone_params: PyTree, batch: dict[str, jax.Array]):
    backbone_params = jax.lax.stop_gradient(backbone_params)
    lm_params = backbone_params['language_model']
    if frozen_features.EXIT_INPUTS in batch:
      exit_inputs, final_hidden, token_valid, ctx = frozen_features.restore(stack, lm_params, batch)
    else:
      run = teacher_forced(model, backbone_params, batch)
      exit_inputs, final_hidden, token_valid, ctx = run.hiddens[exit_index], run.hiddens[-1], run.token_valid, run.ctx
    masks = batch_masks(batch, token_valid)
    played = masks[cfg.adv_positions]  # where D sees real vs exit features
    real = stack.final_features(lm_params, final_hidden)
    final_logits = stack.logits(lm_params, real)
    apply = lambda p: exits_lib.apply_exits(stack, lm_params, p, exit_inputs, token_valid, ctx)
    (fake, logits), pullback = jax.vjp(apply, state.exits)
    real_e = jnp.broadcast_to(real, fake.shape)
    metrics = {}

    d_params, d_opt_state = state.discriminators, state.d_opt_state
    if adversarial:
      def d_loss_fn(d_params):
        real_logits = disc_logits(d_params, real_e)
        fake_logits = disc_logits(d_params, jax.lax.stop_gradient(fake))
        loss = sum(losses.discriminator_loss(real_logits[e], fake_logits[e], played,
                                             label_smoothing=cfg.label_smoothing, axis_name=ax)
                   for e in range(len(layers)))
        if cfg.r1_weight:
          r1 = losses.r1_penalty(lambda x: disc_logits(d_params, x), real_e,
                                 jnp.broadcast_to(played, fake.shape[:-1]), axis_name=ax)
          loss = loss + 0.5 * cfg.r1_weight * len(layers) * r1
        return loss, (real_logits, fake_logits)

      (d_loss, (real_logits, fake_logits)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(d_params)
      updates, d_opt_state = d_tx.update(d_grads, d_opt_state, d_params)
      d_params = optax.apply_updates(d_params, updates)
      metrics.update(d_loss=d_loss, d_grad_norm=optax.global_norm(d_grads))
      for e, l in enumerate(layers):
        real_acc, fake_acc = losses.discriminator_accuracy(real_logits[e], fake_logits[e], played,
                                                           axis_name=ax)
        metrics.update({f'exit{l}/d_real_acc': real_acc, f'exit{l}/d_fake_acc': fake_acc})

    pseudo_labels = jnp.argmax(final_logits, -1)

    def term(name, e, fake, logits):
      if name == 'ce':
        return cfg.ce_weight * losses.cross_entropy(logits[e], batch['labels'], masks['labelled'], axis_name=ax)
      if name == 'pseudo':
        return cfg.ce_weight * losses.cross_entropy(logits[e], pseudo_labels, masks['targets'], axis_name=ax)
      if name == 'kd':
        return cfg.kd_weight * losses.kd_loss(logits[e], final_logits, masks['targets'],
                                              temperature=cfg.kd_temperature, axis_name=ax)
      assert name == 'cosine', name
      return cfg.kd_weight * losses.cosine_loss(fake[e], real, masks['tokens'], axis_name=ax)

    def part(name, fake, logits):
      """One exit-loss term, per exit."""
      if name == 'adv':
        fake_logits = disc_logits(d_params, fake)  # the updated discriminators
        return [cfg.adv_weight * losses.generator_loss(fake_logits[e], played, axis_name=ax)
                for e in range(len(layers))]
      return [term(name, e, fake, logits) for e in range(len(layers))]

    names = ('adv',) * adversarial + tuple(terms)

    def loss_of(selected, fake, logits):
      parts = {name: part(name, fake, logits) for name in selected}
      return sum(sum(v) for v in parts.values()), parts

    if cfg.term_clip:
      # One pullback per term, each clipped to its own norm before the sum (the optimizer's global clip follows).
      parts, clipped = {}, []
      for name in names:
        (_, term_parts), cotangents = jax.value_and_grad(functools.partial(loss_of, (name,)), argnums=(0, 1),
                                                         has_aux=True)(fake, logits)
        parts.update(term_parts)
        (grads,) = pullback(cotangents)
        norm = optax.global_norm(grads)
        metrics[f'{name}_grad_norm'] = norm
        scale = jnp.minimum(1.0, cfg.term_clip / jnp.maximum(norm, 1e-12))
        clipped.append(jax.tree.map(lambda g, scale=scale: g * scale, grads))
      g_loss = sum(sum(v) for v in parts.values())
      g_grads = jax.tree.map(lambda *g: sum(g), *clipped)
    else:
      (g_loss, parts), cotangents = jax.value_and_grad(functools.partial(loss_of, names), argnums=(0, 1),
                                                       has_aux=True)(fake, logits)
      (g_grads,) = pullback(cotangents)
    updates, g_opt_state = g_tx.update(g_grads, state.g_opt_state, state.exits)
    exit_params = optax.apply_updates(state.exits, updates)
    metrics.update(g_loss=g_loss, g_grad_norm=optax.global_norm(g_grads))
    for e, l in enumerate(layers):
      metrics.update({f'exit{l}/{name}': values[e] for name, values in parts.items()})
      # Before the optimizer's clip: shows whether one exit's (or the adversary's) gradient dominates it.
      metrics[f'exit{l}/grad_norm'] = optax.global_norm(jax.tree.map(lambda g: g[e], g_grads['layers']))
      metrics[f'exit{l}/token_acc'] = losses.token_accuracy(logits[e], batch['labels'], masks['targets'],
                                                            axis_name=ax)
      metrics[f'exit{l}/agreement'] = losses.agreement(logits[e], final_logits, masks['targets'], axis_name=ax)

    new_state = state.replace(step=state.step + 1, exits=exit_params, discriminators=d_params,
                              g_opt_state=g_opt_state, d_opt_state=d_opt_state)
    return new_state, jax.tree.map(lambda x: x.astype(jnp.float32), metrics)

  return parallel.data_parallel(step, mesh, batch_argnums=(2,), donate_argnums=(0,))
