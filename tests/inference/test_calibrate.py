"""Tests for free_jax.inference.calibrate: guarantees hold on synthetic risk curves."""

import json

import numpy as np
import pytest

from free_jax.inference import calibrate
from free_jax.inference.confidence import NEVER_EXIT

K = 41
GRID = np.linspace(1.0, 0.0, K)  # conservative -> aggressive
DELTA, EPSILON, N_CAL, DRAWS = 0.1, 0.1, 300, 500


def _risk_curve(top):
  """True risk at each grid threshold, rising from 0 (conservative) to `top` (aggressive)."""
  return top * np.arange(K) / (K - 1)


def _draw(rng, curve, n, weighted=False):
  """losses[K, n] whose true mean at threshold j is curve[j] (or curve[j] / 2 when weighted).

  Example i fails at every threshold whose risk exceeds its difficulty u_i, so losses are monotone
  along the grid, like a real early-exit sweep.
  """
  u = rng.uniform(size=n)
  losses = (u[None] < curve[:, None]).astype(np.float64)
  return losses * rng.uniform(size=n)[None] if weighted else losses


def _true_risk(result, curve):
  return 0.0 if result.index is None else curve[result.index]


@pytest.mark.parametrize('weighted', [False, True], ids=['binomial', 'hoeffding_bentkus'])
def test_ltt_guarantee_holds_over_random_calibration_draws(weighted):
  rng = np.random.default_rng(0)
  curve = _risk_curve(0.6 if weighted else 0.3)
  true_curve = curve / 2 if weighted else curve
  chosen, naive = [], []
  for _ in range(DRAWS):
    losses = _draw(rng, curve, N_CAL, weighted)
    result = calibrate.learn_then_test(GRID, losses, DELTA, EPSILON)
    assert result.p_value_method == ('hb' if weighted else 'binomial')
    chosen.append(_true_risk(result, true_curve))
    # Naive plug-in rule: the most aggressive threshold whose calibration risk is <= delta.
    naive.append(true_curve[np.flatnonzero(losses.mean(axis=1) <= DELTA).max()])
  chosen, naive = np.array(chosen), np.array(naive)
  # Binomial std of the violation rate over 500 draws is ~0.013; 0.03 is > 2 sigma of slack.
  assert np.mean(chosen > DELTA) <= EPSILON + 0.03
  # The test has teeth: the plug-in rule breaks the same guarantee ...
  assert np.mean(naive > DELTA) > EPSILON + 0.1
  # ... and LTT is not trivially safe: it usually exits well before the full model.
  assert np.median(chosen) > DELTA / 2


def test_crc_controls_expected_risk():
  rng = np.random.default_rng(1)
  curve = _risk_curve(0.3)
  chosen = np.array([
      _true_risk(calibrate.conformal_risk_control(GRID, _draw(rng, curve, N_CAL), DELTA), curve)
      for _ in range(DRAWS)])
  # E[risk] <= delta; the std of this mean over 500 draws is < 0.001.
  assert chosen.mean() <= DELTA + 0.003
  assert chosen.mean() > DELTA - 0.02  # tight, not trivially conservative


def test_all_zero_losses_pick_most_aggressive_and_all_ones_never_exit():
  zeros, ones = np.zeros((K, 200)), np.ones((K, 200))
  for fn in (lambda l: calibrate.learn_then_test(GRID, l, DELTA, EPSILON),
             lambda l: calibrate.conformal_risk_control(GRID, l, DELTA)):
    assert fn(zeros).index == K - 1 and fn(zeros).threshold == GRID[-1]
    never = fn(ones)
    assert never.index is None and never.threshold == NEVER_EXIT and never.empirical_risk == 0.0


def test_fixed_sequence_stops_at_first_non_rejection():
  losses = np.zeros((3, 200))
  losses[1, :100] = 1  # the middle threshold is bad, the aggressive one looks fine on its own
  assert calibrate.learn_then_test([0.9, 0.5, 0.1], losses, DELTA, EPSILON).index == 0
  # CRC monotonises: an example lost at 0.5 counts as lost at 0.1 too.
  assert calibrate.conformal_risk_control([0.9, 0.5, 0.1], losses, DELTA).index == 0


def test_looser_delta_or_epsilon_is_never_more_conservative():
  rng = np.random.default_rng(2)
  curve = _risk_curve(0.3)
  for _ in range(20):
    losses = _draw(rng, curve, 150)
    ltt = [calibrate.learn_then_test(GRID, losses, d, e).threshold
           for d, e in [(0.05, 0.05), (0.1, 0.05), (0.1, 0.2), (0.2, 0.2)]]
    crc = [calibrate.conformal_risk_control(GRID, losses, d).threshold for d in (0.05, 0.1, 0.2)]
    assert ltt == sorted(ltt, reverse=True) and crc == sorted(crc, reverse=True)


def test_p_values():
  n, delta = 50, 0.1
  np.testing.assert_allclose(calibrate.binomial_p_value(np.array([0]), n, delta), 0.9**n)
  counts = np.arange(n + 1)
  exact = calibrate.binomial_p_value(counts, n, delta)
  hb = calibrate.hoeffding_bentkus_p_value(counts / n, n, delta)
  # Both valid; the distribution-free HB bound is never sharper than the exact binomial tail.
  assert np.all(hb >= exact - 1e-12) and np.all(np.diff(exact) >= 0) and np.all(np.diff(hb) >= 0)
  np.testing.assert_array_equal(hb[counts >= n * delta], 1.0)
  assert hb[0] < 0.05  # zero observed losses in 50 is real evidence for risk <= 0.1


def test_result_is_json_serialisable():
  losses = _draw(np.random.default_rng(3), _risk_curve(0.3), 100)
  for result in (calibrate.calibrate(GRID, losses, DELTA, EPSILON, method='ltt'),
                 calibrate.calibrate(GRID, losses, DELTA, method='crc')):
    back = json.loads(result.to_json())
    assert back == result.to_dict()
    assert back['n'] == 100 and len(back['risks']) == K
    assert calibrate.CalibrationResult(**back) == result


@pytest.mark.parametrize('kwargs, match', [
    (dict(delta=0.0), 'delta must be a number in'),
    (dict(delta=1.5), 'delta must be a number in'),
    (dict(epsilon=-0.1), 'epsilon must be a number in'),
    (dict(thresholds=GRID[::-1]), 'strictly descending'),
    (dict(losses=np.zeros((K - 1, 10))), r'losses must have shape \[num_thresholds=41'),
    (dict(losses=np.full((K, 10), 1.5)), r'losses must lie in \[0, 1\]'),
    (dict(losses=np.full((K, 10), 0.5), p_value='binomial'), 'needs 0/1 losses'),
    (dict(p_value='exact'), 'p_value must be one of'),
])
def test_ltt_bad_input_errors(kwargs, match):
  args = dict(thresholds=GRID, losses=np.zeros((K, 10)), delta=DELTA, epsilon=EPSILON)
  with pytest.raises(ValueError, match=match):
    calibrate.learn_then_test(**{**args, **kwargs})


def test_calibrate_dispatch_errors():
  with pytest.raises(ValueError, match="method='ltt' needs epsilon"):
    calibrate.calibrate(GRID, np.zeros((K, 10)), DELTA)
  with pytest.raises(ValueError, match="Unknown calibration method 'cp'"):
    calibrate.calibrate(GRID, np.zeros((K, 10)), DELTA, EPSILON, method='cp')


def test_disagreement_losses():
  reference = np.array([[1, 2, 3, 0], [4, 5, 6, 7]])
  mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
  predictions = np.stack([reference, [[1, 2, 9, 5], [4, 0, 0, 7]]])  # [K=2, n=2, T=4]
  np.testing.assert_array_equal(
      calibrate.disagreement_losses(predictions, reference, mask), [[0, 0], [1, 1]])
  np.testing.assert_allclose(
      calibrate.disagreement_losses(predictions, reference, mask, per='token'),
      [[0, 0], [1 / 3, 2 / 4]])
  with pytest.raises(ValueError, match='predictions must be'):
    calibrate.disagreement_losses(reference, reference)
