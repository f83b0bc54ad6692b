"""Optax optimizers for FREE: AdamW + linear warmup + cosine decay + global-norm clipping.

The generator (exit transformers, and an exit classifier when it is trainable) and the
discriminators get separate optimizers and schedules. Frozen parameters are kept out of every
optimizer *by construction*: the train state holds the trainable subtrees (exits, discriminators)
and their optimizer states; the backbone params are a separate argument of the step that is never
passed to ``tx.init`` / ``tx.update``, so it has no Adam moments and cannot be updated.

Optimizer config fields (see `optimizer_config`):
  learning_rate: peak learning rate (> 0).
  warmup_steps: linear warmup from 0 to the peak (>= 0, < total_steps).
  end_lr_factor: the cosine decays to ``learning_rate * end_lr_factor`` at total_steps.
  weight_decay: decoupled AdamW decay, applied to matrices only (leaves named 'kernel'/'embedding').
  b1, b2, eps: Adam moments.
  grad_clip_norm: clip by global norm before Adam; 0 disables clipping.
"""

from __future__ import annotations

import jax
import ml_collections
import optax

_DECAYED_LEAVES = ('kernel', 'embedding')


def optimizer_config(**overrides) -> ml_collections.ConfigDict:
  """The default optimizer config, with `overrides` applied (unknown fields are an error)."""
  cfg = ml_collections.ConfigDict(dict(
      learning_rate=1e-4, warmup_steps=100, end_lr_factor=0.1, weight_decay=0.01,
      b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=1.0))
  for name, value in overrides.items():
    if name not in cfg:
      raise ValueError(f'unknown optimizer config field {name!r}; fields are {sorted(cfg.keys())}')
    cfg[name] = value
  return cfg


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup to ``cfg.learning_rate`` over ``cfg.warmup_steps``, then cosine to the end factor."""
  if cfg.learning_rate <= 0:
    raise ValueError(f'optimizer learning_rate must be > 0, got {cfg.learning_rate}')
  if not 0 <= cfg.warmup_steps < total_steps:
    raise ValueError(f'optimizer warmup_steps={cfg.warmup_steps} must be in [0, total_steps={total_steps})')
  if not 0 <= cfg.end_lr_factor <= 1:
    raise ValueError(f'optimizer end_lr_factor must be in [0, 1], got {cfg.end_lr_factor}')
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
      decay_steps=total_steps, end_value=cfg.learning_rate * cfg.end_lr_factor)


def _decay_mask(params):
  """True for weight matrices: biases and norm scales are not decayed (stacked params have ndim > 1
  everywhere, so the leaf name decides, not the rank)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) in _DECAYED_LEAVES, params)


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """Clip (optional) -> AdamW on the warmup-cosine schedule."""
  if cfg.grad_clip_norm < 0:
    raise ValueError(f'optimizer grad_clip_norm must be >= 0 (0 disables), got {cfg.grad_clip_norm}')
  adamw = optax.adamw(make_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay, mask=_decay_mask)
  if cfg.grad_clip_norm == 0:
    return adamw
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adamw)


def make_gan_optimizers(cfg: ml_collections.ConfigDict, total_steps: int
                        ) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
  """(generator tx, discriminator tx) from ``cfg.generator`` and ``cfg.discriminator`` optimizer configs."""
  for name in ('generator', 'discriminator'):
    if name not in cfg:
      raise ValueError(f'optimizer config needs a {name!r} sub-config (see optim.optimizer_config)')
  return make_optimizer(cfg.generator, total_steps), make_optimizer(cfg.discriminator, total_steps)
