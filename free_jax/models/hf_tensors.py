"""Checked access to a Hugging Face state dict, for the per-module weight converters.

Each model file has ``params_from_hf(get: TensorSource, config) -> params`` that asks for HF tensors by
name (relative to the module's prefix, e.g. ``get.child('vision_model.')``) with the shape it expects,
and returns the Flax tree. The source records which keys were used, so the loader can report
unexpected tensors; missing keys and shape mismatches raise `WeightsError` naming the full HF key.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping

import jax
import numpy as np


# Every file an HF BLIP-2 checkpoint directory holds: config, weights (single or sharded with their index),
# processor and tokenizer files.
HF_CHECKPOINT_PATTERNS = ('*.json', '*.safetensors', '*.txt', '*.model', '*.jinja')


def read_json(path) -> dict:
  """A JSON file's contents; a damaged one is a one-line ValueError naming the file."""
  path = pathlib.Path(path)
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path}: not valid JSON ({e})') from None


class WeightsError(ValueError):
  """A checkpoint does not match the model: missing, unexpected or mis-shaped tensor."""


class TensorSource:
  """Reads named tensors from a mapping of HF names to arrays, under a key prefix."""

  def __init__(self, tensors: Mapping[str, np.ndarray], prefix: str = '', used: set[str] | None = None):
    self._tensors = tensors
    self._prefix = prefix
    self.used = set() if used is None else used

  def child(self, prefix: str) -> 'TensorSource':
    """A view of the tensors under ``self.prefix + prefix``, sharing the record of used keys."""
    return TensorSource(self._tensors, self._prefix + prefix, self.used)

  def has(self, name: str) -> bool:
    return self._prefix + name in self._tensors

  def __call__(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The HF tensor ``prefix + name`` as float numpy, checked to have the HF-layout `shape`."""
    key = self._prefix + name
    if key not in self._tensors:
      raise WeightsError(f'missing tensor {key!r} (expected shape {tuple(shape)})')
    value = np.asarray(self._tensors[key])
    if tuple(value.shape) != tuple(shape):
      raise WeightsError(f'tensor {key!r} has shape {tuple(value.shape)}, the config expects {tuple(shape)}')
    self.used.add(key)
    return value

  def unused(self) -> list[str]:
    """Keys under this source's prefix that no converter asked for."""
    return sorted(k for k in self._tensors if k.startswith(self._prefix) and k not in self.used)


def linear(get: TensorSource, name: str, in_features: int, out_features: int, bias: bool = True) -> dict:
  """An ``nn.Linear`` (weight [out, in]) as a Flax ``nn.Dense`` tree (kernel [in, out])."""
  params = {'kernel': get(f'{name}.weight', (out_features, in_features)).T}
  if bias:
    params['bias'] = get(f'{name}.bias', (out_features,))
  return params


def layer_norm(get: TensorSource, name: str, features: int, bias: bool = True) -> dict:
  """An ``nn.LayerNorm`` as a Flax ``nn.LayerNorm`` tree (scale, bias)."""
  params = {'scale': get(f'{name}.weight', (features,))}
  if bias:
    params['bias'] = get(f'{name}.bias', (features,))
  return params


def stack_layers(trees: list[dict]) -> dict:
  """Per-layer Flax trees stacked on a new leading axis (the `lm_api` stacked-layer convention)."""
  return jax.tree.map(lambda *xs: np.stack(xs), *trees)
