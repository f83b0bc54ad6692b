"""The cost model of decoding: weight bytes read per token.

At decode shapes a step is memory-bound on accelerators (and on CPUs once the model outgrows the caches):
its time is the bytes of weights it reads. A layer count undercounts what an exit costs: an exit reads its
own transformer layer *and* the LM head (final norm, projection, vocabulary matrix), which at BLIP-2
OPT-2.7B is 1.6 layers' weights, and deferred computation reads a segment's weights once more for each
catch-up pass. So the ideal speedup of a decode mode is full-depth bytes / its bytes, and a measured
speedup is reported as a share of that ideal.

Bytes of a decode (`DecodeOutput`): every pass over segment j reads the segment's backbone layers and exit
j's layer (`segment_passes`, catch-up passes included); every step reads the LM head once per exit it
scored plus once at the final layer (`step_depth`). The token embedding (one row per token) is ignored.
CALM projections read only the K/V projections of skipped layers and are not counted. A speculative
round reads the shallow weights once per draft step and the deep ones once for all drafts
(`WeightBytes.speculative`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from free_jax.models.layers import layer_at

PyTree = Any


def _nbytes(tree: PyTree) -> int:
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(tree)))


@dataclasses.dataclass(frozen=True)
class WeightBytes:
  """Bytes of weights a decoder reads, per piece.

  Attributes:
    segments: bytes of backbone segment j's layers, j = 0..E (segment j = layers [l_j, l_{j+1})).
    exits: bytes of exit j's layer (and separate head, if any), j = 0..E-1.
    head: bytes of the LM head applied once (final norm, output projection, vocabulary matrix).
  """

  segments: tuple[int, ...]
  exits: tuple[int, ...]
  head: int

  @classmethod
  def of(cls, lm_params: PyTree, exit_params: PyTree, exit_layers: tuple[int, ...]) -> 'WeightBytes':
    """From LM params (stacked or per-layer) and exit params (stacked, per-exit tuple, or None)."""
    layers = lm_params['layers']
    num_layers = len(layers) if isinstance(layers, tuple) else jax.tree.leaves(layers)[0].shape[0]
    per_layer = [_nbytes(layer_at(layers, l)) for l in range(num_layers)]
    bounds = (0, *exit_layers, num_layers)
    segments = tuple(sum(per_layer[a:b]) for a, b in zip(bounds, bounds[1:]))
    exits = tuple(_nbytes(layer_at(exit_params, e)) for e in range(len(exit_layers))) if exit_layers else ()
    # The head: everything but the layers, the encoder and position tables; the input embedding only
    # where it is the (tied) output matrix.
    skip = {'layers', 'encoder', 'embed_positions', *(('embed_tokens', 'shared') if 'lm_head' in lm_params else ())}
    head = _nbytes({k: v for k, v in lm_params.items() if k not in skip})
    return cls(segments=segments, exits=exits, head=head)

  @property
  def full_step(self) -> int:
    """One full-depth step of the exit-free decoder: every layer and the head once."""
    return sum(self.segments) + self.head

  def step(self, depth: int) -> int:
    """One step that stopped at exit `depth` (E: the final layer) with nothing to catch up."""
    num_exits = len(self.exits)
    scored = min(depth + 1, num_exits)
    return sum(self.segments[:depth + 1]) + sum(self.exits[:scored]) + (depth + 1) * self.head

  def decode(self, segment_passes, step_depth, num_steps: int) -> int:
    """Bytes of a whole decode of the early-exit decoder, catch-up passes included (module docstring)."""
    passes = np.asarray(segment_passes, np.int64)
    depth = np.asarray(step_depth)[:num_steps]
    weights = np.asarray(self.segments, np.int64) + np.asarray((*self.exits, 0), np.int64)
    return int(passes @ weights + (depth + 1).sum() * self.head)

  def speculative(self, segment_passes, rounds: int, draft_exit: int) -> int:
    """Bytes of a speculative decode (`speculative`): segment_passes[0] counts the prefill and draft
    steps, each reading segments 0..i, exit i's layer and the head; each of the `rounds` verifications
    reads the deeper segments and the head once (for all k + 1 positions)."""
    passes = np.asarray(segment_passes, np.int64)
    shallow = int(passes[0])
    return int(passes @ np.asarray(self.segments, np.int64) + shallow * self.exits[draft_exit]
               + (shallow + int(rounds)) * self.head)

  def ideal_speedup(self, depth: int) -> float:
    """Full-depth bytes over the bytes of a step that stops at exit `depth` (E: never exits)."""
    return self.full_step / self.step(depth)
