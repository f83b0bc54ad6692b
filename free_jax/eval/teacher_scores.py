"""Teacher-forced scores of every exit and of the backbone, per example: the one scorer of the exit stage's
validation curve, its test table (``train_eval.json``) and the recipe screen's paired tests.

An answer is right at an exit when every target token (answer and EOS) is that exit's argmax given the true
prefix, which for greedy decoding is the same as generating exactly the target. Token accuracy counts the
target tokens one by one (the figure that means something for captions).

    scorer = TeacherScorer(backbone, exit_layers=(2, 4, 6), task='vqa', batch_size=32)
    scores = scorer(exit_params, examples)
    scores.right        # bool[E + 1, N]: exits, then the backbone's last layer
    scores.summary()    # {'exit2': {'answer_acc': ..., 'token_acc': ...}, ..., 'backbone': {...}}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from free_jax import teacher_forcing
from free_jax.backbone import Backbone
from free_jax.data import batching

PyTree = Any


@dataclasses.dataclass(frozen=True)
class TeacherScores:
  """Per-example teacher-forced correctness.

  Attributes:
    names: 'exit{l}' per exit, then 'backbone'.
    right: bool[E + 1, N], whether every target token of example n is the argmax at that depth.
    token_hits: int[E + 1], target tokens predicted right; token_count: target tokens in all.
    kinds: str[N], the examples' question types ('' where the data has none).
  """

  names: tuple[str, ...]
  right: np.ndarray
  token_hits: np.ndarray
  token_count: int
  kinds: np.ndarray

  def answer_accuracy(self) -> dict[str, float]:
    return {name: float(r.mean()) for name, r in zip(self.names, self.right)}

  def token_accuracy(self) -> dict[str, float]:
    return {name: float(h / self.token_count) for name, h in zip(self.names, self.token_hits)}

  def per_kind(self) -> dict[str, dict[str, float]]:
    """{name: {question type | 'all': answer accuracy}}."""
    kinds = sorted(set(self.kinds.tolist()) - {''})
    return {name: {**{k: float(r[self.kinds == k].mean()) for k in kinds}, 'all': float(r.mean())}
            for name, r in zip(self.names, self.right)}


class TeacherScorer:
  """``scorer(exit_params, examples) -> TeacherScores`` for one backbone and exit placement (compiled once)."""

  def __init__(self, backbone: Backbone, exit_layers: Sequence[int], task: str, batch_size: int):
    self.backbone, self.task, self.batch_size = backbone, task, batch_size
    self.exit_layers = tuple(exit_layers)
    self.names = tuple(f'exit{l}' for l in self.exit_layers) + ('backbone',)
    self._predict = jax.jit(lambda params, exits, batch: teacher_forcing.exit_predictions(
        backbone.model, params, exits, self.exit_layers, batch))

  def __call__(self, exit_params: PyTree, examples: dict) -> TeacherScores:
    right, hits, count, kinds = [], np.zeros(len(self.names), np.int64), 0, []
    for chunk in batching.iterate_batches(examples, self.batch_size, 0, shuffle=False, num_epochs=1,
                                          drop_remainder=False):
      batch = batching.train_batch(chunk, self.backbone.tokenizer, self.backbone.fmt, self.task)
      tokens = np.asarray(self._predict(self.backbone.params, exit_params, batch))  # int[E + 1, B, T]
      rows = np.asarray(batch['valid'], bool)
      mask = np.asarray(teacher_forcing.target_mask(batch), bool) & rows[:, None]
      hit = tokens == np.asarray(batch['labels'])[None]
      right.append((hit | ~mask[None]).all(-1)[:, rows])
      hits += (hit & mask[None]).sum((1, 2))
      count += int(mask.sum())
      kinds += [str(k) for k in np.asarray(chunk.get('question_type', [''] * len(rows)))[rows]]
    return TeacherScores(self.names, np.concatenate(right, 1), hits, count, np.asarray(kinds))
