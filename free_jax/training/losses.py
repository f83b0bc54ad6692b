"""FREE losses and metrics: pure functions of logits/features and a token mask.

Conventions
-----------
* Every per-token quantity is reduced with a *masked mean* over the tokens where ``mask`` is true
  (bool or {0, 1}, shape [B, T] or any shape matching the per-token values). Padding and
  prompt/image tokens are excluded by the caller's mask.
* ``axis_name``: inside ``jax.shard_map`` pass the data axis (``parallel.DATA``); the masked mean then
  sums numerator and token count over all devices, so the value is the *global* masked mean, the same
  on every device, and equal to the single-device value even when devices hold different numbers of
  real tokens. Under ``shard_map``'s default ``check_vma=True`` its gradient w.r.t. replicated params is
  already the global gradient (see ``parallel.py``).
* Discriminator logits are real/fake logits: > 0 means "real" (the backbone's final-layer features),
  < 0 means "fake" (an exit's features).
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import optax


def masked_mean(values: jax.Array, mask: jax.Array, axis_name: str | None = None) -> jax.Array:
  """float[]: mean of ``values`` over positions where ``mask`` is set; 0 when no position is set.

  Args:
    values: float[...] per-token values.
    mask: bool[...] (or {0, 1}) of the same shape.
    axis_name: if given, the mean is taken over all devices of this mesh axis.
  """
  chex.assert_equal_shape([values, mask])
  mask = mask.astype(bool)
  # `where`, not a product: a NaN/inf at a padding position must not leak into the mean.
  num, den = jnp.sum(jnp.where(mask, values, 0)), jnp.sum(mask, dtype=values.dtype)
  if axis_name is not None:
    num, den = jax.lax.psum((num, den), axis_name)
  # A safe denominator keeps the gradient finite when a batch has no real token.
  return num / jnp.where(den > 0, den, 1)


def discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array, mask: jax.Array, *,
                       label_smoothing: float = 0.0, axis_name: str | None = None) -> jax.Array:
  """Binary cross-entropy of the discriminator: real tokens -> 1, fake tokens -> 0.

  Args:
    real_logits: float[B, T] discriminator logits on the final layer's features.
    fake_logits: float[B, T] discriminator logits on an exit's features (same tokens).
    mask: bool[B, T] real (non-padding) tokens.
    label_smoothing: one-sided smoothing: the real target becomes ``1 - label_smoothing``; the fake
      target stays 0 (smoothing fakes would reward the generator's mistakes).
    axis_name: see module docstring.

  Returns:
    float[]: masked-mean BCE on real tokens plus masked-mean BCE on fake tokens.
  """
  chex.assert_equal_shape([real_logits, fake_logits, mask])
  real_logits, fake_logits = jnp.asarray(real_logits, jnp.float32), jnp.asarray(fake_logits, jnp.float32)
  real_target = jnp.full_like(real_logits, 1.0 - label_smoothing)
  real_bce = optax.sigmoid_binary_cross_entropy(real_logits, real_target)
  fake_bce = optax.sigmoid_binary_cross_entropy(fake_logits, jnp.zeros_like(fake_logits))
  return masked_mean(real_bce, mask, axis_name) + masked_mean(fake_bce, mask, axis_name)


def generator_loss(fake_logits: jax.Array, mask: jax.Array, *, axis_name: str | None = None) -> jax.Array:
  """Non-saturating generator loss: masked mean of ``-log D(fake)`` (= softplus(-logit)).

  Unlike ``log(1 - D(fake))`` it keeps a strong gradient while the discriminator wins.

  Args:
    fake_logits: float[B, T] discriminator logits on the exit's features.
    mask: bool[B, T] real tokens.
  """
  chex.assert_equal_shape([fake_logits, mask])
  return masked_mean(jax.nn.softplus(-fake_logits), mask, axis_name)


def r1_penalty(disc_apply: Callable[[jax.Array], jax.Array], real_features: jax.Array, mask: jax.Array, *,
               axis_name: str | None = None) -> jax.Array:
  """R1 gradient penalty: masked mean over tokens of ``||d D(x) / d x||^2`` at real features.

  Multiply by ``gamma / 2`` in the discriminator loss. The gradient of the sum of logits gives every
  token's own input gradient because the discriminator is applied per token.

  Args:
    disc_apply: features float[..., T, D] -> logits float[..., T] (params closed over).
    real_features: float[..., T, D] final-layer features.
    mask: bool[..., T] real tokens.
  """
  chex.assert_equal_shape_prefix([real_features, mask], mask.ndim)
  grads = jax.grad(lambda x: jnp.sum(disc_apply(x)))(real_features)
  return masked_mean(jnp.sum(jnp.square(grads), axis=-1), mask, axis_name)


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array, *,
                  axis_name: str | None = None) -> jax.Array:
  """Token cross-entropy, masked mean.

  Labels are *aligned with positions*: ``labels[b, t]`` is the token that position t must predict
  (i.e. already shifted: for teacher forcing ``labels[:, t] = input_ids[:, t + 1]``). No shifting
  happens here, so the caller owns the alignment once, in the data pipeline.

  Args:
    logits: float[B, T, V].
    labels: int[B, T] target token ids (any value where mask is false).
    mask: bool[B, T] positions that have a target.
  """
  chex.assert_rank(logits, 3)
  chex.assert_equal_shape([labels, mask, logits[..., 0]])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return masked_mean(ce, mask, axis_name)


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array, *,
            temperature: float = 1.0, axis_name: str | None = None) -> jax.Array:
  """Knowledge distillation: ``KL(p_teacher || p_student)`` at a temperature, masked mean.

  Both distributions are softmax(logits / temperature); the KL is scaled by ``temperature**2`` so
  gradient magnitudes do not shrink as the temperature grows (Hinton et al., 2015). The teacher (the
  backbone's final layer) gets no gradient.

  Args:
    student_logits: float[B, T, V] exit logits.
    teacher_logits: float[B, T, V] final-layer logits.
    mask: bool[B, T].
  """
  chex.assert_rank(student_logits, 3)
  chex.assert_equal_shape([student_logits, teacher_logits])
  chex.assert_equal_shape([mask, student_logits[..., 0]])
  log_p_student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature)
  log_p_teacher = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature)
  kl = optax.losses.kl_divergence_with_log_targets(log_p_student, log_p_teacher)
  return temperature**2 * masked_mean(kl, mask, axis_name)


def cosine_loss(features: jax.Array, target: jax.Array, mask: jax.Array, *,
                axis_name: str | None = None) -> jax.Array:
  """Feature alignment without a GAN: masked mean of ``1 - cos(features, target)``.

  Args:
    features: float[B, T, D] exit features.
    target: float[B, T, D] final-layer features (no gradient).
    mask: bool[B, T].
  """
  chex.assert_equal_shape([features, target])
  chex.assert_equal_shape([mask, features[..., 0]])
  cos = optax.losses.cosine_similarity(features.astype(jnp.float32),
                                       jax.lax.stop_gradient(target).astype(jnp.float32), epsilon=1e-8)
  return masked_mean(1.0 - cos, mask, axis_name)


def discriminator_accuracy(real_logits: jax.Array, fake_logits: jax.Array, mask: jax.Array, *,
                           axis_name: str | None = None) -> tuple[jax.Array, jax.Array]:
  """(accuracy on real tokens, accuracy on fake tokens): real is right when its logit > 0, fake when < 0.

  Args:
    real_logits, fake_logits: float[B, T]; mask: bool[B, T].
  """
  chex.assert_equal_shape([real_logits, fake_logits, mask])
  real_acc = masked_mean((real_logits > 0).astype(jnp.float32), mask, axis_name)
  fake_acc = masked_mean((fake_logits < 0).astype(jnp.float32), mask, axis_name)
  return real_acc, fake_acc


def token_accuracy(logits: jax.Array, labels: jax.Array, mask: jax.Array, *,
                   axis_name: str | None = None) -> jax.Array:
  """float[]: share of masked positions whose argmax equals the (position-aligned) label.

  Args:
    logits: float[B, T, V]; labels: int[B, T]; mask: bool[B, T].
  """
  chex.assert_rank(logits, 3)
  chex.assert_equal_shape([labels, mask, logits[..., 0]])
  return masked_mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), mask, axis_name)


def agreement(logits: jax.Array, final_logits: jax.Array, mask: jax.Array, *,
              axis_name: str | None = None) -> jax.Array:
  """float[]: share of masked positions where the exit's argmax equals the final layer's argmax.

  Args:
    logits: float[B, T, V] exit logits; final_logits: float[B, T, V]; mask: bool[B, T].
  """
  chex.assert_equal_shape([logits, final_logits])
  return token_accuracy(logits, jnp.argmax(final_logits, -1), mask, axis_name=axis_name)
