"""Loading HF BLIP-2 checkpoints (local directories, safetensors only) and their processors.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards
``model-0000x-of-0000y.safetensors`` listed in ``model.safetensors.index.json``. Each model file
converts its own tensors (``*_params_from_hf``) through a checked `TensorSource`; anything left over
is an error, so a checkpoint that does not match the config never loads half-right.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.flax
import safetensors.numpy
import transformers

from free_jax.models.blip2 import Blip2Config, Blip2Model
from free_jax.models.hf_tensors import TensorSource, WeightsError, linear
from free_jax.models.lm_api import PyTree
from free_jax.models.opt import OPTConfig, opt_params_from_hf
from free_jax.models.qformer import qformer_params_from_hf
from free_jax.models.t5 import t5_params_from_hf
from free_jax.models.vit import vision_params_from_hf


_SINGLE = 'model.safetensors'
_INDEX = 'model.safetensors.index.json'
# Kept in float32 whatever the load dtype, as HF's ``_keep_in_fp32_modules`` does for BLIP-2.
_FLOAT32_PARAMS = ('query_tokens', 'qformer')


def _read_safetensors(file: pathlib.Path) -> dict[str, np.ndarray]:
  """A safetensors file's tensors; one-line errors naming the file, and any tensor that is not finite floats."""
  try:
    try:
      tensors = safetensors.numpy.load_file(file)
    except TypeError:  # numpy has no bfloat16: read through JAX on the host instead.
      with jax.default_device(jax.devices('cpu')[0]):
        tensors = {k: np.asarray(v) for k, v in safetensors.flax.load_file(file).items()}
  except Exception as e:  # safetensors raises its own (Rust) error types for damaged files
    raise WeightsError(f'{file}: not a readable safetensors file ({type(e).__name__}: {e})') from None
  for name, value in tensors.items():
    if not jnp.issubdtype(value.dtype, jnp.floating):
      raise WeightsError(f'{file}: tensor {name} is {value.dtype}; BLIP-2 weights are floating point')
    if not np.all(np.isfinite(value)):
      raise WeightsError(f'{file}: tensor {name} holds NaN or inf')
  return tensors


def read_tensors(path) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint directory by HF name (single file or sharded with an index).

  Raises:
    FileNotFoundError: no safetensors weights (or a shard named by the index is missing).
    WeightsError: only a pickle checkpoint (``*.bin``) is present; it is never unpickled.
  """
  path = pathlib.Path(path)
  if (path / _INDEX).is_file():
    weight_map = json.loads((path / _INDEX).read_text())['weight_map']
    tensors = {}
    for shard in sorted(set(weight_map.values())):
      if not (path / shard).is_file():
        raise FileNotFoundError(f'{path / shard}: shard listed in {_INDEX} is missing')
      tensors.update(_read_safetensors(path / shard))
    return tensors
  if (path / _SINGLE).is_file():
    return _read_safetensors(path / _SINGLE)
  if list(path.glob('*.bin')):
    raise WeightsError(
        f'{path} has only a pickle checkpoint (*.bin), which free_jax does not unpickle; convert it once '
        'with transformers: Blip2ForConditionalGeneration.from_pretrained(path).save_pretrained(path)')
  raise FileNotFoundError(f'{path}: no {_SINGLE} or {_INDEX}')


def blip2_params_from_hf(tensors: dict[str, np.ndarray], config: Blip2Config) -> PyTree:
  """HF ``Blip2ForConditionalGeneration`` tensors -> `Blip2Model` params (numpy, HF dtypes).

  Raises:
    WeightsError: a missing, mis-shaped or unexpected tensor, naming its HF key.
  """
  get = TensorSource(tensors)
  text = config.text
  to_lm = opt_params_from_hf if isinstance(text, OPTConfig) else t5_params_from_hf
  lm_width = text.hidden_size if isinstance(text, OPTConfig) else text.d_model
  dq = config.qformer.hidden_size
  params = {
      'vision_model': vision_params_from_hf(get.child('vision_model.'), config.vision),
      'query_tokens': get('query_tokens', (1, config.num_query_tokens, dq))[0],
      'qformer': qformer_params_from_hf(get.child('qformer.'), config.qformer),
      'language_projection': linear(get, 'language_projection', dq, lm_width),
      'language_model': to_lm(get.child('language_model.'), text),
  }
  unused = get.unused()
  if unused:
    raise WeightsError(f'unexpected tensor {unused[0]!r} ({len(unused)} unexpected in all): the '
                       'checkpoint does not match its config')
  return params


def _check_tree(params: PyTree, expected: PyTree) -> None:
  """Raises WeightsError naming the first path where converted params and the model differ."""
  got = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(params)}
  want = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(expected)}
  mismatched = sorted(got.keys() ^ want.keys())
  if mismatched:
    key = mismatched[0]
    where = 'missing from the converted params' if key in want else 'not part of the model'
    raise WeightsError(f'params{key} is {where}')
  for key, shape in want.items():
    if got[key] != shape:
      raise WeightsError(f'params{key} has shape {got[key]}, the model expects {shape}')


def load_pretrained(path, dtype=jnp.float32) -> tuple[Blip2Model, PyTree]:
  """Loads a local HF BLIP-2 checkpoint (OPT or Flan-T5) as ``(model, params)``.

  Args:
    path: directory with ``config.json`` and safetensors weights (single file or sharded).
    dtype: jnp.float32 or jnp.bfloat16: the params' and the computation's dtype (the Q-Former and
      query tokens stay float32, as in HF).

  Returns:
    (`Blip2Model`, params) for ``model.apply({'params': params}, ...)``.

  Raises:
    FileNotFoundError: missing directory, config or weights. ValueError: unsupported config.
    WeightsError: the tensors do not match the config, or only a pickle checkpoint exists.
  """
  config = Blip2Config.from_pretrained(path)
  model = Blip2Model(config, dtype)
  params = blip2_params_from_hf(read_tensors(path), config)
  pixels = jnp.zeros((1, config.vision.image_size, config.vision.image_size, 3), dtype)
  ids = jnp.zeros((1, 1), jnp.int32)
  decoder = {'decoder_input_ids': ids} if config.is_encoder_decoder else {}
  expected = jax.eval_shape(lambda: model.init(jax.random.key(0), pixels, ids, **decoder))['params']
  _check_tree(params, expected)
  params = {k: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32 if k in _FLOAT32_PARAMS else dtype), v)
            for k, v in params.items()}
  return model, params


def load_tokenizer(path):
  """The checkpoint's tokenizer through transformers, offline (``local_files_only``)."""
  return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_processor(path):
  """The checkpoint's ``Blip2Processor`` (tokenizer + image processor) through transformers, offline."""
  return transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
