"""The frozen backbone's share of an exit step, computed once per training example and reused every epoch.

An exit step needs from the backbone only the hidden states its exits start from and the final layer's
output (the discriminators' real features, the KD / pseudo-label targets). The backbone is frozen and a row's
teacher-forced sequence is fixed (its label, or the backbone's own output: `hidden_labels`), so those states
are the same at every epoch: `precompute` runs the backbone over the exit stage's examples once and returns
them as extra example columns, which `batching.iterate_batches` gathers with the rest of each row.
`free_step` then runs only the exits, the discriminators and the LM head (`restore`).

Host memory: N x (E + 1) x T x D float32 (`nbytes`); decoder-only backbones (OPT): a T5 exit also needs
the encoder state, which is not cached.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from free_jax.data import batching
from free_jax.models import blip2, lm_api
from free_jax.teacher_forcing import teacher_forced

PyTree = Any
# Columns added to the examples (row-first): float[N, E, T, D], float[N, T, D], bool[N, T].
EXIT_INPUTS, FINAL_HIDDEN, TOKEN_VALID = 'frozen_exit_inputs', 'frozen_final_hidden', 'frozen_token_valid'
COLUMNS = (EXIT_INPUTS, FINAL_HIDDEN, TOKEN_VALID)


def nbytes(num_examples: int, num_exits: int, seq_len: int, width: int) -> int:
  """Host bytes of the cached columns of `num_examples` rows."""
  return num_examples * ((num_exits + 1) * seq_len * width * 4 + seq_len)


def precompute(model: blip2.Blip2Model, params: PyTree, examples: dict, exit_layers: Sequence[int],
               make_batch, batch_size: int) -> dict[str, np.ndarray]:
  """The cached columns (`COLUMNS`) of every row of `examples`, in row order.

  Args:
    model, params: the frozen BLIP-2 (decoder-only).
    examples: the exit stage's examples (`hidden_labels.exit_stage_examples`), N rows.
    exit_layers: ``exits.layers``.
    make_batch: chunk of examples -> the teacher-forcing batch the exit stage trains on.
    batch_size: rows per backbone call.
  """
  if model.config.is_encoder_decoder:
    raise ValueError('frozen features are cached for decoder-only backbones only')
  exit_index = np.asarray(exit_layers) - 1

  @jax.jit
  def run(params, batch):
    tf = teacher_forced(model, params, batch)
    return jnp.moveaxis(tf.hiddens[exit_index], 0, 1), tf.hiddens[-1], tf.token_valid

  parts = []
  chunks = batching.iterate_batches(examples, batch_size, 0, shuffle=False, num_epochs=1, drop_remainder=False)
  total = -(-batching.num_rows(examples) // batch_size)
  for chunk in tqdm.tqdm(chunks, total=total, desc='frozen features', unit='batch', dynamic_ncols=True):
    batch = make_batch(chunk)
    inputs = {k: batch[k] for k in ('image', 'input_ids', 'attention_mask')}
    rows = batch['valid']
    parts.append([np.asarray(x)[rows] for x in run(params, inputs)])
  return {name: np.concatenate([p[i] for p in parts]) for i, name in enumerate(COLUMNS)}


def restore(stack: lm_api.DecoderStack, lm_params: PyTree, batch: dict[str, jax.Array]
            ) -> tuple[jax.Array, jax.Array, jax.Array, PyTree]:
  """(exit_inputs float[E, B, T, D], final hidden float[B, T, D], token_valid bool[B, T], ctx) of a batch
  with the cached columns: what `teacher_forced` gives the exit step, with the context rebuilt as
  `lm_api.begin_step` builds it for a fresh cache of length T."""
  token_valid = batch[TOKEN_VALID].astype(bool)
  cache = stack.init_cache(*token_valid.shape).mark_valid(token_valid)
  ctx = stack.make_context(lm_params, cache, lm_api.token_positions(cache, token_valid.shape[1]))
  return jnp.moveaxis(batch[EXIT_INPUTS], 1, 0), batch[FINAL_HIDDEN], token_valid, ctx
