"""Paired comparisons of two models scored on the same test questions (bool right/wrong per question).

Two exits scored on one shared test split are not independent samples: most questions are easy for both. A
paired test looks only at the questions they disagree on, which is what makes a one-point difference on 1000
questions decidable.

* `mcnemar`: McNemar's exact test (a two-sided binomial test on the discordant pairs) for one pair of runs.
* `paired_bootstrap`: the 95% interval of the accuracy difference, resampling questions (one pair of runs), or
  questions and seed pairs together (several seeds of each method, paired seed by seed).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.stats


@dataclasses.dataclass(frozen=True)
class PairedResult:
  """a vs b on the same questions.

  Attributes:
    diff: accuracy of a minus accuracy of b (mean over seeds when several).
    a_only, b_only: questions only a (only b) gets right (summed over seeds).
    p_value: two-sided; McNemar's exact test over the discordant questions (pooled over seeds).
    low, high: the 95% paired-bootstrap interval of `diff`.
  """

  diff: float
  a_only: int
  b_only: int
  p_value: float
  low: float
  high: float

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _as_seeds(scores: np.ndarray, dtype=bool) -> np.ndarray:
  scores = np.asarray(scores, dtype)
  if scores.ndim not in (1, 2):
    raise ValueError(f'scores must be [N] or [S, N] (seeds, questions), got shape {scores.shape}')
  return scores[None] if scores.ndim == 1 else scores


def mcnemar(a_only: int, b_only: int) -> float:
  """Two-sided exact McNemar p-value: under H0 a discordant question is a's or b's with probability 1/2."""
  n = int(a_only) + int(b_only)
  return 1.0 if n == 0 else float(scipy.stats.binomtest(int(a_only), n, 0.5).pvalue)


def paired_bootstrap(scores_a: np.ndarray, scores_b: np.ndarray, *, samples: int = 2000, seed: int = 0
                     ) -> tuple[float, float]:
  """95% interval of mean(a) - mean(b), resampling questions (and seed pairs, for [S, N] inputs); scores are
  per question: right/wrong, or a share (e.g. of exits right)."""
  a, b = _as_seeds(scores_a, np.float64), _as_seeds(scores_b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f'paired runs must score the same questions and seeds: shapes {a.shape} vs {b.shape}')
  delta = a - b  # [S, N]: per seed pair and question
  rng = np.random.default_rng(seed)
  s, n = delta.shape
  seeds = rng.integers(0, s, size=(samples, s)) if s > 1 else np.zeros((samples, 1), int)
  questions = rng.integers(0, n, size=(samples, n))
  means = np.stack([delta[seeds[i]][:, questions[i]].mean() for i in range(samples)])
  low, high = np.quantile(means, [0.025, 0.975])
  return float(low), float(high)


def compare(right_a: np.ndarray, right_b: np.ndarray, *, samples: int = 2000, seed: int = 0) -> PairedResult:
  """a vs b: bool[N] each (one run each) or bool[S, N] (S seeds each, paired in order); the questions match."""
  a, b = _as_seeds(right_a), _as_seeds(right_b)
  if a.shape != b.shape:
    raise ValueError(f'paired runs must score the same questions and seeds: shapes {a.shape} vs {b.shape}')
  a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
  low, high = paired_bootstrap(a, b, samples=samples, seed=seed)
  return PairedResult(diff=float(a.mean() - b.mean()), a_only=a_only, b_only=b_only,
                      p_value=mcnemar(a_only, b_only), low=low, high=high)
