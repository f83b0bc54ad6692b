"""Early exits of FREE: exit placement, exit transformers and exit classifiers over a `DecoderStack`.

Exit placement
--------------
An exit at layer ``l`` (``exits.layers``, 1 <= l < L, strictly increasing) reads the output of LM layer
``l``, i.e. the hidden state after running backbone layers [0, l) — ``hiddens[l - 1]`` of
``stack.run_layers(..., 0, L)``. Training and inference use this same index (the official code is off
by one between the two).

Exit parameters
---------------
``exit_params = {'layers': <one stacked LM layer per exit: every leaf [E, 1, ...]>,
                 'head': {'kernel': float[E, F, V]},   ('head' only with a separate classifier)
                 'placement': Placement(layers)}``     (a static node: no arrays)

* Placement: the layers the exits read, inside the tree as a static pytree node (`Placement`). It has no
  leaves, so optimizers, jit, checkpoints and safetensors never see it, but it travels with the params, so the
  decoder refuses exits made for other layers (`placement`). Trees built without it are accepted unchecked.

* Exit transformer: one layer of the backbone's own type, run with ``stack.apply_layers`` (n = 1) on a
  fresh one-layer KV cache — causal self-attention (and, for T5, cross-attention to the encoder with
  the exit layer's own projections). Initialised from backbone layer ``l`` (``init='next_layer'``: the
  layer that would run next) or at random by the stack's own initialiser (``init='random'``). Exit
  params are float32 master weights even for a bfloat16 backbone (layers cast them when applied).
* Exit classifier: the backbone's frozen ``final_features`` and ``logits``. With ``separate_head`` each
  exit adds a trainable ``features @ kernel`` to the frozen logits; the kernel starts at zero, so a
  separate head starts as a copy of the frozen one and is trained from there.

Every function here is pure; the frozen backbone params are an argument, never a trainable input.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp

from free_jax.models import lm_api

PyTree = Any
EXIT_INITS = ('next_layer', 'random')


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Placement:
  """The LM layers a tree of exit params reads (`exits.layers`): a static pytree node (module docstring)."""

  layers: tuple[int, ...]


def placement(exit_params: PyTree) -> tuple[int, ...] | None:
  """The layers `exit_params` (stacked, or the tuple of `unstack_exits`) were made for; None if not recorded."""
  if isinstance(exit_params, tuple):
    found = [placement(one) for one in exit_params]
    return None if not found or None in found else tuple(layer for one in found for layer in one)
  recorded = exit_params.get('placement') if isinstance(exit_params, dict) else None
  return recorded.layers if isinstance(recorded, Placement) else None


def with_placement(exit_params: PyTree, layers: Sequence[int]) -> PyTree:
  """`exit_params` (stacked) recording that they are the exits after `layers`."""
  return {**exit_params, 'placement': Placement(tuple(int(l) for l in layers))}


def validate_layers(layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
  """`exits.layers` as a tuple of ints; a one-line error naming the field and the backbone depth."""
  layers = tuple(layers)
  if not layers:
    raise ValueError(f'exits.layers is empty; give at least one layer in [1, {num_layers - 1}]')
  if not all(isinstance(l, int) and not isinstance(l, bool) for l in layers):
    raise ValueError(f'exits.layers={layers} must be integers')
  if any(not 1 <= l < num_layers for l in layers):
    raise ValueError(f'exits.layers={layers}: every exit layer must be in [1, {num_layers - 1}] for a '
                     f'backbone with {num_layers} LM layers')
  if any(b <= a for a, b in zip(layers, layers[1:])):
    raise ValueError(f'exits.layers={layers} must be strictly increasing')
  return layers


def init_exit_params(stack: lm_api.DecoderStack, lm_params: PyTree, layers: Sequence[int], *,
                     init: str = 'next_layer', separate_head: bool = False,
                     rng: jax.Array | None = None) -> PyTree:
  """Exit parameters (tree in the module docstring) for exits after `layers`.

  Args:
    stack: the backbone's LM stack.
    lm_params: the frozen LM params (its 'layers' leaves have a leading axis L).
    layers: exit placement, validated with `validate_layers`.
    init: one of EXIT_INITS.
    separate_head: add a trainable per-exit classifier (zero-initialised, see module docstring).
    rng: needed for init='random'.
  """
  layers = validate_layers(layers, stack.num_layers)
  if init == 'next_layer':
    source = lm_params['layers']
  elif init == 'random':
    if rng is None:
      raise ValueError("exits.init='random' needs an rng")
    # Under jit XLA drops the parts of the random tree that are not returned (embeddings, head).
    source = jax.jit(lambda r: stack.init(r)['layers'])(rng)
  else:
    raise ValueError(f'exits.init={init!r}; expected one of {EXIT_INITS}')
  index = jnp.asarray(layers)
  # Fresh arrays (gathered), so training the exits never aliases or donates the backbone's buffers.
  params = {'layers': jax.tree.map(lambda x: x[index][:, None].astype(jnp.float32), source)}
  if separate_head:
    features = jax.eval_shape(lambda p: stack.final_features(
        p, jnp.zeros((1, 1, stack.hidden_size), jnp.float32)), lm_params)
    vocab = jax.eval_shape(lambda p, f: stack.logits(p, f), lm_params, features).shape[-1]
    params['head'] = {'kernel': jnp.zeros((len(layers), features.shape[-1], vocab), jnp.float32)}
  return with_placement(params, layers)


def num_exits(exit_params: PyTree) -> int:
  """E, the number of exits in an exit-parameter tree (or tuple from `unstack_exits`)."""
  if isinstance(exit_params, tuple):
    return len(exit_params)
  return jax.tree.leaves(exit_params['layers'])[0].shape[0]


def exit_slice(exit_params: PyTree, e: int) -> PyTree:
  """The params of exit e alone (leading exit axis removed; the layer keeps its axis of 1)."""
  if isinstance(exit_params, tuple):
    return exit_params[e]
  one = jax.tree.map(lambda x: x[e], exit_params)
  layers = placement(exit_params)
  return one if layers is None else with_placement(one, layers[e:e + 1])


def unstack_exits(exit_params: PyTree) -> tuple:
  """A tuple of E `exit_slice`s: the decoding form, read in place (see `lm_api.unstack_layers`)."""
  if isinstance(exit_params, tuple):
    return exit_params
  return tuple(exit_slice(exit_params, e) for e in range(num_exits(exit_params)))


def exit_logits(stack: lm_api.DecoderStack, lm_params: PyTree, one_exit: PyTree,
                out: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Exit classifier on exit-transformer outputs float[B, T, D]: (features float[B, T, F], logits float[B, T, V]).

  Decoding calls it on the one position it scores: the head is the largest matmul of a small model.
  """
  features = stack.final_features(lm_params, out)
  logits = stack.logits(lm_params, features)
  if 'head' in one_exit:
    logits = logits + (features.astype(jnp.float32) @ one_exit['head']['kernel']).astype(logits.dtype)
  return features, logits


def apply_exit(stack: lm_api.DecoderStack, lm_params: PyTree, one_exit: PyTree, h: jax.Array,
               cache: lm_api.KVCache, ctx: PyTree, cross_kv: Any = None
               ) -> tuple[jax.Array, jax.Array, lm_api.KVCache]:
  """Runs one exit (`exit_slice`) on the hidden state that leaves its backbone layer.

  Args:
    stack, lm_params: the frozen backbone LM.
    one_exit: one exit's params ({'layers': leaves [1, ...], optionally 'head'}).
    h: float[B, T, D] backbone hidden state after layers [0, l).
    cache: this exit's own one-layer KV cache (marked valid for the T tokens).
    ctx: the backbone's `make_context` for the same cache shape and write index.
    cross_kv: the exit layer's `stack.layer_constants` (T5: cross-attention K/V), computed once per
      encoder output; None computes them here.

  Returns:
    (features float[B, T, F] = final_features of the exit transformer output,
     logits float[B, T, V] of the exit classifier, updated cache).
  """
  chex.assert_rank(h, 3)
  out, _, cache = stack.apply_layers(one_exit['layers'], h, cache, ctx, cross_kv=cross_kv)
  return (*exit_logits(stack, lm_params, one_exit, out), cache)


def apply_exits(stack: lm_api.DecoderStack, lm_params: PyTree, exit_params: PyTree,
                exit_inputs: jax.Array, token_valid: jax.Array, ctx: PyTree) -> tuple[jax.Array, jax.Array]:
  """All exits on a whole sequence at once (teacher forcing), vectorised over the exit axis.

  Args:
    exit_inputs: float[E, B, T, D]; exit e's input is the backbone hidden after layers [0, l_e).
    token_valid: bool[B, T] real tokens (the slots the backbone's cache marked valid).
    ctx: the backbone's context for a fresh cache of length T (write index 0).

  Returns:
    (features float[E, B, T, F], logits float[E, B, T, V]).
  """
  e, b, t, _ = exit_inputs.shape
  chex.assert_shape(token_valid, (b, t))
  cache = lm_api.KVCache.zeros(1, b, t, stack.num_heads, stack.head_dim,
                               exit_inputs.dtype).mark_valid(token_valid)
  run = lambda p, h: apply_exit(stack, lm_params, p, h, cache, ctx)[:2]
  features, logits = jax.vmap(run)(exit_params, exit_inputs)
  chex.assert_axis_dimension(features, 0, e)
  return features, logits
