"""Writing a `Blip2Model` as a local HF BLIP-2 checkpoint: the inverse of `free_jax.weights.load_pretrained`.

``save_pretrained(model, params, directory, tokenizer)`` writes what transformers'
``Blip2ForConditionalGeneration.save_pretrained`` (and ``Blip2Processor.save_pretrained``) would:

* ``config.json``: an HF ``Blip2Config`` (vision / Q-Former / OPT or T5 text sub-configs,
  ``num_query_tokens``, ``image_token_index``) that reads back as the same `Blip2Config`;
  ``generation_config.json`` as HF derives it from that config.
* ``model.safetensors`` (or shards ``model-0000i-of-0000n.safetensors`` with
  ``model.safetensors.index.json`` when ``max_shard_size`` is given): HF tensor names and layouts, in
  the params' dtypes. A tied LM head is omitted, as HF does; an untied one is written.
* ``preprocessor_config.json``: a default BLIP-2 ``BlipImageProcessor`` at the vision image size
  (or the given ``image_processor``), which `free_jax.data.preprocess` and transformers both read.
* With a tokenizer: its files, and ``processor_config.json``, so ``free_jax.load_tokenizer`` and
  ``free_jax.load_processor`` (``Blip2Processor``) work on the directory.

The tensor layouts are not written out by hand: `blip2_params_to_hf` runs the loaders' own
``*_params_from_hf`` converters on symbolic tensors, which record how each Flax leaf is built from HF
tensors (transposes, reshapes, layer stacking, indexing), and inverts that record. So the exporter
follows the loaders' naming and layouts by construction, and ``load_pretrained`` reads every leaf back
bit-exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
import safetensors.numpy
import transformers

from free_jax import owned_dir
from free_jax.models.blip2 import Blip2Config, Blip2Model
from free_jax.models.hf_tensors import HF_CHECKPOINT_PATTERNS, TensorSource, linear
from free_jax.models.lm_api import PyTree
from free_jax.models.opt import OPTConfig, opt_params_from_hf
from free_jax.models.qformer import qformer_params_from_hf
from free_jax.models.t5 import t5_params_from_hf
from free_jax.models.vit import vision_params_from_hf

_SINGLE = 'model.safetensors'
_INDEX = 'model.safetensors.index.json'
_SHARD = 'model-{:05d}-of-{:05d}.safetensors'
# Files whose presence makes a directory a checkpoint that only `overwrite=True` replaces.
# Our config field -> its HF name, where they differ (everything else is named as in HF).
_HF_FIELD_NAMES = {OPTConfig: {'remove_final_layer_norm': '_remove_final_layer_norm'}}
_IMAGE_TOKEN = '<image>'  # what `Blip2Processor` uses for a tokenizer without an ``image_token``.


# ---------------------------------------------------------------------------------------------------
# Tensors: the loaders' converters, run on symbolic tensors and inverted.


class _Symbol:
  """A symbolic array: a record of how a converter builds a Flax leaf from HF tensors.

  Supports exactly the (invertible) operations the converters use: ``.T``, ``.reshape``,
  ``np.transpose``, ``[0]`` on a leading axis of size 1 and ``np.stack``. Anything else raises, so a
  converter that starts doing something new fails loudly here instead of exporting wrong tensors.
  """

  def __init__(self, shape):
    self.shape = tuple(int(s) for s in shape)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def T(self) -> '_Symbol':  # pylint: disable=invalid-name
    return _Transposed(self, tuple(reversed(range(self.ndim))))

  def transpose(self, *axes) -> '_Symbol':
    axes = axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
    return _Transposed(self, tuple(axes) if axes else tuple(reversed(range(self.ndim))))

  def reshape(self, *shape) -> '_Symbol':
    shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    return _Reshaped(self, shape)

  def __getitem__(self, index) -> '_Symbol':
    if not (isinstance(index, int) and index in (0, -1) and self.ndim and self.shape[0] == 1):
      raise TypeError(f'indexing [{index!r}] of a {self.shape} tensor is not invertible; save_pretrained '
                      'supports [0] on a leading axis of size 1')
    return _Indexed(self)

  def __array_function__(self, func, types, args, kwargs):
    if func is np.stack:
      arrays, axis = _args(args, kwargs, 'arrays', ('axis', 0))
      return _Stacked(tuple(arrays), axis)
    if func is np.transpose:
      a, axes = _args(args, kwargs, 'a', ('axes', None))
      return a.transpose(*(() if axes is None else (tuple(axes),)))
    raise TypeError(f'{func.__module__}.{func.__name__} in a *_params_from_hf converter: save_pretrained '
                    'cannot invert it (supported: .T, reshape, np.transpose, np.stack, [0])')

  def __array__(self, *args, **kwargs):
    raise TypeError('a *_params_from_hf converter turned a tensor into an array; save_pretrained cannot '
                    'invert that')

  def scatter(self, value: np.ndarray, out: dict[str, np.ndarray]) -> None:
    """Writes the HF tensors this symbol was built from, given the symbol's `value`, into `out`."""
    raise NotImplementedError


def _args(args, kwargs, first, *rest):
  values = [args[0] if args else kwargs[first]]
  for i, (name, default) in enumerate(rest, 1):
    values.append(args[i] if len(args) > i else kwargs.get(name, default))
  return values


class _Tensor(_Symbol):

  def __init__(self, key: str, shape):
    super().__init__(shape)
    self.key = key

  def scatter(self, value, out):
    if self.key in out and not np.array_equal(out[self.key], value):
      raise ValueError(f'params give two different values for the HF tensor {self.key!r}')
    out[self.key] = value


class _Transposed(_Symbol):

  def __init__(self, source: _Symbol, axes: tuple[int, ...]):
    super().__init__(tuple(source.shape[a] for a in axes))
    self.source, self.axes = source, axes

  def scatter(self, value, out):
    self.source.scatter(np.transpose(value, np.argsort(self.axes)), out)


class _Reshaped(_Symbol):

  def __init__(self, source: _Symbol, shape):
    shape = tuple(int(s) for s in shape)
    if -1 in shape:
      known = math.prod(s for s in shape if s != -1)
      shape = tuple(math.prod(source.shape) // known if s == -1 else s for s in shape)
    if math.prod(shape) != math.prod(source.shape):
      raise ValueError(f'cannot reshape a {source.shape} tensor to {shape}')
    super().__init__(shape)
    self.source = source

  def scatter(self, value, out):
    self.source.scatter(value.reshape(self.source.shape), out)


class _Indexed(_Symbol):

  def __init__(self, source: _Symbol):
    super().__init__(source.shape[1:])
    self.source = source

  def scatter(self, value, out):
    self.source.scatter(value[None], out)


class _Stacked(_Symbol):

  def __init__(self, sources: tuple[_Symbol, ...], axis: int):
    shapes = {s.shape for s in sources}
    if len(shapes) != 1:
      raise ValueError(f'np.stack of tensors with different shapes {sorted(shapes)}')
    (shape,) = shapes
    axis = axis % (len(shape) + 1)
    super().__init__((*shape[:axis], len(sources), *shape[axis:]))
    self.sources, self.axis = sources, axis

  def scatter(self, value, out):
    value = np.moveaxis(value, self.axis, 0)
    for source, part in zip(self.sources, value):
      source.scatter(part, out)


class _SymbolicSource(TensorSource):
  """A `TensorSource` that hands out a `_Tensor` for every name asked for and holds nothing else.

  ``has()`` is False for every name, so optional copies (a tied LM head, T5's aliases) are not
  requested, and the export holds exactly the tensors HF's own ``save_pretrained`` writes.
  """

  def __init__(self, prefix: str = '', used: set[str] | None = None):
    super().__init__({}, prefix, used)

  def child(self, prefix: str) -> '_SymbolicSource':
    return _SymbolicSource(self._prefix + prefix, self.used)

  def __call__(self, name: str, shape: tuple[int, ...]) -> _Symbol:
    key = self._prefix + name
    self.used.add(key)
    return _Tensor(key, shape)


def _symbolic_params(config: Blip2Config) -> PyTree:
  """The param tree of `config` as symbols, built as `free_jax.weights.blip2_params_from_hf` does."""
  get = _SymbolicSource()
  text = config.text
  to_lm = opt_params_from_hf if isinstance(text, OPTConfig) else t5_params_from_hf
  lm_width = text.hidden_size if isinstance(text, OPTConfig) else text.d_model
  dq = config.qformer.hidden_size
  return {
      'vision_model': vision_params_from_hf(get.child('vision_model.'), config.vision),
      'query_tokens': get('query_tokens', (1, config.num_query_tokens, dq))[0],
      'qformer': qformer_params_from_hf(get.child('qformer.'), config.qformer),
      'language_projection': linear(get, 'language_projection', dq, lm_width),
      'language_model': to_lm(get.child('language_model.'), text),
  }


def _pair_leaves(symbols: PyTree, params: PyTree, path: str = ''):
  """Yields (path, symbol, param) pairs; ValueError naming the first path where the trees differ."""
  if isinstance(symbols, _Symbol):
    if isinstance(params, Mapping):
      raise ValueError(f'params{path} is a subtree, the model expects an array of shape {symbols.shape}')
    shape = tuple(np.shape(params))
    if shape != symbols.shape:
      raise ValueError(f'params{path} has shape {shape}, the model expects {symbols.shape}')
    yield path, symbols, params
    return
  if not isinstance(params, Mapping):
    raise ValueError(f'params{path} is an array, the model expects a subtree')
  for key in sorted(symbols.keys() | params.keys()):
    if key not in params:
      raise ValueError(f"params{path}['{key}'] is missing")
    if key not in symbols:
      raise ValueError(f"params{path}['{key}'] is not part of the model")
    yield from _pair_leaves(symbols[key], params[key], f"{path}['{key}']")


def blip2_params_to_hf(params: PyTree, config: Blip2Config) -> dict[str, np.ndarray]:
  """`Blip2Model` params -> HF ``Blip2ForConditionalGeneration`` tensors (numpy, params' dtypes).

  The exact inverse of `free_jax.weights.blip2_params_from_hf` (arrays may be views, not contiguous).

  Raises:
    ValueError: params do not match the config (names the first mismatched path), or are not floats.
  """
  out: dict[str, np.ndarray] = {}
  for path, symbol, value in _pair_leaves(_symbolic_params(config), params):
    value = np.asarray(value)
    if not jnp.issubdtype(value.dtype, jnp.floating):  # np.floating misses bfloat16
      raise ValueError(f'params{path} has dtype {value.dtype}, expected a float dtype')
    symbol.scatter(value, out)
  return out


# ---------------------------------------------------------------------------------------------------
# Config, processor and files.


def _hf_fields(cfg) -> dict[str, Any]:
  renames = _HF_FIELD_NAMES.get(type(cfg), {})
  return {renames.get(f.name, f.name): getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def hf_blip2_config(config: Blip2Config, dtype=None) -> transformers.Blip2Config:
  """The transformers ``Blip2Config`` that `Blip2Config.from_hf` reads back as `config`.

  Args:
    config: our config.
    dtype: recorded as the checkpoint's ``dtype`` (e.g. 'float32' or 'bfloat16'); None leaves it out.

  Raises:
    ValueError: `config` has no HF equivalent (the Q-Former's encoder_hidden_size differs from the
      vision hidden size, which HF's Blip2Config overrides) or does not read back identically.
  """
  if config.qformer.encoder_hidden_size != config.vision.hidden_size:
    raise ValueError(f'qformer.encoder_hidden_size={config.qformer.encoder_hidden_size} differs from '
                     f'vision.hidden_size={config.vision.hidden_size}; an HF Blip2Config cannot express that')
  text_type = 'opt' if isinstance(config.text, OPTConfig) else 't5'
  kwargs = {} if dtype is None else {'dtype': np.dtype(dtype).name}
  hf_config = transformers.Blip2Config(
      vision_config=_hf_fields(config.vision), qformer_config=_hf_fields(config.qformer),
      text_config={'model_type': text_type, **_hf_fields(config.text)},
      num_query_tokens=config.num_query_tokens, image_token_index=config.image_token_index,
      architectures=['Blip2ForConditionalGeneration'], **kwargs)
  back = Blip2Config.from_hf(hf_config)
  if back != config:
    diff = [f'{part}.{f.name}' for part in ('vision', 'qformer', 'text')
            for f in dataclasses.fields(getattr(config, part))
            if getattr(getattr(config, part), f.name) != getattr(getattr(back, part), f.name)]
    raise ValueError('the HF config does not read back as the model config (differs in '
                     f'{diff or "top level"})')
  return hf_config


def _image_processor(config: Blip2Config, image_processor):
  size = config.vision.image_size
  if image_processor is None:  # BLIP-2's: bicubic resize, CLIP mean/std (free_jax.data.preprocess's defaults)
    return transformers.BlipImageProcessor(size={'height': size, 'width': size})
  got = image_processor.size
  got = (got.get('height'), got.get('width')) if isinstance(got, Mapping) else (got, got)
  if got != (size, size):
    raise ValueError(f'image_processor.size={image_processor.size!r} differs from the vision '
                     f'image_size={size}')
  return image_processor


def _check_tokenizer(config: Blip2Config, tokenizer) -> None:
  if len(tokenizer) > config.text.vocab_size:
    raise ValueError(f'the tokenizer has {len(tokenizer)} tokens, more than the model vocab_size='
                     f'{config.text.vocab_size}')
  token = getattr(tokenizer, 'image_token', None) or _IMAGE_TOKEN
  token_id = tokenizer.get_vocab().get(str(token))
  if token_id != config.image_token_index:
    raise ValueError(f'the tokenizer\'s image token {str(token)!r} has id {token_id}, the model config has '
                     f'image_token_index={config.image_token_index}')


def _shard_bytes(max_shard_size) -> int:
  """Bytes of ``max_shard_size``: an int, or a string like '5GB' (10**9) / '500MiB' (2**20)."""
  if isinstance(max_shard_size, int) and not isinstance(max_shard_size, bool):
    size = max_shard_size
  else:
    match = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([KMGT]I?)?B\s*', str(max_shard_size).upper())
    if not match:
      raise ValueError(f'max_shard_size={max_shard_size!r}: expected bytes or a size like "5GB" or "500MiB"')
    unit = match.group(2) or ''
    base = 1024 if unit.endswith('I') else 1000
    size = int(float(match.group(1)) * base ** ('KMGT'.index(unit[0]) + 1 if unit else 0))
  if size <= 0:
    raise ValueError(f'max_shard_size={max_shard_size!r} must be positive')
  return size


def _write_tensors(tensors: dict[str, np.ndarray], directory: pathlib.Path, max_shard_size) -> None:
  """HF's layout: one ``model.safetensors``, or shards of at most `max_shard_size` with an index."""
  metadata = {'format': 'pt'}  # what transformers writes and checks
  if max_shard_size is None:
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in sorted(tensors.items())},
                                directory / _SINGLE, metadata=metadata)
    return
  limit = _shard_bytes(max_shard_size)
  shards: list[list[str]] = [[]]
  size = 0
  for key in sorted(tensors):  # a tensor larger than the limit gets a shard of its own, as in HF
    nbytes = tensors[key].nbytes
    if shards[-1] and size + nbytes > limit:
      shards.append([])
      size = 0
    shards[-1].append(key)
    size += nbytes
  weight_map = {}
  for i, keys in enumerate(shards, 1):
    name = _SHARD.format(i, len(shards))
    safetensors.numpy.save_file({k: np.ascontiguousarray(tensors[k]) for k in keys}, directory / name,
                                metadata=metadata)
    weight_map.update(dict.fromkeys(keys, name))
  index = {'metadata': {'total_size': sum(v.nbytes for v in tensors.values())}, 'weight_map': weight_map}
  (directory / _INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + '\n')


CHECKPOINT_OUTPUT = owned_dir.Output('an HF checkpoint', 'config.json', HF_CHECKPOINT_PATTERNS)


def save_pretrained(model: Blip2Model, params: PyTree, directory, tokenizer=None, *,
                    image_processor=None, max_shard_size: int | str | None = None,
                    overwrite: bool = False) -> pathlib.Path:
  """Writes `model` and `params` as a local HF BLIP-2 checkpoint (see the module docstring).

  ``free_jax.load_pretrained(directory, dtype)`` reads the params back bit-exactly (for the dtype they
  were saved in), and transformers' ``Blip2ForConditionalGeneration.from_pretrained(directory)`` loads
  it with no missing or unexpected weights.

  The checkpoint is written to a temporary sibling directory and renamed into place, so an error
  never leaves a partial checkpoint behind (an existing one stays as it was).

  Args:
    model: the `Blip2Model` (its config is saved).
    params: its params, float32 or bfloat16 (e.g. from `load_pretrained` or training), saved in their
      own dtypes (the Q-Former and query tokens of a bfloat16 `load_pretrained` model stay float32).
    directory: the checkpoint directory to create; its parent is created if needed.
    tokenizer: optional transformers tokenizer to save with a ``Blip2Processor``; its image token
      (``tokenizer.image_token`` or '<image>') must have the config's ``image_token_index``.
    image_processor: optional transformers image processor to save; default BLIP-2's
      ``BlipImageProcessor`` at the vision image size (what `free_jax.data.preprocess` computes).
    max_shard_size: None for a single ``model.safetensors``; bytes or a size like '2GB' for shards
      with an index, as HF writes them.
    overwrite: replace `directory` if it already holds a checkpoint (the whole directory is replaced).
      A non-empty directory that holds anything else is never replaced (`owned_dir`).

  Returns:
    The checkpoint directory.

  Raises:
    FileExistsError: `directory` holds a checkpoint and not `overwrite`, or holds other files.
    ValueError: params do not match the model, or the tokenizer / image processor do not match it.
  """
  config = model.config
  owned_dir.check_target(directory, CHECKPOINT_OUTPUT, overwrite)  # before converting anything
  tensors = blip2_params_to_hf(params, config)
  lm_dtype = tensors['language_projection.weight'].dtype
  hf_config = hf_blip2_config(config, lm_dtype)
  processor_image = _image_processor(config, image_processor)
  if tokenizer is not None:
    _check_tokenizer(config, tokenizer)
  if max_shard_size is not None:
    _shard_bytes(max_shard_size)

  def write(tmp: pathlib.Path) -> None:
    hf_config.save_pretrained(tmp)
    transformers.GenerationConfig.from_model_config(hf_config).save_pretrained(tmp)
    processor_image.save_pretrained(tmp)  # preprocessor_config.json
    if tokenizer is not None:
      # The processor sets attributes on (and may add '<image>' to) its tokenizer: give it a copy.
      processor = transformers.Blip2Processor(processor_image, copy.deepcopy(tokenizer),
                                              num_query_tokens=config.num_query_tokens)
      processor.save_pretrained(tmp)
    _write_tensors(tensors, tmp, max_shard_size)

  return owned_dir.write_directory(directory, CHECKPOINT_OUTPUT, write, overwrite)
