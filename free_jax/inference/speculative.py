"""Lossless self-speculative decoding: an exit drafts tokens, the deeper layers verify them in one pass.

The traced program of `EarlyExitDecoder(..., mode='speculative', draft_exit=i, max_draft=k)`. After a
full-depth prefill, each round (one `lax.while_loop` iteration, no host round trip):

1. Draft: the last accepted token x_0 and then each draft x_j = d_{j-1} run through backbone layers
   [0, l_i) and exit i's layer, which proposes d_j. A row keeps drafting while exit i's confidence
   reaches thresholds[i] (traced: sweeping it never recompiles), at most k drafts; the loop stops
   when no row drafts. Layers [0, l_i) and exit i write their K/V as they go: those are exact.
2. Verify: layers [l_i, L) run on the round's k + 1 slots at once, from the hidden states after layer
   l_i kept per slot, and the final head scores every slot: y_j is the full model's next token after
   x_0..x_j. Row r accepts the longest prefix with d_j == y_j (a_r of its drafts) and emits y_0..y_{a_r}:
   the accepted drafts plus the full model's own next token. So the tokens are exactly full greedy.
3. Every row's cache advances by k + 1 slots per round; a row's rejected slots are marked invalid, so no
   later query sees them (positions count valid slots only, so they leave no gap in the positions).

Rows accept different counts and keep their own output position; rows finish at their own EOS. The
cache holds P + (N - 1) (k + 1) + 1 slots (a round emits at least one token).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from free_jax import exits as exits_lib
from free_jax.inference import confidence as conf_lib
from free_jax.models import lm_api

PyTree = Any


def cache_length(prompt_length: int, max_new_tokens: int, max_draft: int) -> int:
  return prompt_length + (max_new_tokens - 1) * (max_draft + 1) + 1


def decode(decoder, lm_params: PyTree, exit_params: tuple, exit_constants: tuple, encoder: Any,
           thresholds: jax.Array, prompt: jax.Array, prompt_valid: jax.Array):
  """Speculative decode (module docstring): (tokens, exit_index, rounds, drafted, accepted, passes).

  `decoder` is the `EarlyExitDecoder` (its stack, exits, draft_exit, max_draft, eos and confidence);
  params in the decoding form.
  """
  stack, i, k = decoder.stack, decoder.draft_exit, decoder.max_draft
  draft_layer, num_layers, n = decoder.exit_layers[i], stack.num_layers, decoder.max_new_tokens
  one_exit, constants = exit_params[i], exit_constants[i]
  batch, prompt_length = prompt_valid.shape
  length = cache_length(prompt_length, n, k)
  cache = stack.init_cache(batch, length, per_layer=True)
  exit_cache = lm_api.KVCache.zeros(1, batch, length, stack.num_heads, stack.head_dim, cache.dtype, per_layer=True)
  hidden = jnp.zeros((batch, length, stack.hidden_size), cache.dtype)  # state after layer l_i, per slot
  confidence = conf_lib.get_confidence_fn(decoder.confidence)

  def shallow(h, cache, exit_cache, ctx):
    """Layers [0, l_i) then exit i's layer on h at the caches' write index: (h after l_i, exit logits)."""
    h, _, cache = stack.run_layers(lm_params, h, cache, ctx, 0, draft_layer)
    out, _, exit_cache = stack.apply_layers(one_exit['layers'], h, exit_cache, ctx, cross_kv=constants)
    return h, out, cache, exit_cache

  def head(h):
    return stack.logits(lm_params, stack.final_features(lm_params, h))

  # Prefill at full depth: the first token is the full model's.
  prompt_key = 'input_ids' if jnp.issubdtype(prompt.dtype, jnp.integer) else 'inputs_embeds'
  h, cache, ctx = lm_api.begin_step(stack, lm_params, cache, prompt_valid.astype(bool), encoder=encoder,
                                    **{prompt_key: prompt})
  exit_cache = exit_cache.mark_valid(prompt_valid)
  h, _, cache = stack.run_layers(lm_params, h, cache, ctx, 0, draft_layer)
  # The exit layer's output is not read here: its K/V alone (`EarlyExitDecoder._exit_layer`).
  exit_cache = stack.propagate_kv({'layers': one_exit['layers']}, h, exit_cache, None, 0, 1)
  h, _, cache = stack.run_layers(lm_params, h, cache, ctx, draft_layer, num_layers)
  first = jnp.argmax(head(h[:, -1:])[:, 0], -1).astype(jnp.int32)
  cache, exit_cache = cache.advance(prompt_length), exit_cache.advance(prompt_length)

  tokens = jnp.full((batch, n), decoder.pad_token_id, jnp.int32).at[:, 0].set(first)
  exit_index = jnp.full((batch, n), -1, jnp.int32).at[:, 0].set(decoder.num_exits)
  emitted = jnp.ones(batch, jnp.int32)
  finished = decoder._is_eos(first) | (n == 1)
  stats = (jnp.zeros((), jnp.int32), jnp.zeros(batch, jnp.int32), jnp.zeros(batch, jnp.int32),
           jnp.zeros((), jnp.int32))  # rounds, drafted, accepted, draft steps

  def draft(carry):
    """One draft step: feeds x_j at slot start + j, proposes d_j."""
    j, cache, exit_cache, hidden, x, drafts, drafting, proposed = carry
    h, cache, ctx = lm_api.begin_step(stack, lm_params, cache, jnp.ones((batch, 1), bool), input_ids=x[:, None],
                                      encoder=encoder)
    exit_cache = exit_cache.mark_valid(jnp.ones((batch, 1), bool))
    h, out, cache, exit_cache = shallow(h, cache, exit_cache, ctx)
    hidden = jax.lax.dynamic_update_slice_in_dim(hidden, h, cache.index, axis=1)
    _, logits = exits_lib.exit_logits(stack, lm_params, one_exit, out)
    d = jnp.argmax(logits[:, 0], -1).astype(jnp.int32)
    drafting = drafting & (confidence(logits[:, 0]) >= thresholds[i]) & (j < k)
    proposed = proposed + drafting.astype(jnp.int32)
    drafts = jax.lax.dynamic_update_slice_in_dim(drafts, d[:, None], j, axis=1)
    return j + 1, cache.advance(1), exit_cache.advance(1), hidden, d, drafts, drafting, proposed

  def round_(carry):
    cache, exit_cache, hidden, last, tokens, exit_index, emitted, finished, stats = carry
    start = cache.index
    drafts = jnp.zeros((batch, k + 1), jnp.int32)
    init = (jnp.asarray(0, jnp.int32), cache, exit_cache, hidden, last, drafts, ~finished,
            jnp.zeros(batch, jnp.int32))
    # Feed x_0, then x_1 = d_0, ... while some row still drafts (at most k drafts, k + 1 slots).
    steps, cache, exit_cache, hidden, _, drafts, _, proposed = jax.lax.while_loop(
        lambda c: (c[0] == 0) | jnp.any(c[6]), draft, init)
    # Verify the round's k + 1 slots through layers [l_i, L) in one pass; score every slot.
    at = cache.at(start)
    ctx = stack.make_context(lm_params, at, lm_api.token_positions(at, k + 1), encoder)
    h = jax.lax.dynamic_slice_in_dim(hidden, start, k + 1, axis=1)
    h, _, verified = stack.run_layers(lm_params, h, at, ctx, draft_layer, num_layers)
    full = jnp.argmax(head(h), -1).astype(jnp.int32)  # [B, k + 1]
    slot = jnp.arange(k + 1)
    agree = (drafts[:, :k] == full[:, :k]) & (slot[None, :k] < proposed[:, None])
    accepted = jnp.sum(jnp.cumprod(agree.astype(jnp.int32), axis=1), axis=1)  # a_r
    keep = slot[None, :] <= accepted[:, None]  # slots x_0..x_{a_r} stay valid; y_0..y_{a_r} are emitted
    valid = jax.lax.dynamic_update_slice_in_dim(
        cache.valid, keep & jax.lax.dynamic_slice_in_dim(cache.valid, start, k + 1, axis=1), start, axis=1)
    cache = verified.replace(valid=valid, index=start + k + 1)
    exit_cache = exit_cache.replace(valid=valid, index=start + k + 1)
    # Emit y_0..y_{a_r} at each row's own position, up to N tokens and through its first EOS.
    eos = decoder._is_eos(full) & keep
    before_eos = jnp.cumsum(eos, axis=1) - eos == 0
    emit = keep & before_eos & ~finished[:, None]
    position = emitted[:, None] + slot[None, :]
    target = jnp.where(emit & (position < n), position, n)  # n: dropped
    rows = jnp.arange(batch)[:, None]
    tokens = tokens.at[rows, target].set(full, mode='drop')
    exit_index = exit_index.at[rows, target].set(
        jnp.where(slot[None, :] < accepted[:, None], i, decoder.num_exits), mode='drop')
    emitted = emitted + jnp.sum(emit, axis=1)
    finished = finished | jnp.any(eos & emit, axis=1) | (emitted >= n)
    live = ~carry[7]
    rounds, drafted, accepted_total, draft_steps = stats
    stats = (rounds + 1, drafted + jnp.where(live, proposed, 0), accepted_total + jnp.where(live, accepted, 0),
             draft_steps + steps)
    last = full[jnp.arange(batch), accepted]
    return cache, exit_cache, hidden, last, tokens, exit_index, emitted, finished, stats

  carry = (cache, exit_cache, hidden, first, tokens, exit_index, emitted, finished, stats)
  carry = jax.lax.while_loop(lambda c: ~jnp.all(c[7]), round_, carry)
  _, _, _, _, tokens, exit_index, emitted, _, (rounds, drafted, accepted, draft_steps) = carry
  return tokens, exit_index, rounds, drafted, accepted, draft_steps
