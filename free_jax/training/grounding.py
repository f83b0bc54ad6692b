"""Grounding loss of the embedded backbone: the image prefix must say what is where in the scene.

A from-scratch tiny BLIP-2 trained only with answer cross-entropy never learns to use the image: the
language model first fits the answer prior, no gradient then asks the Q-Former for anything, and its
output collapses to a constant (every question type stayed at chance). Real BLIP-2 avoids this with a
representation-learning stage (image-text contrastive / matching / captioning) that teaches the Q-Former
to extract what text talks about *before* the LM is attached. The embedded benchmark's analogue is
cheap and exact: a linear probe reads the flattened image prefix and predicts, for every colour, the
shape, lattice column and lattice row of the object of that colour (or "absent"), from the generator's
scene metadata (`sort_of_clevr.object_slots`). It trains jointly with the answer loss; the probe is
discarded afterwards, so the backbone's architecture and parameters stay exactly BLIP-2's.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp

from free_jax.data import sort_of_clevr
from free_jax.training import losses

PyTree = Any

# Classes per colour slot: 'absent' plus the values of each attribute.
SLOT_CLASSES = {'shape': 1 + len(sort_of_clevr.SHAPES), 'column': 1 + sort_of_clevr.GRID,
                'row': 1 + sort_of_clevr.GRID}
NUM_SLOTS = len(sort_of_clevr.COLOURS)
LABEL_KEYS = tuple(f'slot_{name}' for name in SLOT_CLASSES)  # batch keys, int32[B, NUM_SLOTS]


def init_probe(num_query_tokens: int, prefix_width: int) -> PyTree:
  """Zero-initialised linear probe float[Q * D] -> float[NUM_SLOTS * sum(SLOT_CLASSES)].

  Zero init: the loss starts at log(classes) and its first gradients reach the prefix only once the
  probe has learned something, so early steps do not push the backbone around at random.
  """
  out = NUM_SLOTS * sum(SLOT_CLASSES.values())
  return {'kernel': jnp.zeros((num_query_tokens * prefix_width, out)), 'bias': jnp.zeros((out,))}


def batch_labels(objects: dict, image_size: int) -> dict:
  """The batch entries `grounding_loss` reads, from the generator's ``objects`` column."""
  slots = sort_of_clevr.object_slots(objects, image_size)
  return {f'slot_{name}': slots[name] for name in SLOT_CLASSES}


def grounding_loss(probe: PyTree, prefix: jax.Array, batch: dict[str, jax.Array], *,
                   axis_name: str | None = None) -> jax.Array:
  """Mean over slots and attributes of the probe's cross-entropy.

  Args:
    probe: `init_probe` params.
    prefix: float[B, Q, D] the projected Q-Former output (`Blip2Model.image_prefix`).
    batch: int32[B, NUM_SLOTS] under `LABEL_KEYS`, and bool[B] 'valid' (batch padding rows get no loss).
    axis_name: data-parallel axis for a global mean.
  """
  b = prefix.shape[0]
  chex.assert_shape([batch[k] for k in LABEL_KEYS], (b, NUM_SLOTS))
  logits = prefix.reshape(b, -1).astype(jnp.float32) @ probe['kernel'] + probe['bias']
  logits = logits.reshape(b, NUM_SLOTS, -1)
  mask = jnp.broadcast_to(batch['valid'].astype(bool)[:, None], (b, NUM_SLOTS))
  total, start = 0.0, 0
  for name, classes in SLOT_CLASSES.items():
    total += losses.cross_entropy(logits[..., start:start + classes], batch[f'slot_{name}'], mask,
                                  axis_name=axis_name)
    start += classes
  return total / len(SLOT_CLASSES)
