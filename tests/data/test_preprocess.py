"""BLIP-2 preprocessing equals transformers' BlipImageProcessor (PIL backend), channels-last."""

import json
import re

import numpy as np
import pytest
from PIL import Image
from transformers import BlipImageProcessorPil

from free_jax.data.preprocess import BLIP2_MEAN, BLIP2_STD, load_image_processor_config, preprocess_images


def _random_images(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, size=(*hw, 3), dtype=np.uint8) for hw in shapes]


def _hf(images, **kwargs):
  out = BlipImageProcessorPil(**kwargs)(images=images, return_tensors='np')['pixel_values']
  return out.transpose(0, 2, 3, 1)


@pytest.mark.parametrize('shapes', [[(32, 32)] * 3, [(50, 23), (17, 64)], [(224, 301)], [(7, 9)]])
def test_matches_blip_image_processor(shapes):
  images = _random_images(shapes)
  got = preprocess_images(images, image_size=24)
  assert got.dtype == np.float32 and got.shape == (len(shapes), 24, 24, 3)
  np.testing.assert_allclose(got, _hf(images, size={'height': 24, 'width': 24}), atol=1e-5, rtol=0)


def test_batch_array_and_pil_modes():
  images = _random_images([(40, 30)] * 2, seed=1)
  batch = np.stack(images)
  np.testing.assert_array_equal(preprocess_images(batch, 16), preprocess_images(images, 16))
  rgba = Image.fromarray(np.concatenate([images[0], images[1][..., :1]], axis=-1), mode='RGBA')
  gray = Image.fromarray(images[1][..., 0], mode='L')
  expected = _hf([rgba, gray], size={'height': 16, 'width': 16})
  np.testing.assert_allclose(preprocess_images([rgba, gray], 16), expected, atol=1e-5, rtol=0)


def test_load_image_processor_config_matches_hf(tmp_path):
  cfg = {'image_processor_type': 'BlipImageProcessor', 'do_resize': True, 'do_rescale': True,
         'do_normalize': True, 'size': {'height': 20, 'width': 20}, 'resample': 2,
         'image_mean': [0.5, 0.4, 0.3], 'image_std': [0.2, 0.25, 0.3], 'rescale_factor': 1 / 255}
  (tmp_path / 'preprocessor_config.json').write_text(json.dumps(cfg))
  kwargs = load_image_processor_config(tmp_path)
  assert kwargs['image_size'] == 20 and kwargs['resample'] == Image.Resampling.BILINEAR
  assert kwargs['mean'] != BLIP2_MEAN and kwargs['std'] != BLIP2_STD
  images = _random_images([(33, 47), (20, 20)], seed=2)
  hf_processor = BlipImageProcessorPil.from_pretrained(tmp_path)
  expected = hf_processor(images=images, return_tensors='np')['pixel_values'].transpose(0, 2, 3, 1)
  np.testing.assert_allclose(preprocess_images(images, **kwargs), expected, atol=1e-5, rtol=0)


def test_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='preprocessor_config.json'):
    load_image_processor_config(tmp_path)
  (tmp_path / 'preprocessor_config.json').write_text(json.dumps({'size': {'height': 20, 'width': 30}}))
  with pytest.raises(ValueError, match=re.escape("size={'height': 20, 'width': 30}")):
    load_image_processor_config(tmp_path)
  with pytest.raises(ValueError, match=re.escape('images[1] is float32[8, 8, 3]')):
    preprocess_images([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.float32)], 8)
