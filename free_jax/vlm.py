"""`EarlyExitVLM`: a BLIP-2 with trained FREE exits that answers questions about images.

    vlm = free_jax.EarlyExitVLM.load('workdir/vqa')                       # a finished training run
    vlm = free_jax.EarlyExitVLM.from_pretrained(hf_blip2_dir, exits=exits_dir)
    out = vlm.generate(images, ['what color is the only square?'])        # early exit, calibrated threshold
    out.texts, out.tokens, out.exit_layers, out.seconds
    vlm.generate(images, questions, mode='speculative')                   # identical to full greedy
    vlm.generate(images)                                                  # captions
    vlm.save_exits('my_exits')                                            # share the exits as an adapter

A training run's workdir holds what `load` needs (written by `free_jax.training.pipeline`):
``config.json`` (the resolved config), ``exits/`` (`free_jax.exits_io`), the embedded backbone as an HF
checkpoint in ``backbone/hf/`` (a pretrained one is read from ``model.pretrained_path``) and, after
evaluation, ``eval/summary.json`` (the calibrated threshold and the chosen speculative setting). No
optimizer is built and no data is read. Nothing here imports `free_jax.training`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
import ml_collections
import numpy as np
from PIL import Image

from free_jax import exits_io
from free_jax import weights
from free_jax.backbone import Backbone
from free_jax.data import batching, preprocess
from free_jax.data import tokenizer as tokenizer_lib
from free_jax.inference import confidence as conf_lib
from free_jax.inference.early_exit import EarlyExitDecoder
from free_jax.models import blip2
from free_jax.models.hf_tensors import read_json

PyTree = Any
MODES = ('early_exit', 'speculative', 'full')
CONFIG_FILE = 'config.json'
EXITS_DIR = 'exits'
HF_BACKBONE_DIR = os.path.join('backbone', 'hf')
SUMMARY_FILE = os.path.join('eval', 'summary.json')


@dataclasses.dataclass(frozen=True)
class Generation:
  """What `EarlyExitVLM.generate` returns.

  Attributes:
    texts: the decoded answers or captions (up to EOS, special tokens dropped).
    tokens: int32[B, N] generated ids (padding after EOS).
    exit_layers: int32[B, N] the LM layer each token left at (L = full depth; 0 where no token).
    seconds: {'prepare' (images -> LM inputs), 'decode', 'total'}; the first call of a shape compiles.
    mode: the decoding mode; threshold: the confidence threshold used, one for all exits or one per exit
      (None for 'full').
  """

  texts: list[str]
  tokens: np.ndarray
  exit_layers: np.ndarray
  seconds: dict
  mode: str
  threshold: float | tuple[float, ...] | None


def _as_images(images) -> list:
  """uint8 arrays (RGB or grayscale) / PIL images / file paths, one or a batch -> the list of images that
  `preprocess.preprocess_images` takes."""
  single = isinstance(images, (str, pathlib.Path, Image.Image))
  if single or (isinstance(images, np.ndarray) and images.ndim in (2, 3)):  # one image ([H, W] or [H, W, C])
    images = [images]
  images = list(images)
  if not images:
    raise ValueError('images is empty')
  out = []
  for i, image in enumerate(images):
    if isinstance(image, (str, pathlib.Path)):
      try:
        with Image.open(image) as im:
          im.load()
          image = im.copy()
      except OSError as e:
        raise ValueError(f'images[{i}]: cannot read {str(image)!r} as an image ({e})') from None
    elif isinstance(image, np.ndarray) and (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 1)):
      image = np.repeat(image.reshape(*image.shape[:2], 1), 3, axis=-1)  # grayscale: the same in every channel
    out.append(image)
  return out


def _unknown_words(tokenizer, texts: Sequence[str]) -> list[tuple[int, str]]:
  """(row, word) of every span of `texts` the tokenizer can only read as its unknown token."""
  unk = tokenizer.unk_token_id
  if unk is None:
    return []
  encoded = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
  return [(row, text[a:b]) for row, (text, ids, offsets) in enumerate(zip(texts, encoded['input_ids'],
                                                                          encoded['offset_mapping']))
          for i, (a, b) in zip(ids, offsets) if i == unk]


def _check_questions(questions, num_images: int, tokenizer) -> list[str]:
  """The questions as a list; a one-line ValueError for a non-string, an empty one, a count that differs from
  the images' or a word the tokenizer does not know (with the nearest word it knows)."""
  if isinstance(questions, str):
    questions = [questions]
  questions = list(questions)
  for i, question in enumerate(questions):
    if not isinstance(question, str):
      raise ValueError(f'questions[{i}] is {type(question).__name__} {question!r}, expected a string')
    if not question.strip():
      raise ValueError(f'questions[{i}] is empty')
  if len(questions) != num_images:
    raise ValueError(f'{len(questions)} questions for {num_images} images')
  unknown = _unknown_words(tokenizer, questions)
  if unknown:
    row, word = unknown[0]
    vocab = [w for w in tokenizer.get_vocab() if w.isalpha()]
    nearest = difflib.get_close_matches(word.lower(), vocab, n=1)
    hint = f" (did you mean {nearest[0]!r}?)" if nearest else ''
    raise ValueError(f'questions[{row}]: {word!r} is not in the tokenizer\'s vocabulary{hint}; the model would read '
                     'it as an unknown token')
  return questions


class EarlyExitVLM:
  """A frozen BLIP-2 backbone (OPT or Flan-T5) with FREE exits; see the module docstring."""

  def __init__(self, backbone: Backbone, exit_params: PyTree, meta: exits_io.ExitsMeta, *,
               max_new_tokens: int = 32, prefill: str = 'full', propagation: str = 'recompute'):
    """Use `load` or `from_pretrained`. `exit_params` in the stacked form (`free_jax.exits`)."""
    model = backbone.model
    self.backbone, self.meta = backbone, meta
    self.stack = blip2.lm_stack(model.config, model.dtype)
    self.family = 't5' if model.config.is_encoder_decoder else 'opt'
    self.exit_layers = tuple(meta.exit_layers)
    self.max_new_tokens, self.prefill, self.propagation = max_new_tokens, prefill, propagation
    self._exit_params = exit_params
    self._decoders: dict = {}
    probe = EarlyExitDecoder(self.stack, self.exit_layers, max_new_tokens=1, eos_token_id=None)
    self._lm_params, self._decode_exit_params = probe.prepare(
        backbone.params['language_model'], jax.tree.map(jnp.asarray, exit_params))
    self._inputs = jax.jit(lambda p, image, ids, mask: model.apply({'params': p}, image, ids, mask,
                                                                   method='decoder_inputs'))

  # --- loading ------------------------------------------------------------------------------------

  @classmethod
  def from_pretrained(cls, backbone_dir, exits=None, dtype=jnp.float32, **settings) -> 'EarlyExitVLM':
    """An HF-format BLIP-2 directory plus a `save_exits` directory (refused if made for another backbone).

    Without `exits`, only mode='full' can generate (the exits directory carries the exit layers).
    """
    model, params = weights.load_pretrained(backbone_dir, dtype)
    tokenizer = weights.load_tokenizer(backbone_dir)
    image_kwargs = {}
    processor_file = pathlib.Path(backbone_dir) / 'preprocessor_config.json'
    if processor_file.is_file():
      image_kwargs = preprocess.load_image_processor_config(processor_file)
      image_kwargs.pop('image_size')
    family = 't5' if model.config.is_encoder_decoder else 'opt'
    decoder_start = model.config.text.decoder_start_token_id if family == 't5' else None
    # Prompt lengths are set per `generate` call; this format carries the ids and image settings.
    fmt = batching.input_format(tokenizer, family, model.config.num_query_tokens, 2, 2,
                                model.config.vision.image_size, image_token_id=model.config.image_token_index,
                                decoder_start_id=decoder_start, **image_kwargs)
    backbone = Backbone(model, params, tokenizer, fmt)
    num_layers = blip2.lm_stack(model.config).num_layers
    if exits is None:
      exit_params, meta = None, exits_io.ExitsMeta((), num_layers, family, '')
    else:
      exit_params, meta = exits_io.load_exits(exits)
      exits_io.check_backbone(meta, num_layers, family, backbone.fingerprint, str(exits))
    return cls(backbone, exit_params, meta, **{**meta.decoding, **settings})

  @classmethod
  def load(cls, workdir, dtype=jnp.float32) -> 'EarlyExitVLM':
    """The finished training run in `workdir`, with its calibrated threshold and decoding settings."""
    workdir = pathlib.Path(workdir)
    if not workdir.is_dir():
      raise FileNotFoundError(f'workdir {str(workdir)!r} is not a directory')
    if not (workdir / CONFIG_FILE).is_file():
      raise FileNotFoundError(f'no training run in {str(workdir)!r} ({CONFIG_FILE} missing): run experiments/train.py first')
    config = ml_collections.ConfigDict(read_json(workdir / CONFIG_FILE))
    backbone_dir = (config.model.pretrained_path if config.model.source == 'pretrained'
                    else workdir / HF_BACKBONE_DIR)
    if not (workdir / EXITS_DIR).is_dir():
      raise FileNotFoundError(f'{workdir / EXITS_DIR} not found: the exits of {workdir} are not trained yet '
                              '(run experiments/train.py)')
    e = config.eval
    vlm = cls.from_pretrained(backbone_dir, exits=workdir / EXITS_DIR, dtype=dtype, max_new_tokens=e.max_new_tokens,
                              prefill=e.prefill, propagation=e.propagation)
    vlm.meta = dataclasses.replace(vlm.meta, decoding={'max_new_tokens': e.max_new_tokens, 'prefill': e.prefill,
                                                       'propagation': e.propagation},
                                   task=vlm.meta.task or config.data.task)
    summary = read_json(workdir / SUMMARY_FILE) if (workdir / SUMMARY_FILE).is_file() else None
    if summary is not None and summary.get('exits_digest') != vlm.meta.digest:
      logging.warning('%s evaluates other exits than %s: its threshold is not used', workdir / SUMMARY_FILE,
                      workdir / EXITS_DIR)
      summary = None
    if summary is not None:
      speculative = summary.get('speculative')
      vlm.meta = dataclasses.replace(
          vlm.meta, threshold=float(summary['threshold']), confidence=summary['confidence'],
          speculative={k: speculative[k] for k in ('draft_exit', 'max_draft')} if speculative else None)
    return vlm

  def save_exits(self, directory, overwrite: bool = False) -> pathlib.Path:
    """The exits as an adapter (`free_jax.exits_io`): safetensors + exit layers, backbone fingerprint,
    calibrated threshold and speculative setting."""
    if self._exit_params is None:
      raise ValueError('this EarlyExitVLM has no exits to save (loaded without exits=)')
    meta = dataclasses.replace(self.meta, backbone_fingerprint=self.backbone.fingerprint,
                               decoding={'max_new_tokens': self.max_new_tokens, 'prefill': self.prefill,
                                         'propagation': self.propagation})
    return exits_io.save_exits(directory, self._exit_params, meta, overwrite=overwrite)

  # --- generation ---------------------------------------------------------------------------------

  @property
  def exit_params(self) -> PyTree:
    """The exit params, stacked form (`free_jax.exits`)."""
    return self._exit_params

  @property
  def threshold(self) -> float | None:
    """The calibrated confidence threshold of the exits (None if the run was not evaluated)."""
    return self.meta.threshold

  def _decoder(self, mode: str, max_new_tokens: int) -> EarlyExitDecoder:
    key = (mode, max_new_tokens)
    if key not in self._decoders:
      tok = self.backbone.tokenizer
      common = dict(max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
      if mode == 'full':
        decoder = EarlyExitDecoder(self.stack, (), **common)
      else:
        spec = self.meta.speculative or {'draft_exit': 0, 'max_draft': 4}
        extra = dict(mode='speculative', **spec) if mode == 'speculative' else {}
        decoder = EarlyExitDecoder(self.stack, self.exit_layers, confidence=self.meta.confidence,
                                   prefill=self.prefill, propagation=self.propagation, **common, **extra)
      self._decoders[key] = decoder
    return self._decoders[key]

  def generate(self, images, questions: Sequence[str] | None = None, mode: str = 'early_exit',
               threshold: float | None = None, max_new_tokens: int | None = None) -> Generation:
    """Answers `questions` about `images` (or captions them when `questions` is None).

    Args:
      images: uint8[B, H, W, 3] (any size: resized and normalised as the backbone's image processor does),
        a list of such arrays or PIL images, or image file paths.
      questions: B strings, or None for captions.
      mode: 'early_exit' (stop at the first confident exit), 'speculative' (exits draft, the full model
        verifies: exactly the full model's greedy output) or 'full'.
      threshold: confidence threshold; None = the run's calibrated one.
      max_new_tokens: default the run's ``eval.max_new_tokens``.
    """
    if mode not in MODES:
      raise ValueError(f'mode={mode!r}; expected one of {MODES}')
    if mode != 'full' and not self.exit_layers:
      raise ValueError(f"mode={mode!r} needs exits: load them with from_pretrained(..., exits=DIR), or use mode='full'")
    task = 'caption' if questions is None else 'vqa'
    self._check_task(task, mode, max_new_tokens)
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                       or max_new_tokens < 1):
      raise ValueError(f'max_new_tokens={max_new_tokens!r} must be a positive integer')
    if threshold is None and mode != 'full':
      threshold = self.meta.threshold
      if threshold is None:
        threshold = 0.0 if mode == 'speculative' else None  # lossless whatever it is: draft every round
      if threshold is None:
        raise ValueError('these exits have no calibrated threshold (the run was not evaluated): pass threshold=')
    thresholds = None if mode == 'full' else conf_lib.validate_thresholds(threshold, len(self.exit_layers))
    images = _as_images(images)
    if questions is not None:
      questions = _check_questions(questions, len(images), self.backbone.tokenizer)
    n = self.max_new_tokens if max_new_tokens is None else max_new_tokens
    start = time.perf_counter()
    tok, fmt = self.backbone.tokenizer, self.backbone.fmt
    prompts = batching.prompts(self.family, task, questions, len(images))
    length = max(2, max(len(ids) for ids in tok(prompts)['input_ids']))
    if self.stack.max_positions is not None:  # OPT: image tokens, prompt and answer share the learned positions
      room = self.stack.max_positions - fmt.num_query_tokens - length
      if n > room:
        raise ValueError(f'max_new_tokens={n} does not fit: the LM has {self.stack.max_positions} positions, '
                         f'{fmt.num_query_tokens} image tokens and a {length}-token prompt leave {room}')
    # Buckets of 8: fewer compiles (padding takes no position: positions count real tokens).
    fmt = dataclasses.replace(fmt, prompt_length=-(-length // 8) * 8)
    examples = {'image': images} if questions is None else {'image': images, 'question': list(questions)}
    batch = batching.generation_batch(examples, tok, fmt, task)
    prompt, valid, encoder = self._inputs(self.backbone.params, batch['image'], batch['input_ids'],
                                          batch['attention_mask'])
    jax.block_until_ready(prompt)
    prepared = time.perf_counter()
    decoder = self._decoder(mode, n)
    exit_params = self._decode_exit_params if mode != 'full' else None
    setting = {} if mode == 'full' else {'thresholds': thresholds}
    out = jax.device_get(decoder(self._lm_params, exit_params, prompt, np.asarray(valid), encoder=encoder, **setting))
    done = time.perf_counter()
    depth = np.asarray((*decoder.exit_layers, self.stack.num_layers))
    exit_layers = np.where(out.exit_index >= 0, depth[np.clip(out.exit_index, 0, None)], 0).astype(np.int32)
    return Generation(texts=tokenizer_lib.decode(tok, out.tokens), tokens=np.asarray(out.tokens), exit_layers=exit_layers,
                      seconds={'prepare': prepared - start, 'decode': done - prepared, 'total': done - start},
                      mode=mode, threshold=None if mode == 'full' else
                      float(threshold) if np.ndim(threshold) == 0 else tuple(float(t) for t in thresholds))

  def _check_task(self, task: str, mode: str, max_new_tokens: int | None) -> None:
    """Exits trained and calibrated for one task are not used for the other (nor its length settings)."""
    trained = self.meta.task
    if trained is None or trained == task:
      return
    how = ('load a caption run (python experiments/train.py --config=experiments/configs/caption.py, then '
           'EarlyExitVLM.load(its workdir))' if task == 'caption' else 'load a VQA run')
    if mode != 'full':
      raise ValueError(f"these exits were trained and calibrated for {trained!r}, not {task!r}: {how}, or use "
                       "mode='full' with max_new_tokens=")
    if max_new_tokens is None:
      raise ValueError(f'max_new_tokens defaults to the {trained!r} run\'s {self.max_new_tokens}: pass max_new_tokens= '
                       f'for {task!r} with mode=\'full\', or {how}')
