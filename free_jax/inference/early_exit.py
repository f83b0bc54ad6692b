"""The compiled early-exit decoder: greedy decoding where each token leaves at the first confident exit.

One XLA program per (batch, prompt length, max_new_tokens) shape, compiled ahead of use:

* a step (the prompt prefill, then one token at a time in a `lax.while_loop`) runs the backbone in
  segments [0, l_1), [l_1, l_2), ..., [l_E, L). After segment i, exit i (its transformer layer and
  classifier, `free_jax.exits.apply_exit`) scores the step's last position; the token takes exit i's
  argmax if its confidence >= threshold i. Deeper segments sit in nested `lax.cond`s whose predicate
  is a scalar, so they are really skipped, not computed and masked (never `vmap` this decision).
* Thresholds (one per exit) and the patience k are traced arguments: a sweep never recompiles.
* KV of skipped layers (state propagation, as in CALM): when a step stops at exit i, the hidden
  state that entered exit i (backbone output after layer l_i) is projected to K/V for backbone
  layers [l_i, L) and for the deeper exits' own layers, in one batched `propagate_kv` each, so later
  tokens that go deep attend to something sensible. Every exit keeps its own KV cache, filled for
  every token. By default this work is deferred until a later step actually enters the skipped
  layers, then done batched over the pending tokens (`propagation`), the prompt's included (a lazy
  prefill: when no token goes deep, the prompt's deep K/V is never computed).
* Batches use the synchronous policy: the batch goes deeper while any unfinished row is still
  unconfident; a row that was confident at an earlier exit keeps that exit's token (its deeper
  layers then run for real, so its deep KV is exact). Rows finish at their own EOS.
* The prompt prefill is a step like the others (``prefill='early_exit'``, default): its first
  answer token may exit early, and the prompt's deep KV is then propagated. ``prefill='full'``
  always runs the prompt through every layer (the first token is then full depth).

Token-for-token, threshold > 1 (`confidence.NEVER_EXIT`) is the full-depth cached greedy decode;
threshold 0 gives exit 0's teacher-forced prediction for every token (deeper caches are written by
propagation but never read).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from free_jax import exits as exits_lib
from free_jax.inference import confidence as conf_lib
from free_jax.inference import propagation
from free_jax.models import lm_api

PyTree = Any
PREFILL_MODES = ('early_exit', 'full')
PROPAGATION_MODES = ('deferred', 'eager')


@flax.struct.dataclass
class DecodeOutput:
  """Result of one early-exit decode.

  Attributes:
    tokens: int32[B, N] generated tokens; `pad_token_id` after a row's EOS.
    exit_index: int32[B, N] exit each token left at (0..E-1 exits, E = final layer); -1 where no
      token was generated (after EOS).
    step_depth: int32[N] deepest exit the (synchronous) batch reached in each step (E = final
      layer); -1 for steps not run. Step 0 is the prompt prefill.
    num_steps: int32[] steps run (<= N; fewer when every row hit EOS).
  """

  tokens: jax.Array
  exit_index: jax.Array
  step_depth: jax.Array
  num_steps: jax.Array


@flax.struct.dataclass
class _StepState:
  h: jax.Array            # float[B, T, D] current hidden state
  cache: lm_api.KVCache   # backbone, L layers
  exit_cache: lm_api.KVCache  # one layer per exit
  token: jax.Array        # int32[B]
  exit_index: jax.Array   # int32[B]
  decided: jax.Array      # bool[B] token chosen (or the row does not need one)
  patience: conf_lib.PatienceState
  depth: jax.Array        # int32[] deepest exit reached
  # Deferred propagation regions, (prompt,) in the prefill, (prompt, decode steps) after; None: eager.
  pending: tuple[propagation.Pending, ...] | None


def position_limit(stack: lm_api.DecoderStack) -> int | None:
  """Longest sequence the LM's position embeddings allow (None for relative positions, e.g. T5)."""
  return getattr(getattr(stack, 'config', None), 'max_position_embeddings', None)


def layer_cost(step_depth, exit_layers: tuple[int, ...], num_layers: int) -> np.ndarray:
  """Layers executed per step, exit layers included: float[...] from int step_depth[...] (>= 0).

  Stopping at exit d runs l_d backbone layers and d + 1 exit layers; the final layer runs all L
  backbone layers and all E exits.
  """
  depth = np.asarray(step_depth)
  backbone = np.asarray((*exit_layers, num_layers))[depth]
  return (backbone + np.minimum(depth + 1, len(exit_layers))).astype(np.float64)


@dataclasses.dataclass(frozen=True)
class EarlyExitDecoder:
  """Greedy early-exit decoding over any `lm_api.DecoderStack` (OPT, T5 decoder).

  Attributes:
    stack: the backbone LM.
    exit_layers: exit placement (`free_jax.exits.validate_layers`): exit i reads the output of
      layer exit_layers[i]. Empty: plain full-depth greedy decoding through the same program
      structure (no exit params needed), the fair baseline for wall-clock speedups.
    max_new_tokens: N, tokens generated per row (including the EOS).
    eos_token_id: a row stops after emitting it (None: never).
    pad_token_id: written after a row's EOS.
    confidence: one of `configs.CONFIDENCE_MEASURES` ('max_prob', 'top2_margin', 'entropy',
      'patience').
    prefill: one of PREFILL_MODES (module docstring).
    propagation: 'deferred' (default; `propagation` module: the decode steps' skipped K/V are
      written, batched, only when a later step enters those layers) or 'eager' (written by the
      step that skipped them). Both give the same cache contents wherever they are read.
  """

  stack: Any
  exit_layers: tuple[int, ...]
  max_new_tokens: int
  eos_token_id: int | None
  pad_token_id: int = 0
  confidence: str = 'max_prob'
  prefill: str = 'early_exit'
  propagation: str = 'deferred'
  # Compiled executables by input shape; `traces` counts Python traces (tests assert no retrace).
  _compiled: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)
  _counters: dict = dataclasses.field(default_factory=lambda: {'traces': 0}, compare=False,
                                      repr=False)

  def __post_init__(self):
    if self.exit_layers:
      object.__setattr__(self, 'exit_layers',
                         exits_lib.validate_layers(self.exit_layers, self.stack.num_layers))
    else:
      object.__setattr__(self, 'exit_layers', ())
    if self.confidence != 'patience':
      conf_lib.get_confidence_fn(self.confidence)
    if self.propagation not in PROPAGATION_MODES:
      raise ValueError(f'propagation={self.propagation!r}; expected one of {PROPAGATION_MODES}')
    if self.prefill not in PREFILL_MODES:
      raise ValueError(f'prefill={self.prefill!r}; expected one of {PREFILL_MODES}')
    if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or (
        self.max_new_tokens < 1):
      raise ValueError(f'max_new_tokens={self.max_new_tokens!r} must be a positive integer')

  @property
  def num_exits(self) -> int:
    return len(self.exit_layers)

  @property
  def traces(self) -> int:
    """How many times the decode function was traced (once per compiled shape)."""
    return self._counters['traces']

  # ----------------------------------------------------------------------------------------------
  # Input checks (host side, before anything is compiled).

  def check_inputs(self, exit_params: PyTree, prompt_valid, thresholds=None, patience=None) -> None:
    """One-line ValueErrors for inputs the decoder cannot serve; called before compiling."""
    held = exits_lib.num_exits(exit_params) if self.num_exits else 0
    if held != self.num_exits:
      raise ValueError(f'exit_params hold {held} exits but exit_layers={self.exit_layers} has '
                       f'{self.num_exits}')
    valid = np.asarray(prompt_valid)
    if valid.ndim != 2 or valid.shape[1] == 0:
      raise ValueError(f'empty prompt: prompt_valid must be bool[B, P] with P >= 1, got shape '
                       f'{valid.shape}')
    empty_rows = np.flatnonzero(~valid.astype(bool).any(axis=1))
    if empty_rows.size:
      raise ValueError(f'empty prompt: rows {empty_rows.tolist()} of prompt_valid have no valid token')
    limit = position_limit(self.stack)
    if limit is not None and valid.shape[1] + self.max_new_tokens > limit:
      raise ValueError(f'max_new_tokens={self.max_new_tokens} with a prompt of {valid.shape[1]} '
                       f'tokens exceeds the position limit max_position_embeddings={limit}')
    if thresholds is not None and self.num_exits:
      conf_lib.validate_thresholds(thresholds, self.num_exits)
    if patience is not None:
      conf_lib.validate_patience(patience)

  # ----------------------------------------------------------------------------------------------
  # The traced program.

  def _exit_decision(self, i: int, logits: jax.Array, s: _StepState, thresholds: jax.Array,
                     patience: jax.Array) -> _StepState:
    """Exit i's vote on float[B, V] last-position logits; undecided confident rows take it."""
    prediction = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    state = s.patience
    if self.confidence == 'patience':
      state, fire = conf_lib.patience_update(state, prediction, patience)
    else:
      fire = conf_lib.get_confidence_fn(self.confidence)(logits) >= thresholds[i]
    fire &= ~s.decided
    return s.replace(token=jnp.where(fire, prediction, s.token),
                     exit_index=jnp.where(fire, i, s.exit_index), decided=s.decided | fire,
                     patience=state)

  def _stop(self, i: int, lm_params: PyTree, exit_stack: PyTree, ctx: PyTree,
            s: _StepState) -> _StepState:
    """The step ends at exit i: propagate the exit's input state into everything skipped."""
    if s.pending is not None:  # deferred: remembered, written when a later step goes deeper
      pending = (*s.pending[:-1], s.pending[-1].record(s.cache.index, s.h, i))  # the step's own region
      return s.replace(pending=pending, depth=jnp.asarray(i, jnp.int32))
    cache = self.stack.propagate_kv(lm_params, s.h, s.cache, ctx, self.exit_layers[i],
                                    self.stack.num_layers)
    exit_cache = s.exit_cache
    if i + 1 < self.num_exits:
      exit_cache = self.stack.propagate_kv(exit_stack, s.h, exit_cache, ctx, i + 1, self.num_exits)
    return s.replace(cache=cache, exit_cache=exit_cache, depth=jnp.asarray(i, jnp.int32))

  def _segment(self, i: int, lm_params: PyTree, exit_params: PyTree, exit_stack: PyTree,
               ctx: PyTree, thresholds: jax.Array, patience: jax.Array, s: _StepState) -> _StepState:
    """Runs backbone segment i, then exit i and, unless every row is decided, segment i + 1."""
    bounds = (0, *self.exit_layers, self.stack.num_layers)
    if i and s.pending is not None:
      pending, cache, exit_cache = propagation.materialise(self.stack, lm_params, exit_stack, s.pending, s.cache,
                                                           s.exit_cache, ctx, i, bounds)
      s = s.replace(pending=pending, cache=cache, exit_cache=exit_cache)
    h, cache = s.h, s.cache
    # One layer at a time: XLA inlines one-trip scans, whereas a multi-layer scan copies its
    # parameter slice and carried cache on every step (measured ~1.7x slower on CPU).
    for layer in range(bounds[i], bounds[i + 1]):
      h, _, cache = self.stack.run_layers(lm_params, h, cache, ctx, layer, layer + 1)
    s = s.replace(h=h, cache=cache)
    if i == self.num_exits:  # the final layer answers every row still undecided
      features = self.stack.final_features(lm_params, h[:, -1:])
      final = jnp.argmax(self.stack.logits(lm_params, features)[:, 0], axis=-1).astype(jnp.int32)
      return s.replace(token=jnp.where(s.decided, s.token, final),
                       exit_index=jnp.where(s.decided, s.exit_index, i),
                       decided=jnp.ones_like(s.decided), depth=jnp.asarray(i, jnp.int32))
    one_exit = exits_lib.exit_slice(exit_params, i)
    _, logits, sub = exits_lib.apply_exit(self.stack, lm_params, one_exit, h,
                                          s.exit_cache.layers(i, i + 1), ctx)
    s = s.replace(exit_cache=s.exit_cache.with_layers(i, sub))
    s = self._exit_decision(i, logits[:, -1], s, thresholds, patience)
    deeper = functools.partial(self._segment, i + 1, lm_params, exit_params, exit_stack, ctx,
                               thresholds, patience)
    stop = functools.partial(self._stop, i, lm_params, exit_stack, ctx)
    return jax.lax.cond(jnp.all(s.decided), stop, deeper, s)

  def _step(self, lm_params, exit_params, thresholds, patience, cache, exit_cache, pending, token_valid,
            active, encoder, input_ids=None, inputs_embeds=None):
    """One step (prefill or one token): (token, exit_index, depth, cache, exit_cache, pending)."""
    h, cache, ctx = lm_api.begin_step(self.stack, lm_params, cache, token_valid, input_ids=input_ids,
                                      inputs_embeds=inputs_embeds, encoder=encoder)
    exit_cache = exit_cache.mark_valid(token_valid)
    # The exit layers as one per-layer "layers" tuple, so `propagate_kv` covers the deeper exits.
    exit_stack = None if not self.num_exits else {
        'layers': tuple(jax.tree.map(lambda x: x[0], e['layers']) for e in exit_params)}
    batch = token_valid.shape[0]
    s = _StepState(h=h, cache=cache, exit_cache=exit_cache, token=jnp.zeros(batch, jnp.int32),
                   exit_index=jnp.full(batch, self.num_exits, jnp.int32), decided=~active,
                   patience=conf_lib.PatienceState.init((batch,)), depth=jnp.asarray(-1, jnp.int32),
                   pending=pending)
    s = self._segment(0, lm_params, exit_params, exit_stack, ctx, thresholds, patience, s)
    steps = token_valid.shape[1]
    return (s.token, s.exit_index, s.depth, s.cache.advance(steps), s.exit_cache.advance(steps),
            s.pending)

  def _decode(self, lm_params, exit_params, thresholds, patience, prompt, prompt_valid, encoder):
    self._counters['traces'] += 1
    lm_params, exit_params = self.prepare(lm_params, exit_params)  # no-op on prepared params
    chex.assert_shape(thresholds, (self.num_exits,))
    batch, prompt_length = prompt_valid.shape
    n = self.max_new_tokens
    cache = self.stack.init_cache(batch, prompt_length + n)
    exit_cache = lm_api.KVCache.zeros(self.num_exits, batch, prompt_length + n, self.stack.num_heads,
                                      self.stack.head_dim, cache.k.dtype)
    prompt_key = 'input_ids' if jnp.issubdtype(prompt.dtype, jnp.integer) else 'inputs_embeds'
    prefill_thresholds = (thresholds if self.prefill == 'early_exit'
                          else jnp.full_like(thresholds, conf_lib.NEVER_EXIT))
    prefill_patience = patience if self.prefill == 'early_exit' else jnp.asarray(n + 10**6)
    active = jnp.ones(batch, bool)
    deferred = self.propagation == 'deferred' and self.num_exits
    region = functools.partial(propagation.Pending.empty, batch, hidden=self.stack.hidden_size,
                               num_segments=self.num_exits + 1, dtype=cache.k.dtype)
    pending = (region(prompt_length, first_slot=0),) if deferred else None
    token, exit_index, depth, cache, exit_cache, pending = self._step(
        lm_params, exit_params, prefill_thresholds, prefill_patience, cache, exit_cache, pending,
        prompt_valid.astype(bool), active, encoder, **{prompt_key: prompt})
    if deferred:
      pending = (*pending, region(n, first_slot=prompt_length))
    tokens = jnp.full((batch, n), self.pad_token_id, jnp.int32).at[:, 0].set(token)
    exit_indices = jnp.full((batch, n), -1, jnp.int32).at[:, 0].set(exit_index)
    depths = jnp.full((n,), -1, jnp.int32).at[0].set(depth)
    finished = self._is_eos(token)

    def keep_going(carry):
      t, finished = carry[0], carry[-1]
      return (t < n) & ~jnp.all(finished)

    def body(carry):
      t, tokens, exit_indices, depths, cache, exit_cache, pending, finished = carry
      previous = jax.lax.dynamic_slice_in_dim(tokens, t - 1, 1, axis=1)
      active = ~finished
      token, exit_index, depth, cache, exit_cache, pending = self._step(
          lm_params, exit_params, thresholds, patience, cache, exit_cache, pending,
          jnp.ones((batch, 1), bool), active, encoder, input_ids=previous)
      token = jnp.where(active, token, self.pad_token_id)
      exit_index = jnp.where(active, exit_index, -1)
      tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], t, axis=1)
      exit_indices = jax.lax.dynamic_update_slice_in_dim(exit_indices, exit_index[:, None], t, axis=1)
      depths = jax.lax.dynamic_update_slice_in_dim(depths, depth[None], t, axis=0)
      return (t + 1, tokens, exit_indices, depths, cache, exit_cache, pending,
              finished | self._is_eos(token))

    carry = (jnp.asarray(1, jnp.int32), tokens, exit_indices, depths, cache, exit_cache, pending,
             finished)
    t, tokens, exit_indices, depths, *_ = jax.lax.while_loop(keep_going, body, carry)
    return DecodeOutput(tokens=tokens, exit_index=exit_indices, step_depth=depths, num_steps=t)

  def _is_eos(self, token: jax.Array) -> jax.Array:
    if self.eos_token_id is None:
      return jnp.zeros(token.shape, bool)
    return token == self.eos_token_id

  # ----------------------------------------------------------------------------------------------
  # Public entry points.

  def prepare(self, lm_params: PyTree, exit_params: PyTree) -> tuple[PyTree, PyTree]:
    """The decoding form of the params: per-layer and per-exit arrays (`lm_api.unstack_layers`).

    Call once, outside jit, and pass the result to every decode: stacked params work too, but then
    each call copies every layer's weights, the ones an early exit skips included.
    """
    lm_params = lm_api.unstack_layers(lm_params)
    return lm_params, exits_lib.unstack_exits(exit_params) if self.num_exits else exit_params

  def compile(self, lm_params: PyTree, exit_params: PyTree, prompt: jax.Array,
              prompt_valid: jax.Array, encoder: Any = None) -> tuple[Any, float]:
    """The compiled executable for these input shapes (cached) and its compile time in seconds.

    Args:
      lm_params, exit_params: backbone LM and exit parameters (`free_jax.exits`), best in the
        decoding form of `prepare`.
      prompt: int[B, P] token ids, or float[B, P, E] input embeddings (BLIP-2 OPT: the image
        prefix in place, `Blip2Model.prompt_embeddings`; T5: the decoder start token ids).
      prompt_valid: bool[B, P] real tokens (left padding).
      encoder: the family's encoder state (T5: `T5Encoded`), else None.
    """
    self.check_inputs(exit_params, prompt_valid)
    args = (lm_params, exit_params, jax.ShapeDtypeStruct((self.num_exits,), jnp.float32),
            jax.ShapeDtypeStruct((), jnp.int32), prompt, prompt_valid, encoder)
    key = (jax.tree.structure(args),
           tuple((tuple(x.shape), np.dtype(x.dtype)) for x in jax.tree.leaves(args)))
    if key not in self._compiled:
      start = time.perf_counter()
      compiled = jax.jit(self._decode).lower(*args).compile()
      self._compiled[key] = (compiled, time.perf_counter() - start)
    return self._compiled[key]

  def __call__(self, lm_params: PyTree, exit_params: PyTree, prompt: jax.Array,
               prompt_valid: jax.Array, thresholds=conf_lib.NEVER_EXIT, encoder: Any = None,
               patience: int = 1) -> DecodeOutput:
    """Decodes `max_new_tokens` greedily with early exits (asynchronous: returns device arrays).

    Args:
      thresholds: one threshold for every exit or one per exit, in [0, 1]; > 1 never exits.
      patience: k consecutive agreeing exits (only for confidence='patience').
      Others: see `compile`.
    """
    self.check_inputs(exit_params, prompt_valid, thresholds, patience)
    thresholds = (conf_lib.validate_thresholds(thresholds, self.num_exits) if self.num_exits
                  else np.zeros(0, np.float32))
    compiled, _ = self.compile(lm_params, exit_params, prompt, prompt_valid, encoder)
    return compiled(lm_params, exit_params, thresholds, np.int32(patience), prompt, prompt_valid,
                    encoder)
