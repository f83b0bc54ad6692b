"""Paired comparisons on shared test questions: McNemar's exact test and the paired bootstrap."""

import numpy as np
import pytest
import scipy.stats

from free_jax.eval import paired


def test_mcnemar_is_the_binomial_test_on_discordant_questions():
  assert paired.mcnemar(0, 0) == 1.0
  assert paired.mcnemar(15, 5) == pytest.approx(scipy.stats.binomtest(15, 20, 0.5).pvalue)
  assert paired.mcnemar(5, 15) == paired.mcnemar(15, 5)  # two-sided


def test_a_difference_on_few_discordant_questions_is_decided_by_them_alone():
  rng = np.random.default_rng(0)
  b = rng.random(1000) < 0.8
  a = b.copy()
  flip = np.flatnonzero(~b)[:30]  # a gets 30 more questions right, loses none
  a[flip] = True
  result = paired.compare(a, b)
  assert (result.a_only, result.b_only) == (30, 0)
  assert result.diff == pytest.approx(0.03) and result.p_value < 1e-8
  assert 0 < result.low <= 0.03 <= result.high
  same = paired.compare(b, b)
  assert same.diff == 0 and same.p_value == 1.0 and same.low == same.high == 0


def test_seeds_are_paired_in_order_and_pooled():
  rng = np.random.default_rng(1)
  a, b = rng.random((3, 200)) < 0.7, rng.random((3, 200)) < 0.7
  result = paired.compare(a, b)
  assert result.a_only == int((a & ~b).sum()) and result.b_only == int((~a & b).sum())
  assert result.diff == pytest.approx(a.mean() - b.mean())
  assert result.low < result.diff < result.high


def test_unpaired_shapes_are_refused():
  with pytest.raises(ValueError, match=r'shapes \(1, 10\) vs \(1, 11\)'):
    paired.compare(np.ones(10, bool), np.ones(11, bool))
  with pytest.raises(ValueError, match=r'must be \[N\] or \[S, N\]'):
    paired.compare(np.ones((1, 2, 3), bool), np.ones((1, 2, 3), bool))
