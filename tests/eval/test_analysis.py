"""Tests for free_jax.eval.analysis on hand-built cases."""

import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from free_jax.eval import analysis

# 3 exits x 4 examples.
CORRECT = np.array([[1, 0, 0, 1],
                    [1, 1, 0, 0],
                    [0, 1, 0, 1]], bool)
FINAL = np.array([0, 1, 0, 1], bool)


def test_per_exit_quality_with_and_without_mask():
  np.testing.assert_allclose(analysis.per_exit_quality(CORRECT), [0.5, 0.5, 0.5])
  np.testing.assert_allclose(analysis.per_exit_quality(CORRECT, mask=[1, 1, 0, 0]), [0.5, 1, 0.5])
  # Accepts JAX arrays and soft scores (e.g. VQA accuracy 0.3/0.6/1).
  np.testing.assert_allclose(analysis.per_exit_quality(jnp.array([[0.3, 0.6], [1.0, 0.0]])),
                             [0.45, 0.5])


def test_exit_histogram():
  counts = analysis.exit_histogram(np.array([[0, 2], [2, 3]]), 4)
  np.testing.assert_array_equal(counts, [1, 0, 2, 1])
  np.testing.assert_array_equal(analysis.exit_histogram([0, 2, 2, 3], 4, mask=[1, 0, 1, 0]),
                                [1, 0, 1, 0])
  with pytest.raises(ValueError, match=r'exit_index must be in \[0, 3\), got range \[0, 3\]'):
    analysis.exit_histogram([0, 3], 3)


def test_overthinking_rate():
  # Example 0: exits 0 and 1 right, final wrong -> overthought. Example 2: nobody right -> not.
  assert analysis.overthinking_rate(CORRECT, FINAL) == 0.25
  # Including the final layer as a row changes nothing.
  assert analysis.overthinking_rate(np.vstack([CORRECT, FINAL]), FINAL) == 0.25
  assert analysis.overthinking_rate(CORRECT, FINAL, mask=[1, 0, 1, 0]) == 0.5
  assert analysis.overthinking_rate(CORRECT, np.ones(4, bool)) == 0.0
  with pytest.raises(ValueError, match=r'final_correct must have shape \(4,\)'):
    analysis.overthinking_rate(CORRECT, FINAL[:3])


def test_wasted_compute():
  agrees = np.array([[0, 1, 0],
                     [1, 1, 0]], bool)  # exits after layers 2 and 6 of 8
  # Example 0: first agreeing exit is the second (6 of 8 layers) -> 2/8 wasted;
  # example 1: the first exit already agreed -> 6/8; example 2: none agrees -> 0.
  np.testing.assert_allclose(analysis.wasted_compute(agrees, [2, 6], 8), (2 / 8 + 6 / 8 + 0) / 3)
  np.testing.assert_allclose(analysis.wasted_compute(agrees, [2, 6], 8, mask=[1, 0, 0]), 2 / 8)
  with pytest.raises(ValueError, match='exit_layers must be increasing'):
    analysis.wasted_compute(agrees, [6, 2], 8)
  with pytest.raises(ValueError, match='one entry per exit'):
    analysis.wasted_compute(agrees, [2], 8)


@pytest.mark.parametrize('curve, dip', [
    ([0.2, 0.4, 0.6, 0.8], 0.0),          # rising
    ([0.8, 0.6, 0.4], 0.0),               # falling: no recovery, no crisis
    ([0.5, 0.5, 0.5], 0.0),
    ([0.6, 0.3, 0.5, 0.9], 0.3),          # recovery above the early peak: dip from that peak
    ([0.6, 0.5, 0.2, 0.4, 0.5], 0.3),     # partial recovery: dip measured to the recovery
    ([0.4, 0.2, 0.5, 0.1, 0.7], 0.4),     # the deepest of two dips
    ([0.5, 0.1], 0.0),                    # too short for a middle
])
def test_mid_crisis_dip(curve, dip):
  np.testing.assert_allclose(analysis.mid_crisis_dip(curve), dip, atol=1e-12)


def test_layer_speedup():
  assert analysis.layer_speedup([4, 4, 8, 8], 8) == pytest.approx(32 / 24)
  assert analysis.layer_speedup(np.full(5, 8), 8) == 1.0
  assert analysis.layer_speedup([2, 6], [4, 12]) == 2.0
  with pytest.raises(ValueError, match='executed_layers must be non-empty and positive'):
    analysis.layer_speedup([0, 4], 8)


def _assert_png(path):
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  image = matplotlib.image.imread(path)
  assert image.shape[0] > 100 and image.shape[1] > 100
  # Something was drawn: not a blank canvas.
  assert image[..., :3].std() > 0.01


def test_plots_write_png_files(tmp_path):
  sweep = analysis.plot_quality_vs_speedup(
      {'free': ([1.0, 1.6, 2.3], [0.80, 0.79, 0.70]), 'ce_only': ([1.0, 1.8, 2.1], [0.8, 0.7, 0.6])},
      str(tmp_path / 'nested' / 'sweep.png'), full_quality=0.8, quality_label='accuracy')
  layers = analysis.plot_per_layer_quality(
      {'naive': [0.3, 0.2, 0.5, 0.8], 'free': [0.4, 0.5, 0.7, 0.8]}, str(tmp_path / 'layers.png'),
      layers=[3, 6, 9, 12])
  hist = analysis.plot_exit_histogram([5, 0, 3, 2], str(tmp_path / 'hist.png'),
                                      labels=['L3', 'L6', 'L9', 'final'])
  for path in (sweep, layers, hist):
    _assert_png(path)


def test_plot_errors(tmp_path):
  with pytest.raises(ValueError, match="curve 'free'"):
    analysis.plot_quality_vs_speedup({'free': ([1.0, 2.0], [0.8])}, str(tmp_path / 'a.png'))
  with pytest.raises(ValueError, match="curve 'naive'"):
    analysis.plot_per_layer_quality({'naive': [0.3, 0.2]}, str(tmp_path / 'b.png'), layers=[1])
  with pytest.raises(ValueError, match='labels has 1 entries for 2 bins'):
    analysis.plot_exit_histogram([1, 2], str(tmp_path / 'c.png'), labels=['x'])
