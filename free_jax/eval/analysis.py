"""Model-independent early-exit analysis: per-exit quality, exit statistics, overthinking,
mid-crisis, layer speedup, and the standard plots.

Everything takes host arrays (NumPy, or JAX arrays which are converted) and returns Python floats or
NumPy arrays, so the same code serves evaluate.py, the reproduction study and a notebook. "Examples"
are whatever the caller scores: answers, or (teacher-forced) tokens; an optional bool mask[N]
drops padding. Plots draw on a bare Agg canvas (no pyplot global state, no display needed).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _mask(mask, n: int) -> np.ndarray:
  """bool[n] mask (all True by default), checked against the number of examples."""
  if mask is None:
    return np.ones(n, bool)
  mask = np.asarray(mask, bool)
  if mask.shape != (n,):
    raise ValueError(f'mask must have shape [{n}] (one per example), got {mask.shape}')
  if not mask.any():
    raise ValueError('mask selects no examples')
  return mask


def _per_exit(name: str, values) -> np.ndarray:
  values = np.asarray(values)
  if values.ndim != 2 or values.shape[1] == 0:
    raise ValueError(f'{name} must be [num_exits, num_examples>0], got shape {values.shape}')
  return values


def per_exit_quality(correct, mask=None) -> np.ndarray:
  """Quality of every exit (or layer): mean of correct[E, N] (bool or score in [0, 1]) over N.

  Returns:
    float[E]; e.g. teacher-forced token accuracy of each exit.
  """
  correct = _per_exit('correct', correct).astype(np.float64)
  mask = _mask(mask, correct.shape[1])
  return correct[:, mask].mean(axis=1)


def exit_histogram(exit_index, num_exits: int, mask=None) -> np.ndarray:
  """Counts of int exit_index[N] over bins 0..num_exits-1 (make the final layer the last bin).

  Returns:
    int64[num_exits] counts.
  """
  exit_index = np.asarray(exit_index).reshape(-1)
  mask = _mask(mask, exit_index.size)
  exit_index = exit_index[mask]
  if exit_index.size and (exit_index.min() < 0 or exit_index.max() >= num_exits):
    raise ValueError(f'exit_index must be in [0, {num_exits}), got range '
                     f'[{exit_index.min()}, {exit_index.max()}]')
  return np.bincount(exit_index.astype(np.int64), minlength=num_exits)


def overthinking_rate(per_exit_correct, final_correct, mask=None) -> float:
  """Fraction of examples that some earlier exit got right but the final layer gets wrong.

  Args:
    per_exit_correct: bool[E, N] correctness of each exit (a final-layer row may be included: it
      is False exactly where the final layer is wrong, so it never counts).
    final_correct: bool[N] correctness of the final layer.
    mask: optional bool[N].

  Returns:
    float in [0, 1]: mean over examples of any(per_exit_correct[:, i]) and not final_correct[i].
  """
  per_exit_correct = _per_exit('per_exit_correct', per_exit_correct).astype(bool)
  final_correct = np.asarray(final_correct, bool)
  if final_correct.shape != per_exit_correct.shape[1:]:
    raise ValueError(f'final_correct must have shape {per_exit_correct.shape[1:]}, got '
                     f'{final_correct.shape}')
  mask = _mask(mask, final_correct.size)
  overthought = per_exit_correct.any(axis=0) & ~final_correct
  return float(overthought[mask].mean())


def wasted_compute(agrees_with_final, exit_layers: Sequence[int], num_layers: int,
                   mask=None) -> float:
  """Overthinking as wasted compute: mean fraction of layers run after the answer was known.

  For each example, take the first exit whose prediction already equals the final layer's
  prediction; the layers after it, (num_layers - exit_layers[e]) / num_layers, were wasted (a
  confident exit there would have answered the same). Examples where no exit agrees waste 0.

  Args:
    agrees_with_final: bool[E, N] whether exit e predicts what the final layer predicts.
    exit_layers: int[E] number of LM layers computed before exit e answers (exit after layer l).
    num_layers: number of LM layers L.
    mask: optional bool[N].

  Returns:
    float in [0, 1).
  """
  agrees = _per_exit('agrees_with_final', agrees_with_final).astype(bool)
  exit_layers = np.asarray(exit_layers)
  if exit_layers.shape != (agrees.shape[0],):
    raise ValueError(f'exit_layers must have one entry per exit ({agrees.shape[0]}), got shape '
                     f'{exit_layers.shape}')
  if np.any(exit_layers < 1) or np.any(exit_layers > num_layers) or np.any(np.diff(exit_layers) <= 0):
    raise ValueError(f'exit_layers must be increasing in [1, num_layers={num_layers}], got '
                     f'{exit_layers.tolist()}')
  mask = _mask(mask, agrees.shape[1])
  first = np.argmax(agrees, axis=0)  # first agreeing exit (0 where none agrees; masked below)
  waste = np.where(agrees.any(axis=0), (num_layers - exit_layers[first]) / num_layers, 0.0)
  return float(waste[mask].mean())


def mid_crisis_dip(per_layer_quality) -> float:
  """Depth of the deepest dip in a per-layer quality curve (0 when it has none).

  A dip at layer l is how far its quality falls below both an earlier peak and a later recovery:
  min(max(q[:l]), max(q[l+1:])) - q[l]. The result is the largest such dip over the middle layers
  (0 < l < L-1), clipped at 0, so monotone (rising or falling) and flat curves give 0: only a drop
  that is later recovered, as in a frozen VLM's naive exits, counts as a mid-crisis.

  Args:
    per_layer_quality: float[L] quality after each layer (or exit), shallow to deep.
  """
  q = np.asarray(per_layer_quality, np.float64)
  if q.ndim != 1:
    raise ValueError(f'per_layer_quality must be 1-D [num_layers], got shape {q.shape}')
  if q.size < 3:
    return 0.0
  peak_before = np.maximum.accumulate(q)[:-2]
  peak_after = np.maximum.accumulate(q[::-1])[::-1][2:]
  return float(max(0.0, np.max(np.minimum(peak_before, peak_after) - q[1:-1])))


def layer_speedup(executed_layers, full_layers) -> float:
  """Layer-count speedup: total full-depth layers / total executed layers.

  Args:
    executed_layers: float[...] layers executed per token (count exit layers as the caller's cost
      model says; the issue counts them as layers).
    full_layers: layers of a full-depth token (scalar, or an array broadcastable to the above).
  """
  executed = np.asarray(executed_layers, np.float64)
  if executed.size == 0 or np.any(executed <= 0):
    raise ValueError(f'executed_layers must be non-empty and positive, got {executed.size} values '
                     f'with min {executed.min() if executed.size else None}')
  full = np.broadcast_to(np.asarray(full_layers, np.float64), executed.shape)
  return float(full.sum() / executed.sum())


def _save(fig: Figure, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path


def _new_axes(title: str | None):
  fig = Figure(figsize=(5.5, 4))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  if title:
    ax.set_title(title)
  ax.grid(alpha=0.3)
  return fig, ax


def _xy(name: str, x, y) -> tuple[np.ndarray, np.ndarray]:
  x, y = np.asarray(x), np.asarray(y)
  if x.shape != y.shape or x.ndim != 1:
    raise ValueError(f'curve {name!r}: x {x.shape} and y {y.shape} must be 1-D of equal length')
  return x, y


def plot_quality_vs_speedup(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                            path: str, *, full_quality: float | None = None,
                            quality_label: str = 'quality',
                            speedup_label: str = 'measured decode speedup (x)',
                            title: str | None = None) -> str:
  """Quality vs speedup over a threshold sweep, one line per method.

  Args:
    curves: method name -> (speedups float[S], qualities float[S]), one point per threshold.
    path: PNG file to write (parent directories are created).
    full_quality: full-depth quality, drawn as a horizontal reference line.

  Returns:
    path.
  """
  fig, ax = _new_axes(title)
  for name, (speedups, qualities) in curves.items():
    speedups, qualities = _xy(name, speedups, qualities)
    order = np.argsort(speedups)
    ax.plot(speedups[order], qualities[order], marker='o', label=name)
  if full_quality is not None:
    ax.axhline(full_quality, color='k', linestyle='--', linewidth=1, label='full model')
  ax.axvline(1.0, color='grey', linewidth=0.5)
  ax.set_xlabel(speedup_label)
  ax.set_ylabel(quality_label)
  ax.legend()
  return _save(fig, path)


def plot_per_layer_quality(curves: Mapping[str, Sequence[float]], path: str, *,
                           layers: Sequence[int] | None = None, quality_label: str = 'quality',
                           title: str | None = None, xlabel: str = 'exit layer') -> str:
  """Per-layer (or per-exit) quality of several methods on one axis: the mid-crisis picture.

  Args:
    curves: method name -> float[E] quality at each exit, shallow to deep.
    path: PNG file to write.
    layers: int[E] layer index of each exit for the x axis (default 1..E).
    xlabel: the x axis' name.

  Returns:
    path.
  """
  fig, ax = _new_axes(title)
  for name, quality in curves.items():
    quality = np.asarray(quality)
    x = np.arange(1, quality.size + 1) if layers is None else np.asarray(layers)
    if quality.ndim != 1 or x.shape != quality.shape:
      raise ValueError(f'curve {name!r}: quality shape {quality.shape} does not match layers '
                       f'shape {x.shape}')
    ax.plot(x, quality, marker='o', label=f'{name} (dip {mid_crisis_dip(quality):.3f})')
  ax.set_xlabel(xlabel)
  ax.set_ylabel(quality_label)
  ax.legend()
  return _save(fig, path)


def plot_exit_histogram(counts, path: str, *, labels: Sequence[str] | None = None,
                        title: str | None = None) -> str:
  """Bar chart of exit counts (e.g. from `exit_histogram`), as fractions of all tokens.

  Args:
    counts: int[E] tokens that left at each exit (final layer last).
    path: PNG file to write.
    labels: E bar labels (default exit indices).

  Returns:
    path.
  """
  counts = np.asarray(counts, np.float64)
  if counts.ndim != 1 or counts.sum() <= 0:
    raise ValueError(f'counts must be 1-D with a positive total, got shape {counts.shape}')
  labels = [str(i) for i in range(counts.size)] if labels is None else list(labels)
  if len(labels) != counts.size:
    raise ValueError(f'labels has {len(labels)} entries for {counts.size} bins')
  fig, ax = _new_axes(title)
  ax.bar(labels, counts / counts.sum())
  ax.set_xlabel('exit')
  ax.set_ylabel('fraction of tokens')
  return _save(fig, path)


def plot_modes(modes: Mapping[str, tuple[float, float]], path: str, *, quality_label: str = 'quality',
               title: str | None = None) -> str:
  """Decode modes side by side: quality and measured decode speedup over full depth.

  Args:
    modes: name -> (quality, speedup), e.g. full, early exit at the calibrated threshold, speculative.
    path: PNG file to write.

  Returns:
    path.
  """
  if not modes:
    raise ValueError('modes is empty')
  names = list(modes)
  quality, speedup = (np.asarray([modes[n][j] for n in names], np.float64) for j in (0, 1))
  fig, ax = _new_axes(title)
  ax.barh(names, speedup)
  for y, (q, v) in enumerate(zip(quality, speedup)):
    ax.annotate(f'{quality_label} {q:.3f}', (v, y), xytext=(4, 0), textcoords='offset points', va='center')
  ax.axvline(1.0, color='grey', linewidth=0.8)
  ax.set_xlabel('measured decode speedup over full depth (x)')
  ax.set_xlim(0, max(1.0, float(speedup.max())) * 1.6)
  return _save(fig, path)


def plot_learning_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str, *,
                         xlabel: str = 'training step', ylabel: str = 'quality', title: str | None = None) -> str:
  """Learning curves, one line per run: dashed for controls (names containing '(').

  Args:
    curves: run name -> (steps float[P], values float[P]).
    path: PNG file to write.

  Returns:
    path.
  """
  fig, ax = _new_axes(title)
  for name, (steps, values) in curves.items():
    steps, values = _xy(name, steps, values)
    ax.plot(steps, values, marker='.', linestyle='--' if '(' in name else '-', label=name)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.legend(fontsize='small')
  return _save(fig, path)
