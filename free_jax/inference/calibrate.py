"""Risk-controlling choice of the early-exit threshold on a calibration split.

The caller runs the early-exit decoder on n calibration examples at every threshold of a grid
ordered from the most conservative to the most aggressive (descending: 0.99, 0.95, ..., or patience
k = 5, 4, ..., 1) and scores each output with a loss in [0, 1] against a reference of its choice:
the full-depth model's output ("does early exit change the answer?") or the ground truth. That gives
`losses[num_thresholds, n]`; `disagreement_losses` builds it from token arrays.

Two procedures turn it into a threshold with a finite-sample guarantee on a fresh test example:

* Learn-then-Test (`learn_then_test`; Angelopoulos, Bates, Candès, Jordan, Lei 2021): for each
  threshold a valid p-value for H0: risk > delta, tested in fixed sequence from the conservative end
  until the first non-rejection. With probability >= 1 - epsilon over the calibration draw, every
  accepted threshold has risk <= delta; the most aggressive accepted one is returned.
* Conformal risk control (`conformal_risk_control`; Angelopoulos, Bates, Fisch, Lei, Schuster
  2022): the most aggressive threshold with (n/(n+1)) R_n + B/(n+1) <= delta. Controls the expected
  risk, E[loss] <= delta, so it has no epsilon.

When no threshold qualifies, the result is `NEVER_EXIT` (the full model). The guarantee then holds
only if the full model itself has risk <= delta, true for disagreement with the full model, but not
for ground truth with delta below the full model's own error. All host-side NumPy/SciPy.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence

import numpy as np
from scipy import special, stats

from free_jax.inference.confidence import NEVER_EXIT

METHODS = ('ltt', 'crc')
P_VALUES = ('auto', 'binomial', 'hb')


@dataclasses.dataclass(frozen=True)
class CalibrationResult:
  """A calibrated threshold and the evidence for it (JSON-serialisable via `to_dict`/`to_json`).

  Attributes:
    threshold: chosen threshold; `NEVER_EXIT` when no grid threshold qualifies.
    index: position of `threshold` in the grid, or None for `NEVER_EXIT`.
    method: 'ltt' or 'crc'.
    delta: risk level.
    epsilon: LTT error probability (None for CRC, which controls the expected risk).
    n: number of calibration examples.
    empirical_risk: calibration risk at the chosen threshold (0.0 for `NEVER_EXIT`, which does not
      change the full model's output).
    thresholds: the grid, conservative to aggressive.
    risks: calibration risk (mean loss) at every grid threshold.
    p_value_method: 'binomial' or 'hb' (LTT), None for CRC.
    p_values: LTT p-value of H0: risk > delta at every grid threshold (None for CRC).
    adjusted_risks: CRC bound (n/(n+1)) R_n + B/(n+1) of the monotonised losses (None for LTT).
  """

  threshold: float
  index: int | None
  method: str
  delta: float
  epsilon: float | None
  n: int
  empirical_risk: float
  thresholds: list[float]
  risks: list[float]
  p_value_method: str | None = None
  p_values: list[float] | None = None
  adjusted_risks: list[float] | None = None

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), allow_nan=False)


def _check_level(name: str, value: float) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not (
      0.0 < value < 1.0):
    raise ValueError(f'{name} must be a number in (0, 1), got {value!r}')
  return float(value)


def _check_inputs(thresholds: Sequence[float], losses) -> tuple[np.ndarray, np.ndarray]:
  """thresholds float[K] strictly descending, losses float[K, n] in [0, 1]."""
  grid = np.asarray(thresholds, dtype=np.float64)
  if grid.ndim != 1 or grid.size == 0:
    raise ValueError(f'thresholds must be a non-empty 1-D grid, got shape {grid.shape}')
  if np.any(np.isnan(grid)) or np.any(np.diff(grid) >= 0):
    raise ValueError(f'thresholds must be strictly descending (conservative to aggressive), got '
                     f'{grid.tolist()}')
  losses = np.asarray(losses, dtype=np.float64)
  if losses.ndim != 2 or losses.shape[0] != grid.size or losses.shape[1] == 0:
    raise ValueError(f'losses must have shape [num_thresholds={grid.size}, num_examples>0], got '
                     f'{losses.shape}')
  if not np.all(np.isfinite(losses)) or losses.min() < 0 or losses.max() > 1:
    raise ValueError(f'losses must lie in [0, 1], got range [{np.nanmin(losses)}, '
                     f'{np.nanmax(losses)}] (nan/inf present: {not np.all(np.isfinite(losses))})')
  return grid, losses


def binomial_p_value(num_losses: np.ndarray, n: int, delta: float) -> np.ndarray:
  """Exact p-value of H0: risk > delta for 0/1 losses: P(Binomial(n, delta) <= num_losses)."""
  return stats.binom.cdf(num_losses, n, delta)


def hoeffding_bentkus_p_value(risk: np.ndarray, n: int, delta: float) -> np.ndarray:
  """p-value of H0: risk > delta for losses in [0, 1] from the empirical risk of n examples.

  min(Hoeffding: exp(-n h(min(R, delta), delta)), Bentkus: e P(Binomial(n, delta) <= ceil(n R))),
  with h(a, b) = KL(Bernoulli(a) || Bernoulli(b)) (Bates et al. 2021, Angelopoulos et al. 2021).
  """
  risk = np.asarray(risk, dtype=np.float64)
  a = np.minimum(risk, delta)
  kl = special.rel_entr(a, delta) + special.rel_entr(1 - a, 1 - delta)
  hoeffding = np.exp(-n * kl)
  # The small tolerance keeps float noise in n * R (e.g. 3.0000000004) from bumping the ceiling.
  bentkus = math.e * stats.binom.cdf(np.ceil(n * risk - 1e-9), n, delta)
  return np.minimum(1.0, np.minimum(hoeffding, bentkus))


def _last_accepted(ok: np.ndarray) -> int | None:
  """Fixed-sequence walk: index of the last True before the first False (None if ok[0] is False)."""
  failures = np.flatnonzero(~ok)
  last = (failures[0] if failures.size else ok.size) - 1
  return None if last < 0 else int(last)


def _result(grid, risks, index, **fields) -> CalibrationResult:
  return CalibrationResult(
      threshold=NEVER_EXIT if index is None else float(grid[index]),
      index=index,
      empirical_risk=0.0 if index is None else float(risks[index]),
      thresholds=grid.tolist(),
      risks=risks.tolist(),
      **fields)


def learn_then_test(thresholds: Sequence[float], losses, delta: float, epsilon: float,
                    p_value: str = 'auto') -> CalibrationResult:
  """Learn-then-Test with fixed-sequence testing.

  Args:
    thresholds: float[K] grid, strictly descending (conservative to aggressive).
    losses: float[K, n] per-example loss in [0, 1] at each threshold.
    delta: risk level in (0, 1).
    epsilon: allowed probability, in (0, 1), that the returned threshold has risk > delta.
    p_value: 'binomial' (exact; 0/1 losses only), 'hb' (Hoeffding-Bentkus; any losses in [0, 1]),
      or 'auto' (binomial when every loss is 0 or 1).

  Returns:
    CalibrationResult with the most aggressive threshold accepted before the first non-rejection.
  """
  delta, epsilon = _check_level('delta', delta), _check_level('epsilon', epsilon)
  grid, losses = _check_inputs(thresholds, losses)
  if p_value not in P_VALUES:
    raise ValueError(f'p_value must be one of {P_VALUES}, got {p_value!r}')
  binary = bool(np.all((losses == 0) | (losses == 1)))
  if p_value == 'binomial' and not binary:
    raise ValueError("p_value='binomial' needs 0/1 losses; use 'hb' for losses in [0, 1]")
  method = 'binomial' if p_value == 'binomial' or (p_value == 'auto' and binary) else 'hb'
  n = losses.shape[1]
  risks = losses.mean(axis=1)
  if method == 'binomial':
    p_values = binomial_p_value(losses.sum(axis=1), n, delta)
  else:
    p_values = hoeffding_bentkus_p_value(risks, n, delta)
  index = _last_accepted(p_values <= epsilon)
  return _result(grid, risks, index, method='ltt', delta=delta, epsilon=epsilon, n=n,
                 p_value_method=method, p_values=p_values.tolist())


def conformal_risk_control(thresholds: Sequence[float], losses, delta: float,
                           loss_bound: float = 1.0) -> CalibrationResult:
  """Conformal risk control: most aggressive threshold with (n/(n+1)) R_n + B/(n+1) <= delta.

  CRC needs losses that grow (weakly) as the threshold gets more aggressive. Early-exit losses
  need not be (a different exit changes the prefix), so each example's loss is replaced by its
  running maximum along the grid: an upper bound, so controlling it controls the real loss.

  Args:
    thresholds: float[K] grid, strictly descending (conservative to aggressive).
    losses: float[K, n] per-example loss in [0, loss_bound] at each threshold.
    delta: risk level in (0, 1).
    loss_bound: B, the largest possible loss (1 for 0/1 disagreement).

  Returns:
    CalibrationResult (epsilon None: the guarantee is E[test loss] <= delta).
  """
  delta = _check_level('delta', delta)
  if not 0 < loss_bound <= 1:
    raise ValueError(f'loss_bound must be in (0, 1] (losses are in [0, 1]), got {loss_bound!r}')
  grid, losses = _check_inputs(thresholds, losses)
  if losses.max() > loss_bound:
    raise ValueError(f'losses exceed loss_bound={loss_bound}: max {losses.max()}')
  n = losses.shape[1]
  monotone_risks = np.maximum.accumulate(losses, axis=0).mean(axis=1)
  adjusted = n / (n + 1) * monotone_risks + loss_bound / (n + 1)
  index = _last_accepted(adjusted <= delta)
  return _result(grid, losses.mean(axis=1), index, method='crc', delta=delta, epsilon=None, n=n,
                 adjusted_risks=adjusted.tolist())


def calibrate(thresholds: Sequence[float], losses, delta: float, epsilon: float | None = None,
              method: str = 'ltt') -> CalibrationResult:
  """Dispatches to `learn_then_test` (needs epsilon) or `conformal_risk_control` by name."""
  if method == 'ltt':
    if epsilon is None:
      raise ValueError("method='ltt' needs epsilon in (0, 1)")
    return learn_then_test(thresholds, losses, delta, epsilon)
  if method == 'crc':
    return conformal_risk_control(thresholds, losses, delta)
  raise ValueError(f'Unknown calibration method {method!r}; expected one of {METHODS}')


def disagreement_losses(predictions, reference, mask=None, per: str = 'sequence') -> np.ndarray:
  """Per-example disagreement of early-exit outputs with a reference, for calibration.

  Args:
    predictions: int[K, n, T] tokens decoded at each of K thresholds.
    reference: int[n, T] reference tokens (full-model output or ground truth).
    mask: bool[n, T] positions that count (default: all).
    per: 'sequence' -> 0/1, whether any counted token differs; 'token' -> fraction of counted
      tokens that differ (0 for a row with none counted).

  Returns:
    float[K, n] losses in [0, 1].
  """
  predictions, reference = np.asarray(predictions), np.asarray(reference)
  if predictions.ndim != 3 or predictions.shape[1:] != reference.shape:
    raise ValueError(f'predictions must be [K, n, T] matching reference [n, T]; got '
                     f'{predictions.shape} and {reference.shape}')
  mask = np.ones(reference.shape, bool) if mask is None else np.asarray(mask, bool)
  if mask.shape != reference.shape:
    raise ValueError(f'mask shape {mask.shape} does not match reference shape {reference.shape}')
  differs = (predictions != reference[None]) & mask[None]
  if per == 'sequence':
    return differs.any(axis=-1).astype(np.float64)
  if per == 'token':
    return differs.sum(axis=-1) / np.maximum(mask.sum(axis=-1), 1)[None]
  raise ValueError(f"per must be 'sequence' or 'token', got {per!r}")
