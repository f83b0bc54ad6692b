"""A frozen BLIP-2 with what feeds it (`Backbone`), and the input format fitted to a run's data.

Shared by training, evaluation and the user-facing `free_jax.EarlyExitVLM`; imports nothing from
`free_jax.training`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import ml_collections

from free_jax import exits_io
from free_jax.data import batching, preprocess, sort_of_clevr, sources
from free_jax.models import blip2

PyTree = Any
PROBE_EXAMPLES = 2048  # examples that fix the prompt/target lengths (generated, or the first real ones)


def check(ok: bool, message: str) -> None:
  """Raises ValueError(message) unless ok: config errors are one line naming the field."""
  if not ok:
    raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A frozen BLIP-2 with what is needed to feed it.

  Attributes:
    model: the `Blip2Model`.
    params: its params.
    tokenizer: the matching tokenizer.
    fmt: how examples become its inputs (`batching.InputFormat`).
  """

  model: blip2.Blip2Model
  params: PyTree
  tokenizer: Any
  fmt: batching.InputFormat

  @property
  def num_layers(self) -> int:
    return blip2.lm_stack(self.model.config).num_layers

  @functools.cached_property
  def fingerprint(self) -> str:
    """`exits_io.fingerprint` of the params, what exits are tied to (once per object: it reads every weight)."""
    return exits_io.fingerprint(self.params)


_REAL_LENGTHS = {}  # probe key -> (prompt_length, target_length): every stage re-validates the config


def _real_text_lengths(config: ml_collections.ConfigDict, tokenizer, family: str,
                       image_size: int) -> tuple[int, int]:
  """`required_lengths` over the first training examples of a real source."""
  key = (json.dumps(config.data.to_dict(), sort_keys=True), tokenizer.name_or_path, len(tokenizer), family)
  if key not in _REAL_LENGTHS:
    probe = sources.load_examples(config, 'train', min(config.data.num_train, PROBE_EXAMPLES), image_size)
    _REAL_LENGTHS[key] = batching.required_lengths(tokenizer, family, config.data.task, probe)
  return _REAL_LENGTHS[key]


def make_input_format(config: ml_collections.ConfigDict, model_config: blip2.Blip2Config,
                      tokenizer) -> batching.InputFormat:
  """Prompt/target lengths fitted to a probe of the data, within data.max_text_length; ids from the model config.

  The embedded data is probed with a fixed generated sample and must fit. A real source is probed with
  its first training examples: prompts must fit, targets (long captions) are cut to what is left.
  A pretrained checkpoint's ``preprocessor_config.json``, if present, sets the image normalisation.
  """
  family = 't5' if model_config.is_encoder_decoder else 'opt'
  image_size = model_config.vision.image_size
  max_length = config.data.max_text_length
  if config.data.source in sources.REAL_SOURCES:
    prompt_length, target_length = _real_text_lengths(config, tokenizer, family, image_size)
    target_length = max(2, min(target_length, max_length - prompt_length))
  else:
    try:
      probe = sort_of_clevr.make_split('val', PROBE_EXAMPLES, 0, task=config.data.task, image_size=image_size)
    except ValueError as e:  # the generator draws scenes at the model's input size
      raise ValueError(f"data.source={config.data.source!r} cannot draw scenes for the model's vision config "
                       f'(image_size={image_size}): {e}') from None
    prompt_length, target_length = batching.required_lengths(tokenizer, family, config.data.task, probe)
  check(prompt_length + target_length <= max_length,
         f'data.max_text_length={max_length} is too short: prompts need {prompt_length} tokens and targets '
         f'{target_length}')
  length = model_config.num_query_tokens + prompt_length + target_length
  if not model_config.is_encoder_decoder:
    check(length <= model_config.text.max_position_embeddings,
           f'model max_position_embeddings={model_config.text.max_position_embeddings} is shorter than '
           f'the {length} tokens of image queries + prompt + target')
  image_kwargs = {}
  processor_file = os.path.join(config.model.pretrained_path, 'preprocessor_config.json')
  if config.model.source == 'pretrained' and os.path.isfile(processor_file):
    image_kwargs = preprocess.load_image_processor_config(processor_file)
    check(image_kwargs.pop('image_size') == image_size,
           f'{processor_file}: its image size differs from the vision config image_size={image_size}')
  decoder_start = model_config.text.decoder_start_token_id if model_config.is_encoder_decoder else None
  return batching.input_format(tokenizer, family, model_config.num_query_tokens, prompt_length, target_length,
                               image_size, image_token_id=model_config.image_token_index,
                               decoder_start_id=decoder_start, **image_kwargs)
