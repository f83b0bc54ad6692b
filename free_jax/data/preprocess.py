"""BLIP-2 image preprocessing, equal to transformers' ``BlipImageProcessor`` (PIL backend).

Contract
--------
``preprocess_images(images, image_size, mean=BLIP2_MEAN, std=BLIP2_STD, resample=BICUBIC,
rescale_factor=1/255) -> float32[B, S, S, 3]`` (S = image_size), channels-last, ready for
`free_jax.models.vit.VisionModel`.
  images: uint8[B, H, W, 3], or a list of PIL images / uint8[H, W, 3] arrays of any (mixed) sizes.
Each image is converted to RGB (transparency composited onto white, as HF does), resized to S x S with
PIL (bicubic by default), rescaled by ``rescale_factor`` and normalised per channel.

``load_image_processor_config(path)`` reads a local HF ``preprocessor_config.json`` (or the directory
holding it) and returns the keyword arguments of `preprocess_images` that the checkpoint was trained
with: ``preprocess_images(images, **load_image_processor_config(model_dir))``.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

import numpy as np
from PIL import Image

# OPENAI_CLIP_MEAN / OPENAI_CLIP_STD, the defaults of BlipImageProcessor.
BLIP2_MEAN = (0.48145466, 0.4578275, 0.40821073)
BLIP2_STD = (0.26862954, 0.26130258, 0.27577711)


def _to_rgb(image: Image.Image | np.ndarray, index: int) -> Image.Image:
  if isinstance(image, Image.Image):
    if 'A' in image.getbands() or image.info.get('transparency') is not None:
      background = Image.new('RGBA', image.size, (255, 255, 255, 255))
      return Image.alpha_composite(background, image.convert('RGBA')).convert('RGB')
    return image.convert('RGB')
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'images[{index}] is {image.dtype}{list(image.shape)}, expected uint8[H, W, 3] '
                     'or a PIL image')
  return Image.fromarray(image)


def preprocess_images(images: np.ndarray | Sequence[Image.Image | np.ndarray], image_size: int,
                      mean: Sequence[float] = BLIP2_MEAN, std: Sequence[float] = BLIP2_STD,
                      resample: int = Image.Resampling.BICUBIC,
                      rescale_factor: float = 1 / 255) -> np.ndarray:
  """Images -> float32[B, S, S, 3] normalised pixels (S = image_size), as BlipImageProcessor."""
  if len(images) == 0:
    raise ValueError('images is empty')
  resized = [_to_rgb(im, i).resize((image_size, image_size), resample=resample)
             for i, im in enumerate(images)]
  # HF rescales in float64 and casts to float32 before normalising in float32.
  pixels = (np.stack([np.asarray(im) for im in resized]).astype(np.float64) * rescale_factor)
  pixels = pixels.astype(np.float32)
  return (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def _square_size(size, where: str) -> int:
  if isinstance(size, int):
    return size
  if isinstance(size, dict) and set(size) >= {'height', 'width'} and size['height'] == size['width']:
    return int(size['height'])
  raise ValueError(f'{where}: size={size!r} is not supported; expected a square {{"height", "width"}}')


def load_image_processor_config(path: str | pathlib.Path) -> dict:
  """Reads ``preprocessor_config.json`` (or a directory holding it) -> `preprocess_images` kwargs."""
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / 'preprocessor_config.json'
  if not path.is_file():
    raise FileNotFoundError(f'no image processor config at {str(path)!r}')
  cfg = json.loads(path.read_text())
  for flag in ('do_resize', 'do_rescale', 'do_normalize'):
    if not cfg.get(flag, True):
      raise ValueError(f'{path}: {flag}=false is not supported')
  if 'size' not in cfg:
    raise ValueError(f'{path}: missing field "size"')
  return {
      'image_size': _square_size(cfg['size'], str(path)),
      'mean': tuple(cfg.get('image_mean', BLIP2_MEAN)),
      'std': tuple(cfg.get('image_std', BLIP2_STD)),
      'resample': Image.Resampling(cfg.get('resample', Image.Resampling.BICUBIC)),
      'rescale_factor': float(cfg.get('rescale_factor', 1 / 255)),
  }
