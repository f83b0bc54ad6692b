"""Per-exit discriminators ("feature classifiers") of FREE.

A discriminator looks at one token's feature vector (the LM head's input, i.e. ``final_features``)
and says whether it came from the backbone's final layer (real, logit > 0) or from an exit (fake).
It sees features, never vocabulary logits: the official code fed it logits, which lets it win on
confidence statistics instead of on the representation the exits should match.
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'leaky_relu': lambda x: nn.leaky_relu(x, negative_slope=0.2),
    'relu': nn.relu,
    'gelu': nn.gelu,
    'silu': nn.silu,
    'tanh': jnp.tanh,
}


def _activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f'discriminator activation {name!r} is not one of {sorted(ACTIVATIONS)}')
  return ACTIVATIONS[name]


class Discriminator(nn.Module):
  """Per-token MLP: features float[..., D] -> real/fake logit float[...].

  Attributes:
    hidden_size: width of each hidden layer.
    num_layers: number of hidden layers (>= 1); a final Dense(1) gives the logit.
    activation: a key of ``ACTIVATIONS`` (LeakyReLU(0.2) by default, the usual GAN choice).
    dtype: computation dtype; params stay float32.
  """

  hidden_size: int = 256
  num_layers: int = 2
  activation: str = 'leaky_relu'
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    if self.num_layers < 1:
      raise ValueError(f'discriminator num_layers must be >= 1, got {self.num_layers}')
    act = _activation(self.activation)
    x = features.astype(self.dtype)
    for i in range(self.num_layers):
      x = act(nn.Dense(self.hidden_size, dtype=self.dtype, name=f'hidden_{i}')(x))
    # The logit is computed in float32 so the BCE is not quantised in bf16.
    return nn.Dense(1, dtype=jnp.float32, name='logit')(x)[..., 0]


class Discriminators(nn.Module):
  """One independent `Discriminator` per exit, params stacked on a leading exit axis.

  ``params`` leaves have shape [E, ...]; ``apply`` maps features float[E, ..., D] (exit e's
  features at index e) to logits float[E, ...]. Each exit's discriminator only ever sees its own
  slice, so the E discriminators are separate models computed in one vmapped call.

  Attributes:
    num_exits: E.
    hidden_size, num_layers, activation, dtype: as in `Discriminator`.
  """

  num_exits: int
  hidden_size: int = 256
  num_layers: int = 2
  activation: str = 'leaky_relu'
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    if features.ndim < 2 or features.shape[0] != self.num_exits:
      raise ValueError(f'Discriminators expects features [num_exits={self.num_exits}, ..., D], '
                       f'got shape {features.shape}')
    stacked = nn.vmap(Discriminator, variable_axes={'params': 0}, split_rngs={'params': True},
                      in_axes=0, out_axes=0, axis_size=self.num_exits)
    per_exit = stacked(self.hidden_size, self.num_layers, self.activation, self.dtype, name='per_exit')
    logits = per_exit(features)
    chex.assert_shape(logits, features.shape[:-1])
    return logits
