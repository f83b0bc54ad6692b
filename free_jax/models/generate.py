"""Greedy decoding for BLIP-2: prefill, extend by one token, and one compiled `lax.while_loop`.

The split is PaliGemma-style so the early-exit engine can reuse it:

* `prefill`: image queries + prompt (left-padded batch; T5: encoder once, then the decoder start
  token) into a fresh KV cache with room for ``max_new_tokens`` more tokens;
* `lm_step`: runs all LM layers on a step's tokens and advances the cache;
* `extend`: one new token per row -> next-token logits.

`generate` = prefill + a `lax.while_loop` over a `DecodeState` with per-row EOS, all in one jit.
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp

from free_jax.models import lm_api
from free_jax.models.lm_api import PyTree
from free_jax.models.blip2 import Blip2Model
from free_jax.models.opt import OPTConfig



def lm_step(stack: lm_api.DecoderStack, lm_params: PyTree, cache: lm_api.KVCache,
            token_valid: jax.Array, input_ids: jax.Array | None = None,
            inputs_embeds: jax.Array | None = None,
            encoder: Any = None) -> tuple[jax.Array, lm_api.KVCache]:
  """All LM layers on T new tokens: (features float[B, T, E] (`final_features`), advanced cache)."""
  h, cache, ctx = lm_api.begin_step(stack, lm_params, cache, token_valid, input_ids=input_ids,
                                    inputs_embeds=inputs_embeds, encoder=encoder)
  h, _, cache = stack.run_layers(lm_params, h, cache, ctx, 0, stack.num_layers)
  return stack.final_features(lm_params, h), cache.advance(token_valid.shape[1])


def prefill(model: Blip2Model, params: PyTree, pixel_values: jax.Array, input_ids: jax.Array,
            attention_mask: jax.Array,
            max_new_tokens: int) -> tuple[jax.Array, lm_api.KVCache, Any]:
  """Runs the prompt and returns the first next-token logits.

  Args:
    model: the BLIP-2 module.
    params: its params.
    pixel_values: float[B, H, W, 3].
    input_ids: int[B, T] prompt with the image tokens, left-padded.
    attention_mask: int/bool[B, T].
    max_new_tokens: N, the cache room left for generated tokens.

  Returns:
    (logits float32[B, V] for the first new token, cache (length T + N for OPT, 1 + N for the T5
    decoder) advanced past the prompt, encoder state (`T5Encoded`; None for OPT)).
  """
  chex.assert_equal_shape([input_ids, attention_mask])
  stack, lm_params = model.lm_stack(), params['language_model']
  batch, length = input_ids.shape
  variables = {'params': params}
  if model.config.is_encoder_decoder:
    encoder = model.apply(variables, pixel_values, input_ids, attention_mask, method=Blip2Model.encode)
    start = jnp.full((batch, 1), model.config.text.decoder_start_token_id, jnp.int32)
    features, cache = lm_step(stack, lm_params, stack.init_cache(batch, 1 + max_new_tokens),
                              jnp.ones((batch, 1), bool), input_ids=start, encoder=encoder)
  else:
    text = model.config.text
    if isinstance(text, OPTConfig) and length + max_new_tokens > text.max_position_embeddings:
      raise ValueError(f'prompt length {length} + max_new_tokens {max_new_tokens} exceeds '
                       f'max_position_embeddings={text.max_position_embeddings}')
    encoder = None
    embeds = model.apply(variables, pixel_values, input_ids, method=Blip2Model.prompt_embeddings)
    features, cache = lm_step(stack, lm_params, stack.init_cache(batch, length + max_new_tokens),
                              attention_mask.astype(bool), inputs_embeds=embeds)
  return stack.logits(lm_params, features[:, -1:])[:, 0], cache, encoder


def extend(stack: lm_api.DecoderStack, lm_params: PyTree, token: jax.Array, cache: lm_api.KVCache,
           encoder: Any = None) -> tuple[jax.Array, lm_api.KVCache]:
  """One new token int[B] per row -> (next-token logits float32[B, V], advanced cache)."""
  chex.assert_rank(token, 1)
  features, cache = lm_step(stack, lm_params, cache, jnp.ones((token.shape[0], 1), bool),
                            input_ids=token[:, None], encoder=encoder)
  return stack.logits(lm_params, features)[:, 0], cache


@flax.struct.dataclass
class DecodeState:
  """The `lax.while_loop` carry of greedy decoding.

  Attributes:
    tokens: int32[B, N] generated tokens; pad after a row's EOS and beyond `step`.
    cache: KV cache holding the prompt and tokens[:, :step - 1] (the last one is fed next).
    step: int32[] number of tokens emitted so far.
    done: bool[B] rows that emitted EOS.
    encoder: the encoder state (`T5Encoded`), None for OPT.
  """

  tokens: jax.Array
  cache: lm_api.KVCache
  step: jax.Array
  done: jax.Array
  encoder: Any = None


def generate(model: Blip2Model, params: PyTree, pixel_values: jax.Array, input_ids: jax.Array,
             attention_mask: jax.Array, max_new_tokens: int,
             eos_token_id: int | None = None) -> jax.Array:
  """Greedy decoding, as HF ``generate(do_sample=False, num_beams=1)``; one compiled program.

  Args:
    model: the BLIP-2 module.
    params: its params.
    pixel_values: float[B, H, W, 3].
    input_ids: int[B, T] prompt with image tokens, left-padded.
    attention_mask: int/bool[B, T].
    max_new_tokens: N (a new N compiles a new program).
    eos_token_id: a row stops after emitting it (a traced value: changing it does not recompile);
      None never stops early. Pass ``model.config.text.eos_token_id`` for HF's default.

  Returns:
    int32[B, N] new tokens (without the prompt or T5's start token); ``pad_token_id`` after a row's
    EOS, as HF pads finished rows. The loop exits once every row is done.
  """
  eos = jnp.asarray(-1 if eos_token_id is None else eos_token_id, jnp.int32)  # -1 matches no token
  return _greedy(model, params, pixel_values, input_ids, attention_mask, max_new_tokens, eos)


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens'))
def _greedy(model, params, pixel_values, input_ids, attention_mask, max_new_tokens, eos):
  stack, lm_params = model.lm_stack(), params['language_model']
  pad = model.config.text.pad_token_id or 0  # HF pads with 0 when the config has no pad id
  logits, cache, encoder = prefill(model, params, pixel_values, input_ids, attention_mask,
                                   max_new_tokens)
  first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  tokens = jnp.full((first.shape[0], max_new_tokens), pad, jnp.int32).at[:, 0].set(first)

  def cond(s: DecodeState):
    return (s.step < max_new_tokens) & ~jnp.all(s.done)

  def body(s: DecodeState) -> DecodeState:
    logits, cache = extend(stack, lm_params, s.tokens[:, s.step - 1], s.cache, s.encoder)
    token = jnp.where(s.done, pad, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    return DecodeState(tokens=s.tokens.at[:, s.step].set(token), cache=cache, step=s.step + 1,
                       done=s.done | (token == eos), encoder=s.encoder)

  init = DecodeState(tokens=tokens, cache=cache, step=jnp.ones((), jnp.int32), done=first == eos,
                     encoder=encoder)
  return jax.lax.while_loop(cond, body, init).tokens
