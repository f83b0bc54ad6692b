"""The compiled early-exit decoder: greedy decoding where each token leaves at the first confident exit.

One XLA program per (batch, prompt length, max_new_tokens) shape, compiled ahead of use:

* a step (the prompt prefill, then one token at a time in a `lax.while_loop`) runs the backbone in
  segments [0, l_1), [l_1, l_2), ..., [l_E, L). After segment i, exit i (its transformer layer and
  classifier, `free_jax.exits`) scores the step's last position; the token takes exit i's argmax if
  its confidence >= threshold i. Each deeper segment runs under its own `lax.cond` (one after the
  other, not nested) whose predicate is a scalar, so it is really skipped, not computed and masked
  (never `vmap` this decision).
* Thresholds (one per exit), the patience k and an optional per-step depth schedule are traced
  arguments: a sweep never recompiles.
* KV caches are one array per layer (`lm_api.KVCache`, the per-layer form), updated in place, so a
  step copies no cache; the params are per-layer too (`prepare`).
* The K/V of skipped layers are filled in when a later step first enters them (`propagation`):
  by default exactly, the skipped slots running through the real layers batched with the current
  token (``propagation='recompute'``), or projected from the exit state as in CALM (``'calm'``). The
  prompt's deep layers are deferred the same way (a lazy prefill).
* Batches use the synchronous policy: the batch goes deeper while any unfinished row is still
  unconfident; a row that was confident at an earlier exit keeps that exit's token (its deeper
  layers then run for real, so its deep KV is exact). Rows finish at their own EOS.
* The prompt prefill is a step like the others (``prefill='early_exit'``, default): its first
  answer token may exit early. ``prefill='full'`` runs the prompt through every layer.
* Exit classifiers score only the position they decide on (the prefill's last one).

Token-for-token, threshold > 1 (`confidence.NEVER_EXIT`) is the full-depth cached greedy decode;
threshold 0 gives exit 0's teacher-forced prediction for every token; under ``'recompute'`` every step
that reaches the final layer gives the full model's logits for its prefix, whatever the earlier steps did.
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
from free_jax import exits_io
from free_jax.inference import confidence as conf_lib
from free_jax.inference import propagation
from free_jax.inference import speculative
from free_jax.models import lm_api
from free_jax.models.layers import layer_at

PyTree = Any
PREFILL_MODES = ('early_exit', 'full')
MODES = ('early_exit', 'speculative')
PROPAGATION_MODES = propagation.MODES


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
    segment_passes: int32[E + 1] passes over each segment's weights (a step's own pass, and the
      catch-up passes of deferred computation: `propagation`); the cost model reads it.

  With mode='speculative' (`speculative`), exit_index is the draft exit for accepted drafts and E for the
  full model's own tokens, step_depth is -1 (there are no per-token steps), num_steps counts the prefill
  and the rounds, and segment_passes the draft steps (segments up to the draft exit) and verifications.
  """

  tokens: jax.Array
  exit_index: jax.Array
  step_depth: jax.Array
  num_steps: jax.Array
  segment_passes: jax.Array
  rounds: jax.Array | None = None    # mode='speculative': int32[] draft-and-verify rounds
  drafted: jax.Array | None = None   # int32[B] drafts each row proposed
  accepted: jax.Array | None = None  # int32[B] drafts each row accepted (acceptance = accepted / drafted)


@flax.struct.dataclass
class _StepState:
  h: jax.Array            # float[B, T, D] current hidden state
  cache: lm_api.KVCache   # backbone, L layers (per-layer form)
  exit_cache: lm_api.KVCache  # one layer per exit
  deferred: propagation.Deferred | None  # None without exits
  token: jax.Array        # int32[B]
  exit_index: jax.Array   # int32[B]
  decided: jax.Array      # bool[B] token chosen (or the row does not need one)
  patience: conf_lib.PatienceState
  depth: jax.Array        # int32[] deepest exit reached


@dataclasses.dataclass(frozen=True)
class _Call:
  """The traced inputs of one decode call that every step reads (a trace-time container)."""

  lm_params: PyTree
  exit_params: tuple       # per exit: {'layers': leaves [1, ...], optionally 'head'}
  exit_constants: tuple    # per exit: `stack.layer_constants` (T5 cross K/V), once per call
  encoder: Any
  patience: jax.Array
  prompt_length: int


def _signature(tree) -> tuple:
  """Structure, shapes and dtypes of a pytree: what an executable is compiled for."""
  leaves, treedef = jax.tree.flatten(tree)
  return _signature_of(treedef, leaves)


def _signature_of(treedef, leaves) -> tuple:
  """`_signature` of a tree already flattened."""
  return (treedef, tuple((tuple(np.shape(x)), np.dtype(x.dtype)) for x in leaves))


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
    propagation: how the K/V of skipped layers are filled in when a later step enters them
      (`propagation`): 'recompute' (default, exact) or 'calm' (projected from the exit state).
    catch_up_window: W, decode slots caught up per pass over a segment's weights.
    mode: 'early_exit' (default) or 'speculative' (`speculative`: exit `draft_exit` drafts up to
      `max_draft` tokens a round, the deeper layers verify them; the tokens equal full greedy).
    draft_exit: the drafting exit (speculative mode).
    max_draft: k, drafts per round (speculative mode).
  """

  stack: Any
  exit_layers: tuple[int, ...]
  max_new_tokens: int
  eos_token_id: int | None
  pad_token_id: int = 0
  confidence: str = 'max_prob'
  prefill: str = 'early_exit'
  propagation: str = 'recompute'
  catch_up_window: int = 8
  mode: str = 'early_exit'
  draft_exit: int = 0
  max_draft: int = 4
  # Per-instance caches (not init fields, so `dataclasses.replace` starts a new decoder with empty ones):
  # compiled executables by input shape; `traces` counts Python traces (tests assert no retrace); the params
  # objects, their leaves and `_signature` by the objects' ids (`_params`); device copies of the scalar
  # thresholds, patience and the default schedule a call passes (`_run`).
  _compiled: dict = dataclasses.field(default_factory=dict, init=False, compare=False, repr=False)
  _counters: dict = dataclasses.field(default_factory=lambda: {'traces': 0}, init=False, compare=False,
                                      repr=False)
  _params_cache: dict = dataclasses.field(default_factory=dict, init=False, compare=False, repr=False)
  _constants: dict = dataclasses.field(default_factory=dict, init=False, compare=False, repr=False)

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
    if isinstance(self.catch_up_window, bool) or not isinstance(self.catch_up_window, int) or (
        self.catch_up_window < 1):
      raise ValueError(f'catch_up_window={self.catch_up_window!r} must be a positive integer')
    if self.mode not in MODES:
      raise ValueError(f'mode={self.mode!r}; expected one of {MODES}')
    if self.mode == 'speculative':
      if not self.exit_layers or not 0 <= self.draft_exit < len(self.exit_layers):
        raise ValueError(f'draft_exit={self.draft_exit} must index one of exit_layers={self.exit_layers}')
      if isinstance(self.max_draft, bool) or not isinstance(self.max_draft, int) or self.max_draft < 1:
        raise ValueError(f'max_draft={self.max_draft!r} must be a positive integer')
      if self.confidence == 'patience':
        raise ValueError("mode='speculative' drafts while the draft exit is confident: confidence='patience' "
                         'has no threshold to stop drafting at')
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

  def check_inputs(self, exit_params: PyTree, prompt_valid, thresholds=None, patience=None, prompt=None) -> None:
    """One-line ValueErrors for inputs the decoder cannot serve; called before compiling."""
    self._check_exits(exit_params)
    self._check_prompt(prompt_valid, prompt)
    if thresholds is not None and self.num_exits:
      conf_lib.validate_thresholds(thresholds, self.num_exits)
    if patience is not None:
      conf_lib.validate_patience(patience)

  def _check_exits(self, exit_params: PyTree) -> None:
    held = exits_lib.num_exits(exit_params) if self.num_exits else 0
    if held != self.num_exits:
      raise ValueError(f'exit_params hold {held} exits but exit_layers={self.exit_layers} has '
                       f'{self.num_exits}')
    trained = exits_lib.placement(exit_params) if self.num_exits else None
    if trained is not None and trained != self.exit_layers:
      raise exits_io.ExitsMismatchError(f'exit_params are the exits after layers {trained}, but this decoder '
                                        f'exits after layers {self.exit_layers}')

  def _check_prompt(self, prompt_valid, prompt) -> None:
    valid = np.asarray(prompt_valid)
    if valid.ndim != 2 or valid.shape[1] == 0:
      raise ValueError(f'empty prompt: prompt_valid must be bool[B, P] with P >= 1, got shape '
                       f'{valid.shape}')
    if valid.shape[0] == 0:
      raise ValueError(f'empty batch: prompt_valid has shape {valid.shape} (0 rows)')
    if prompt is not None:
      if tuple(prompt.shape[:2]) != valid.shape:
        raise ValueError(f'prompt has shape {tuple(prompt.shape)} but prompt_valid {valid.shape}: the first two '
                         'dims must match ([B, P])')
      if isinstance(prompt, np.ndarray) and np.issubdtype(prompt.dtype, np.integer):
        bad = prompt[valid.astype(bool)]
        bad = bad[(bad < 0) | (bad >= self.stack.vocab_size)]
        if bad.size:
          raise ValueError(f'prompt holds token id {int(bad[0])}, outside the vocabulary [0, {self.stack.vocab_size})')
    empty_rows = np.flatnonzero(~valid.astype(bool).any(axis=1))
    if empty_rows.size:
      raise ValueError(f'empty prompt: rows {empty_rows.tolist()} of prompt_valid have no valid token')
    limit = self.stack.max_positions
    if limit is not None and valid.shape[1] + self.max_new_tokens > limit:
      raise ValueError(f'max_new_tokens={self.max_new_tokens} with a prompt of {valid.shape[1]} '
                       f'tokens exceeds the position limit max_position_embeddings={limit}')

  # ----------------------------------------------------------------------------------------------
  # The traced program.

  @property
  def _bounds(self) -> tuple[int, ...]:
    return (0, *self.exit_layers, self.stack.num_layers)

  def _exit_decision(self, i: int, logits: jax.Array, s: _StepState, thresholds: jax.Array,
                     patience: jax.Array, forced: jax.Array) -> _StepState:
    """Exit i's vote on float[B, V] last-position logits; undecided confident rows take it.

    `forced` int32[] >= 0 overrides the confidence: the step stops at exit `forced` (a replayed
    schedule; E = never exit).
    """
    prediction = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    state = s.patience
    if self.confidence == 'patience':
      state, fire = conf_lib.patience_update(state, prediction, patience)
    else:
      fire = conf_lib.get_confidence_fn(self.confidence)(logits) >= thresholds[i]
    fire = jnp.where(forced >= 0, i >= forced, fire) & ~s.decided
    return s.replace(token=jnp.where(fire, prediction, s.token),
                     exit_index=jnp.where(fire, i, s.exit_index), decided=s.decided | fire,
                     patience=state)

  def _run_fn(self, i: int, call: _Call) -> propagation.RunFn:
    """Segment i's backbone layers, then exit i's layer (i < E), on any positions of the caches."""
    start, end = self._bounds[i], self._bounds[i + 1]

    def run(h, caches, ctx, exit_output='all'):
      cache, exit_cache = caches
      h, _, cache = self.stack.run_layers(call.lm_params, h, cache, ctx, start, end)
      exit_out = None
      if i < self.num_exits:
        exit_out, exit_cache = self._exit_layer(i, call, h, cache, exit_cache, ctx, exit_output)
      return h, exit_out, (cache, exit_cache)

    return run

  def _exit_layer(self, i: int, call: _Call, h: jax.Array, cache: lm_api.KVCache, exit_cache: lm_api.KVCache,
                  ctx: PyTree, output: str) -> tuple[jax.Array | None, lm_api.KVCache]:
    """Exit i's layer on h float[B, T, D]: (its output, exit_cache with the T positions' K/V written).

    `output` (static, one of propagation.EXIT_OUTPUTS): 'all' positions; 'last' only (float[B, 1, D]: a
    prompt's decision reads one position, the others need only their K/V, which are the layer's input norm
    and projections of h, `propagate_kv`); 'none' (None: K/V only). On a 26-token prompt a full exit layer
    costs as much as a backbone layer; its K/V alone about a quarter of one.
    """
    params, constants = call.exit_params[i]['layers'], call.exit_constants[i]
    positions = h.shape[1]
    if output == 'all' or (output == 'last' and positions == 1):
      out, _, sub = self.stack.apply_layers(params, h, exit_cache.layers(i, i + 1), ctx, cross_kv=constants)
      return out, exit_cache.with_layers(i, sub)
    sub = self.stack.propagate_kv({'layers': params}, h, exit_cache.layers(i, i + 1), None, 0, 1)
    if output == 'none':
      return None, exit_cache.with_layers(i, sub)
    last = positions - 1  # the layer itself on the last position, attending to the K/V just written
    last_ctx = self._context_fn(call)(cache.at(cache.index + last), 1)
    out, _, sub = self.stack.apply_layers(params, h[:, last:], sub.at(sub.index + last), last_ctx,
                                          cross_kv=constants)
    return out, exit_cache.with_layers(i, sub.at(exit_cache.index))

  def _project_fn(self, i: int, call: _Call) -> propagation.ProjectFn:
    """CALM: segment i's (and exit i's) K/V projected from a hidden state."""
    start, end = self._bounds[i], self._bounds[i + 1]
    exit_stack = {'layers': tuple(layer_at(e['layers'], 0) for e in call.exit_params)}

    def project(h, caches):
      cache, exit_cache = caches
      cache = self.stack.propagate_kv(call.lm_params, h, cache, None, start, end)
      if i < self.num_exits:
        exit_cache = self.stack.propagate_kv(exit_stack, h, exit_cache, None, i, i + 1)
      return cache, exit_cache

    return project

  def _context_fn(self, call: _Call) -> propagation.ContextFn:
    def context(cache, num_queries):
      positions = lm_api.token_positions(cache, num_queries)
      return self.stack.make_context(call.lm_params, cache, positions, call.encoder)
    return context

  def _segment(self, i: int, call: _Call, ctx: PyTree, prefill: bool, thresholds: jax.Array,
               forced: jax.Array, s: _StepState) -> _StepState:
    """Backbone segment i (after catching up what it is missing), then exit i's decision."""
    run = self._run_fn(i, call)
    caches = (s.cache, s.exit_cache)
    if i and s.deferred is not None and not prefill:
      deferred, caches, h, exit_out = propagation.enter(
          i, s.deferred, caches, s.h, ctx, run, self._project_fn(i, call), self._context_fn(call),
          mode=self.propagation, prompt_length=call.prompt_length if self.prefill == 'early_exit' else 0,
          window=self.catch_up_window, has_exit=i < self.num_exits)
    else:
      h, exit_out, caches = run(s.h, caches, ctx, 'last')  # the decision reads the last position only
      deferred = s.deferred
      if deferred is not None:
        deferred = deferred.ran(i, s.cache.index + s.h.shape[1])
    s = s.replace(h=h, cache=caches[0], exit_cache=caches[1], deferred=deferred,
                  depth=jnp.asarray(i, jnp.int32))
    if i == self.num_exits:  # the final head runs in its own conditional (`_segments`)
      return s
    _, logits = exits_lib.exit_logits(self.stack, call.lm_params, call.exit_params[i], exit_out[:, -1:])
    s = self._exit_decision(i, logits[:, 0], s, thresholds, call.patience, forced)
    if s.deferred is not None:  # in case the step stops here
      s = s.replace(deferred=s.deferred.record(s.cache.index, s.h))
    return s

  def _segments(self, call: _Call, ctx: PyTree, prefill: bool, thresholds: jax.Array, forced: jax.Array,
                s: _StepState) -> _StepState:
    """Segment 0, then each deeper segment under its own conditional, run while any row is undecided.

    The conditionals follow each other instead of nesting, and each carries only its segment's layers
    of the caches: XLA copies a buffer that a conditional passes through in one branch and updates in
    another unless the pass-through is branch 0 and the buffer is not threaded through enclosing
    conditionals too (`propagation.branch`).
    """
    s = self._segment(0, call, ctx, prefill, thresholds, forced, s)
    for i in range(1, self.num_exits + 1):
      layers = range(self._bounds[i], self._bounds[i + 1])
      own = lambda xs, keep: tuple(x if j in keep else None for j, x in enumerate(xs))
      exits_kept = {i} if i < self.num_exits else set()
      sub = s.replace(cache=s.cache.replace(k=own(s.cache.k, layers), v=own(s.cache.v, layers)),
                      exit_cache=s.exit_cache.replace(k=own(s.exit_cache.k, exits_kept),
                                                      v=own(s.exit_cache.v, exits_kept)))
      segment = functools.partial(self._segment, i, call, ctx, prefill, thresholds, forced)
      sub = propagation.branch(~jnp.all(s.decided), segment, lambda s: s, sub)
      merge = lambda new, old: tuple(o if n is None else n for n, o in zip(new, old))
      s = sub.replace(cache=sub.cache.replace(k=merge(sub.cache.k, s.cache.k), v=merge(sub.cache.v, s.cache.v)),
                      exit_cache=sub.exit_cache.replace(k=merge(sub.exit_cache.k, s.exit_cache.k),
                                                        v=merge(sub.exit_cache.v, s.exit_cache.v)))
    # The final head answers every row still undecided. Outside the last segment's conditional: with the
    # head inside, XLA copies that segment's caches at every step. (Wrapping the deeper segments in one
    # more conditional, to skip them all with one predicate, brings the copies back as well.)
    return propagation.branch(~jnp.all(s.decided), functools.partial(self._final_head, call), lambda s: s, s)

  def _final_head(self, call: _Call, s: _StepState) -> _StepState:
    features = self.stack.final_features(call.lm_params, s.h[:, -1:])
    final = jnp.argmax(self.stack.logits(call.lm_params, features)[:, 0], axis=-1).astype(jnp.int32)
    return s.replace(token=jnp.where(s.decided, s.token, final),
                     exit_index=jnp.where(s.decided, s.exit_index, self.num_exits),
                     decided=jnp.ones_like(s.decided))

  def _step(self, call: _Call, cache, exit_cache, deferred, token_valid, active, thresholds, forced,
            prefill: bool, input_ids=None, inputs_embeds=None):
    """One step (prefill or one token): (token, exit_index, depth, cache, exit_cache, deferred)."""
    h, cache, ctx = lm_api.begin_step(self.stack, call.lm_params, cache, token_valid, input_ids=input_ids,
                                      inputs_embeds=inputs_embeds, encoder=call.encoder)
    exit_cache = exit_cache.mark_valid(token_valid)
    batch = token_valid.shape[0]
    s = _StepState(h=h, cache=cache, exit_cache=exit_cache, deferred=deferred,
                   token=jnp.zeros(batch, jnp.int32), exit_index=jnp.full(batch, self.num_exits, jnp.int32),
                   decided=~active, patience=conf_lib.PatienceState.init((batch,)),
                   depth=jnp.asarray(-1, jnp.int32))
    s = self._segments(call, ctx, prefill, thresholds, forced, s)
    steps = token_valid.shape[1]
    return (s.token, s.exit_index, s.depth, s.cache.advance(steps), s.exit_cache.advance(steps), s.deferred)

  def _decode(self, lm_params, exit_params, thresholds, patience, schedule, prompt, prompt_valid, encoder,
              with_cache: bool = False):
    self._counters['traces'] += 1
    lm_params, exit_params = self.prepare(lm_params, exit_params)  # no-op on prepared params
    chex.assert_shape(thresholds, (self.num_exits,))
    if hasattr(encoder, 'unstacked'):  # T5: per-layer cross K/V, read in place
      encoder = encoder.unstacked()
    exit_params = exit_params if self.num_exits else ()
    call = _Call(lm_params=lm_params, exit_params=exit_params,
                 exit_constants=tuple(self.stack.layer_constants(e['layers'], encoder) for e in exit_params),
                 encoder=encoder, patience=patience, prompt_length=prompt_valid.shape[1])
    if self.mode == 'speculative':
      out = self._decode_speculative(call, thresholds, prompt, prompt_valid)
      return (out, None) if with_cache else out
    batch, prompt_length = prompt_valid.shape
    n = self.max_new_tokens
    # Catch-up windows may write up to W slots past the current one (`propagation`): spare slots.
    length = prompt_length + n + (self.catch_up_window if self.num_exits else 0)
    cache = self.stack.init_cache(batch, length, per_layer=True)
    exit_cache = lm_api.KVCache.zeros(self.num_exits, batch, length, self.stack.num_heads,
                                      self.stack.head_dim, cache.dtype, per_layer=True)
    deferred = (propagation.Deferred.empty(batch, length, self.stack.hidden_size, self.num_exits + 1, cache.dtype)
                if self.num_exits else None)
    prompt_key = 'input_ids' if jnp.issubdtype(prompt.dtype, jnp.integer) else 'inputs_embeds'
    prefill_thresholds = (thresholds if self.prefill == 'early_exit'
                          else jnp.full_like(thresholds, conf_lib.NEVER_EXIT))
    prefill_call = call if self.prefill == 'early_exit' else dataclasses.replace(
        call, patience=jnp.asarray(n + 10**6))
    prefill_forced = schedule[0] if self.prefill == 'early_exit' else jnp.asarray(-1, jnp.int32)
    token, exit_index, depth, cache, exit_cache, deferred = self._step(
        prefill_call, cache, exit_cache, deferred, prompt_valid.astype(bool), jnp.ones(batch, bool),
        prefill_thresholds, prefill_forced, True, **{prompt_key: prompt})
    tokens = jnp.full((batch, n), self.pad_token_id, jnp.int32).at[:, 0].set(token)
    exit_indices = jnp.full((batch, n), -1, jnp.int32).at[:, 0].set(exit_index)
    depths = jnp.full((n,), -1, jnp.int32).at[0].set(depth)
    finished = self._is_eos(token)

    def keep_going(carry):
      t, finished = carry[0], carry[-1]
      return (t < n) & ~jnp.all(finished)

    def body(carry):
      t, tokens, exit_indices, depths, cache, exit_cache, deferred, finished = carry
      previous = jax.lax.dynamic_slice_in_dim(tokens, t - 1, 1, axis=1)
      active = ~finished
      token, exit_index, depth, cache, exit_cache, deferred = self._step(
          call, cache, exit_cache, deferred, jnp.ones((batch, 1), bool), active, thresholds, schedule[t],
          False, input_ids=previous)
      token = jnp.where(active, token, self.pad_token_id)
      exit_index = jnp.where(active, exit_index, -1)
      tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], t, axis=1)
      exit_indices = jax.lax.dynamic_update_slice_in_dim(exit_indices, exit_index[:, None], t, axis=1)
      depths = jax.lax.dynamic_update_slice_in_dim(depths, depth[None], t, axis=0)
      return (t + 1, tokens, exit_indices, depths, cache, exit_cache, deferred, finished | self._is_eos(token))

    carry = (jnp.asarray(1, jnp.int32), tokens, exit_indices, depths, cache, exit_cache, deferred, finished)
    t, tokens, exit_indices, depths, cache, _, deferred, _ = jax.lax.while_loop(keep_going, body, carry)
    passes = deferred.passes if deferred is not None else t[None]
    out = DecodeOutput(tokens=tokens, exit_index=exit_indices, step_depth=depths, num_steps=t,
                       segment_passes=passes)
    return (out, cache) if with_cache else out

  def _decode_speculative(self, call: _Call, thresholds, prompt, prompt_valid) -> DecodeOutput:
    tokens, exit_index, rounds, drafted, accepted, draft_steps = speculative.decode(
        self, call.lm_params, call.exit_params, call.exit_constants, call.encoder, thresholds, prompt,
        prompt_valid)
    passes = jnp.where(jnp.arange(self.num_exits + 1) <= self.draft_exit, draft_steps + 1, rounds + 1)
    return DecodeOutput(tokens=tokens, exit_index=exit_index, step_depth=jnp.full((self.max_new_tokens,), -1, jnp.int32),
                        num_steps=rounds + 1, segment_passes=passes.astype(jnp.int32), rounds=rounds,
                        drafted=drafted, accepted=accepted)

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
    exit_params = exits_lib.unstack_exits(exit_params) if self.num_exits else exit_params
    # On the device once: host (numpy) leaves, e.g. exits read from safetensors, would be copied to the
    # device at every call (on CPU ~10 us per leaf, more than a decode step of a small LM).
    return jax.device_put((lm_params, exit_params))

  def compile(self, lm_params: PyTree, exit_params: PyTree, prompt: jax.Array,
              prompt_valid: jax.Array, encoder: Any = None, with_cache: bool = False) -> tuple[Any, float]:
    """The compiled executable for these input shapes (cached) and its compile time in seconds.

    Args:
      lm_params, exit_params: backbone LM and exit parameters (`free_jax.exits`), best in the
        decoding form of `prepare`.
      prompt: int[B, P] token ids, or float[B, P, E] input embeddings (BLIP-2 OPT: the image
        prefix in place, `Blip2Model.prompt_embeddings`; T5: the decoder start token ids).
      prompt_valid: bool[B, P] real tokens (left padding).
      encoder: the family's encoder state (T5: `T5Encoded`), else None.
      with_cache: the executable also returns the backbone's final KV cache (`decode_with_cache`).

    The executable takes the params as their flat tuple of leaves (`_params`), then the traced arguments.
    """
    self.check_inputs(exit_params, prompt_valid, prompt=prompt)
    return self._executable(self._params(lm_params, exit_params), prompt, prompt_valid, encoder, with_cache)

  def _params(self, lm_params: PyTree, exit_params: PyTree) -> _Params:
    """The params pair's checked exits, signature and flat leaves, made once per pair of objects.

    On a small LM the host side of a call rivals its decode: walking ~200 nested leaves for a cache key,
    checking the exits' placement and flattening the dicts again at dispatch cost more than the layers an
    early exit skips. The cache holds the objects it describes, so an id is never reused for another tree
    while its entry exists.
    """
    key = (id(lm_params), id(exit_params))
    entry = self._params_cache.get(key)
    if entry is None or entry.lm_params is not lm_params or entry.exit_params is not exit_params:
      self._check_exits(exit_params)
      if len(self._params_cache) >= 8:
        self._params_cache.clear()
      leaves, treedef = jax.tree.flatten((lm_params, exit_params))
      entry = self._params_cache[key] = _Params(lm_params, exit_params, treedef, tuple(leaves),
                                                _signature_of(treedef, leaves))
    return entry

  def _executable(self, params: '_Params', prompt, prompt_valid, encoder, with_cache):
    if encoder is None and all(hasattr(x, 'shape') and hasattr(x, 'dtype') for x in (prompt, prompt_valid)):
      inputs = (tuple(prompt.shape), np.dtype(prompt.dtype), tuple(prompt_valid.shape), np.dtype(prompt_valid.dtype))
    else:  # a tree walk costs ~30 us a call: only for T5's encoder state or non-array inputs
      inputs = _signature((prompt, prompt_valid, encoder))
    key = (params.signature, inputs, with_cache)
    if key not in self._compiled:
      treedef = params.treedef

      def decode(leaves, *args):
        lm_params, exit_params = jax.tree.unflatten(treedef, leaves)
        return self._decode(lm_params, exit_params, *args, with_cache=with_cache)

      args = (params.leaves, jax.ShapeDtypeStruct((self.num_exits,), jnp.float32),
              jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((self.max_new_tokens,), jnp.int32),
              prompt, prompt_valid, encoder)
      start = time.perf_counter()
      compiled = jax.jit(decode).lower(*args).compile()
      self._compiled[key] = (compiled, time.perf_counter() - start)
    return self._compiled[key]

  def __call__(self, lm_params: PyTree, exit_params: PyTree, prompt: jax.Array,
               prompt_valid: jax.Array, thresholds=conf_lib.NEVER_EXIT, encoder: Any = None,
               patience: int = 1, depth_schedule=None) -> DecodeOutput:
    """Decodes `max_new_tokens` greedily with early exits (asynchronous: returns device arrays).

    Args:
      thresholds: one threshold for every exit or one per exit, in [0, 1]; > 1 never exits.
      patience: k consecutive agreeing exits (only for confidence='patience').
      depth_schedule: optional int[N], the exit each step stops at (E: the final layer; -1: decide by
        confidence), e.g. to replay a trained run's decisions on another model shape.
      Others: see `compile`.
    """
    return self._run(lm_params, exit_params, prompt, prompt_valid, thresholds, encoder, patience,
                     depth_schedule, with_cache=False)

  def decode_with_cache(self, lm_params: PyTree, exit_params: PyTree, prompt: jax.Array, prompt_valid: jax.Array,
                        thresholds=conf_lib.NEVER_EXIT, encoder: Any = None, patience: int = 1,
                        depth_schedule=None) -> tuple[DecodeOutput, lm_api.KVCache]:
    """`__call__` that also returns the backbone's final KV cache (per-layer form, P + N + W slots), e.g. to
    check that deferred computation wrote exactly what a full-depth run writes."""
    return self._run(lm_params, exit_params, prompt, prompt_valid, thresholds, encoder, patience,
                     depth_schedule, with_cache=True)

  def _run(self, lm_params, exit_params, prompt, prompt_valid, thresholds, encoder, patience, depth_schedule,
           with_cache):
    params = self._params(lm_params, exit_params)  # the exits are checked once per params object
    self._check_prompt(prompt_valid, prompt)
    thresholds = self._constant('thresholds', thresholds, lambda t: conf_lib.validate_thresholds(t, self.num_exits)
                                if self.num_exits else np.zeros(0, np.float32))
    patience = self._constant('patience', patience, lambda k: np.int32(conf_lib.validate_patience(k)))
    if depth_schedule is None:
      schedule = self._constant('schedule', None, lambda _: np.full(self.max_new_tokens, -1, np.int32))
    else:
      given = np.asarray(depth_schedule)
      if given.shape != (self.max_new_tokens,) or given.min() < -1 or given.max() > self.num_exits:
        raise ValueError(f'depth_schedule must be int[{self.max_new_tokens}] in [-1, {self.num_exits}], got '
                         f'shape {given.shape}, values {given.min()}..{given.max()}')
      schedule = given.astype(np.int32)
    compiled, _ = self._executable(params, prompt, prompt_valid, encoder, with_cache)
    return compiled(params.leaves, thresholds, patience, schedule, prompt, prompt_valid, encoder)

  def _constant(self, name: str, value, make):
    """`make(value)` (a checked host array) for a call; for a scalar or None on the device, made once per value
    (the evaluator passes the same threshold to hundreds of calls: each host array is a transfer per call)."""
    if not (value is None or isinstance(value, (int, float, np.number))):
      return make(value)
    key = (name, type(value), value)  # 1, 1.0 and True are one dict key, but not one input
    if key not in self._constants:
      if len(self._constants) >= 64:  # a sweep over many values keeps only the latest
        self._constants.clear()
      self._constants[key] = jax.device_put(make(value))
    return self._constants[key]


@dataclasses.dataclass(frozen=True)
class _Params:
  """A params pair as `EarlyExitDecoder._params` caches it: the objects, their structure, leaves and signature."""

  lm_params: PyTree
  exit_params: PyTree
  treedef: Any
  leaves: tuple
  signature: tuple
