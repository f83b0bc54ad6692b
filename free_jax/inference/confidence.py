"""Exit confidence measures: when may a token leave the network at an exit?

Every probability-type measure maps logits float[..., V] to a confidence float[...] in [0, 1],
higher = more confident, and a token exits at the first exit whose confidence >= that exit's
threshold. Thresholds therefore live in [0, 1]; any value > 1 (canonically `NEVER_EXIT`, or inf)
means "never exit here", which is how a caller asks for the full-depth model.

Patience (PABEE, Zhou et al. 2020) is not a function of one exit's logits but of the sequence of
exits a token has passed: it is a tiny state machine (`PatienceState`, `patience_update`) that the
decoder threads through its loop over exits.

Everything here is a pure function of arrays, safe inside `jit`, `lax.while_loop` and `lax.cond`;
the validators are plain Python/NumPy so bad input fails before anything is compiled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

# Confidences never exceed 1, so any threshold > 1 never fires. A finite value keeps results JSON-safe.
NEVER_EXIT = 2.0


def max_prob(logits: jax.Array) -> jax.Array:
  """Maximum softmax probability: float[..., V] -> float[...] in [1/V, 1]."""
  # float32: bf16 would round probabilities near 1 and blur the thresholds.
  logits = logits.astype(jnp.float32)
  # max_v p_v = exp(max - logsumexp); avoids materialising the full softmax.
  return jnp.exp(jnp.max(logits, axis=-1) - jax.nn.logsumexp(logits, axis=-1))


def top2_margin(logits: jax.Array) -> jax.Array:
  """Top-2 softmax margin p(1st) - p(2nd): float[..., V] -> float[...] in [0, 1]. Needs V >= 2."""
  if logits.shape[-1] < 2:
    raise ValueError(f'top2_margin needs a vocabulary of at least 2, got logits shape {logits.shape}')
  logits = logits.astype(jnp.float32)
  top2, _ = jax.lax.top_k(logits, 2)
  lse = jax.nn.logsumexp(logits, axis=-1)
  return jnp.exp(top2[..., 0] - lse) - jnp.exp(top2[..., 1] - lse)


def entropy_confidence(logits: jax.Array) -> jax.Array:
  """Normalised negative entropy 1 - H(p) / log V: float[..., V] -> float[...] in [0, 1].

  1 for a one-hot distribution, 0 for the uniform one. Needs V >= 2.
  """
  vocab = logits.shape[-1]
  if vocab < 2:
    raise ValueError(f'entropy_confidence needs a vocabulary of at least 2, got logits shape '
                     f'{logits.shape}')
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  # xlogy-style: p log p -> 0 where p underflows to 0 (log_p = -inf would give nan otherwise).
  p = jnp.exp(log_p)
  entropy = -jnp.sum(jnp.where(p > 0, p * log_p, 0.0), axis=-1)
  return jnp.clip(1.0 - entropy / math.log(vocab), 0.0, 1.0)


CONFIDENCE_FNS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'max_prob': max_prob,
    'top2_margin': top2_margin,
    'entropy': entropy_confidence,
}


def get_confidence_fn(name: str) -> Callable[[jax.Array], jax.Array]:
  """The probability-type measure registered under `name` (see `CONFIDENCE_FNS`)."""
  try:
    return CONFIDENCE_FNS[name]
  except KeyError:
    raise ValueError(f'Unknown confidence measure {name!r}; expected one of '
                     f'{sorted(CONFIDENCE_FNS)} (patience is a state machine: patience_update)'
                     ) from None


def validate_thresholds(thresholds: float | Sequence[float] | np.ndarray,
                        num_exits: int) -> np.ndarray:
  """Checks exit thresholds before any compile and broadcasts them to one per exit.

  Args:
    thresholds: one threshold for all exits, or one per exit. Each must be in [0, 1]; any value
      > 1 (e.g. `NEVER_EXIT` or inf) means that exit never fires. 0 means always exit.
    num_exits: number of early exits (the final layer is not an exit: it always answers).

  Returns:
    float32[num_exits] thresholds, ready to pass as a traced argument.

  Raises:
    ValueError: naming the offending value or length.
  """
  if isinstance(num_exits, bool) or not isinstance(num_exits, (int, np.integer)) or num_exits < 1:
    raise ValueError(f'num_exits must be a positive integer, got {num_exits!r}')
  try:
    values = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
  except (TypeError, ValueError):
    raise ValueError(f'thresholds must be numbers in [0, 1], one or one per exit ({num_exits}); got {thresholds!r}'
                     ) from None
  if values.ndim != 1:
    raise ValueError(f'thresholds must be a float or a 1-D sequence, got shape {values.shape}')
  if values.size not in (1, num_exits):
    raise ValueError(f'thresholds must be one value or one per exit ({num_exits}), got '
                     f'{values.size}: {values.tolist()}')
  for i, t in enumerate(values):
    if np.isnan(t) or t < 0:
      raise ValueError(f'threshold[{i}] = {t} is invalid: thresholds must be in [0, 1], or > 1 '
                       f'for never-exit')
  return np.broadcast_to(values, (num_exits,)).astype(np.float32)


@flax.struct.dataclass
class PatienceState:
  """Patience bookkeeping for one token's walk through the exits.

  Attributes:
    token: int32[...] argmax token of the previous exit (-1 before the first exit).
    count: int32[...] number of consecutive exits, up to the previous one, that predicted `token`.
  """

  token: jax.Array
  count: jax.Array

  @classmethod
  def init(cls, shape: Sequence[int] = ()) -> 'PatienceState':
    """Fresh state for a new token (one entry per batch element of `shape`)."""
    return cls(token=jnp.full(shape, -1, jnp.int32), count=jnp.zeros(shape, jnp.int32))


def validate_patience(k: int) -> int:
  """Checks a patience k before any compile: a positive integer (k > num_exits never exits)."""
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f'patience must be a positive integer (consecutive agreeing exits), got {k!r}')
  return int(k)


def patience_update(state: PatienceState, token: jax.Array,
                    k: int | jax.Array) -> tuple[PatienceState, jax.Array]:
  """Feeds one exit's argmax token into the patience state machine.

  The token exits as soon as the same argmax came from k consecutive exits (this one included).
  PABEE's "patience t" (t unchanged predictions after the first) is k = t + 1; k = 1 always exits
  at the first exit. `k` may be traced, so sweeping it does not recompile.

  Args:
    state: state after the previous exit (`PatienceState.init` before the first exit).
    token: int[...] argmax token of the current exit, same shape as the state.
    k: number of consecutive agreeing exits required.

  Returns:
    (new state, exit_now bool[...]).
  """
  chex.assert_equal_shape([state.token, token])
  token = token.astype(jnp.int32)
  count = jnp.where(token == state.token, state.count + 1, 1)
  return PatienceState(token=token, count=count), count >= k
