"""Deferred computation of skipped layers: K/V that early-exited tokens did not write, filled in later.

A token that leaves at exit i skips the backbone segments after it (and the deeper exits), so their KV
caches have no entry for it. A later token that goes deep attends to those slots. Two ways to fill them:

* ``'recompute'`` (exact, the default): when a step enters segment j, the slots that skipped it run
  through the real layers of segment j (and exit j) first, batched with the current token in one pass
  over the segment's weights. Their K/V, and their hidden states for the next segment, are then exactly
  what a full-depth decode would have written, so a step that reaches the final layer produces exactly
  the full model's logits for its prefix.
* ``'calm'`` (CALM's state propagation, approximate): the skipped slots' K/V are projected from the
  hidden state they exited with (each skipped layer's own input norm and K/V projections).

Either way the work is deferred until a step actually enters the segment, and the prompt's deep layers
too (a lazy prefill: when no token goes deep, they never run).

Bookkeeping is a prefix per segment: a step that enters segment j first computes every slot it is
missing, so the slots missing segment j are always [done[j], current slot). The hidden states to compute
them from are kept per slot (`Deferred.h`: the state each slot left its deepest segment with). The prompt
is caught up in one pass of P positions; decode slots in windows of W positions starting at done[j] (of 2 once
at most 2 are missing).
Window slots past the current one are future slots: what a window writes there (K/V, hidden states) is
overwritten by those slots' own steps before anything reads it, which is why the caches carry W spare
slots at the end instead of masking each write.

Segments are the backbone layer ranges between exits (`early_exit.EarlyExitDecoder`): segment j = layers
[bounds[j], bounds[j + 1]), followed by exit j (j < E).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from free_jax.models import lm_api

PyTree = Any
MODES = ('recompute', 'calm')
Caches = tuple[lm_api.KVCache, lm_api.KVCache]  # (backbone, exits), per-layer form
# What a segment's run returns of its exit layer's output: at 'all' positions, the 'last' one, or 'none' (its
# K/V are written either way).
EXIT_OUTPUTS = ('all', 'last', 'none')
SHORT_WINDOW = 2  # catch-up window when at most this many slots are missing (`_run_windows`)
# (h float[B, T, D], caches at the write index of h's first slot, ctx, exit_output='all') -> (h_out, exit_out or
# None, caches): a segment's layers then its exit's layer.
RunFn = Callable[..., tuple[jax.Array, Any, Caches]]
# (h float[B, T, D], caches at h's first slot) -> caches with the segment's (and exit's) K/V projected from h.
ProjectFn = Callable[[jax.Array, Caches], Caches]
# (cache at the first query's slot, number of queries) -> the layers' ctx for those queries.
ContextFn = Callable[[lm_api.KVCache, int], PyTree]


@flax.struct.dataclass
class Deferred:
  """What the segments are missing, and the hidden states to compute it from.

  Attributes:
    done: int32[E + 1] segment j (and exit j) have K/V for every slot < done[j].
    h: float[B, S, D] per slot, the hidden state its deepest computed segment left it with.
    passes: int32[E + 1] passes over each segment's weights so far (token, window and prompt passes).
  """

  done: jax.Array
  h: jax.Array
  passes: jax.Array

  @classmethod
  def empty(cls, batch: int, length: int, hidden: int, num_segments: int, dtype) -> 'Deferred':
    zeros = jnp.zeros(num_segments, jnp.int32)
    return cls(done=zeros, h=jnp.zeros((batch, length, hidden), dtype), passes=zeros)

  def record(self, slot: jax.Array, h: jax.Array) -> 'Deferred':
    """A step whose tokens at [slot, slot + T) stopped with h float[B, T, D]."""
    return self.replace(h=jax.lax.dynamic_update_slice_in_dim(self.h, h.astype(self.h.dtype), slot, axis=1))

  def ran(self, segment: int, done: jax.Array) -> 'Deferred':
    """Segment `segment` made one more pass; every slot < done now has its K/V."""
    return self.replace(done=self.done.at[segment].set(done), passes=self.passes.at[segment].add(1))


def branch(pred: jax.Array, taken: Callable, skipped: Callable, *operands):
  """`lax.cond(pred, taken, skipped, *operands)` with `skipped` as branch 0 of a switch.

  XLA forwards an operand that a conditional's branch 0 passes through unchanged, but copies it when
  the pass-through branch sits in any other position (openxla/xla#46314, jax-ml/jax#39449): for a KV
  cache that is a copy of every layer per step. `lax.cond` makes the false branch branch 0, so the
  branch that leaves the caches alone goes there.
  """
  return jax.lax.switch(jnp.asarray(pred).astype(jnp.int32), (skipped, taken), *operands)


def _at(caches: Caches, index) -> Caches:
  return caches[0].at(index), caches[1].at(index)


def enter(segment: int, deferred: Deferred, caches: Caches, h: jax.Array, ctx: PyTree, run: RunFn,
          project: ProjectFn, context: ContextFn, *, mode: str, prompt_length: int, window: int,
          has_exit: bool
          ) -> tuple[Deferred, Caches, jax.Array, Any]:
  """A decode step enters `segment`: catch up what earlier steps skipped, then run the current token.

  Args:
    segment: j >= 1 (segment 0 never has anything missing).
    deferred, caches: the decode state; the caches' write index is the current token's slot.
    h: float[B, 1, D] the current token's input of the segment.
    ctx: the layers' ctx for the current token.
    run, project, context: the segment's computations (module docstring).
    mode: one of MODES.
    prompt_length: P, caught up in one pass when the prompt is missing the segment; 0: the prompt
      always ran every segment (a full-depth prefill).
    window: W, the decode slots caught up per pass.
    has_exit: the segment ends at an exit (j < E), whose output `run` returns.

  Returns:
    (deferred, caches, h_out float[B, 1, D], exit_out float[B, 1, D] or None for the final segment).
  """
  slot = caches[0].index
  # Conditionals in which one branch writes the caches and the other passes them through (one whose
  # branches both update a buffer in place copies it, see `branch`): the catch-up (skipped in the
  # common case, where the segment is missing nothing), then, unless it ran the token too, the token.
  behind = deferred.done[segment] < slot
  no_exit_out = jnp.zeros_like(h) if has_exit else None

  def catch_up(deferred, caches, h):
    if prompt_length:
      deferred, caches = branch(
          deferred.done[segment] < prompt_length,
          lambda d, c: _prompt_pass(segment, d, c, run, project, context, mode, prompt_length),
          lambda d, c: (d, c), deferred, caches)
    if mode == 'calm':
      deferred, caches = _project_windows(segment, deferred, caches, project, window)
      return deferred, caches, h, no_exit_out
    return _run_windows(segment, deferred, caches, h, run, context, window, has_exit)

  def token_pass(deferred, caches, h):
    h, exit_out, caches = run(h, caches, ctx)
    return deferred.ran(segment, slot + 1), caches, h, exit_out

  deferred, caches, h, exit_out = branch(behind, catch_up, lambda d, c, h: (d, c, h, no_exit_out),
                                         deferred, caches, h)
  if mode == 'calm':  # the catch-up projected K/V only: the token always runs
    return token_pass(deferred, caches, h)
  return branch(~behind, token_pass, lambda d, c, h: (d, c, h, exit_out), deferred, caches, h)


def _prompt_pass(segment, deferred, caches, run, project, context, mode, prompt_length):
  """The prompt's slots [0, P) through the segment in one pass (a deferred prefill)."""
  slot = caches[0].index
  h = deferred.h[:, :prompt_length]
  at_start = _at(caches, 0)
  if mode == 'calm':
    caches = project(h, at_start)
  else:
    out, _, caches = run(h, at_start, context(at_start[0], prompt_length), 'none')
    deferred = deferred.replace(h=jax.lax.dynamic_update_slice_in_dim(deferred.h, out, 0, axis=1))
  return deferred.ran(segment, jnp.asarray(prompt_length, jnp.int32)), _at(caches, slot)


def _run_windows(segment, deferred, caches, h, run, context, window, has_exit):
  """Recompute: windows from done[segment] through the current slot, which the last one includes.

  Windows of W slots while more than `SHORT_WINDOW` slots are missing (the current one included), then
  windows of `SHORT_WINDOW`: a deep token right after one shallow token is missing 2 slots, and a pass over
  2 positions costs less than one over W where a layer costs its rows (small LMs on a CPU).
  Two loops rather than a conditional choosing the size: both branches of such a conditional would write
  the caches, and XLA then copies them (`branch`).
  """
  slot = caches[0].index
  exit_cur = jnp.zeros_like(h) if has_exit else None

  def body(size, carry):
    deferred, caches, h_cur, exit_cur = carry
    start = deferred.done[segment]
    here = start + jnp.arange(size) == slot
    hw = jnp.where(here[None, :, None], h, jax.lax.dynamic_slice_in_dim(deferred.h, start, size, axis=1))
    at = _at(caches, start)
    out, exit_out, caches = run(hw, at, context(at[0], size))
    deferred = deferred.replace(h=jax.lax.dynamic_update_slice_in_dim(deferred.h, out, start, axis=1))
    offset = jnp.clip(slot - start, 0, size - 1)
    found = jnp.any(here)
    pick = lambda new, old: jnp.where(found, jax.lax.dynamic_slice_in_dim(new, offset, 1, axis=1), old)
    exit_cur = jax.tree.map(pick, exit_out, exit_cur)
    return deferred.ran(segment, start + size), _at(caches, slot), pick(out, h_cur), exit_cur

  carry = (deferred, caches, h, exit_cur)
  short = min(window, SHORT_WINDOW)
  if window > short:
    carry = jax.lax.while_loop(lambda carry: slot - carry[0].done[segment] >= short,
                               functools.partial(body, window), carry)
  deferred, caches, h, exit_cur = jax.lax.while_loop(lambda carry: carry[0].done[segment] <= slot,
                                                     functools.partial(body, short), carry)
  return deferred.replace(done=deferred.done.at[segment].set(slot + 1)), caches, h, exit_cur


def _project_windows(segment, deferred, caches, project, window):
  """CALM: K/V projected from the stored hidden states, windows of W slots up to the current slot."""
  slot = caches[0].index

  def body(carry):
    deferred, caches = carry
    start = deferred.done[segment]
    caches = project(jax.lax.dynamic_slice_in_dim(deferred.h, start, window, axis=1), _at(caches, start))
    return deferred.replace(done=deferred.done.at[segment].set(start + window)), _at(caches, slot)

  deferred, caches = jax.lax.while_loop(lambda carry: carry[0].done[segment] < slot, body, (deferred, caches))
  return deferred.replace(done=deferred.done.at[segment].set(slot)), caches
