"""`train_and_evaluate(config, workdir)`: the whole FREE run, callable from a notebook or `experiments/train.py`.

Stages (each resumable, each skipped when its result is already in the workdir):

1. Backbone (`backbone_stage`). ``model.source='embedded'``: a tiny BLIP-2 (``config.model.embedded``)
   over the embedded tokenizer's vocabulary, trained end to end with CE on the embedded task (plus the
   grounding loss of `free_jax.training.grounding` on the image prefix, and caption steps) and
   checkpointed in ``workdir/backbone/`` (orbax); a finished backbone is restored, never retrained.
   ``model.source='pretrained'``: `free_jax.load_pretrained` from ``model.pretrained_path``.
2. FREE exits (`exit_stage`): the adversarial step (`free_step`) on the frozen backbone; orbax
   checkpoints (exits, discriminators, optimizer states, step and data position) in
   ``workdir/checkpoints/``, metrics in ``workdir/metrics.jsonl`` and TensorBoard.
3. Evaluation (`evaluate_stage`): teacher-forced accuracy of the backbone and of every exit on the
   test split, per question type, written to ``workdir/train_eval.json`` and printed as a table.
   Further evaluators (the early-exit decoder) plug in through ``train_and_evaluate(evaluators=...)``.

Every config error is raised by `validate_config` before anything is built or compiled.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from free_jax import configs
from free_jax.backbone import PROBE_EXAMPLES, Backbone, check, make_input_format
from free_jax import exits as exits_lib
from free_jax import exits_io, shipped, vlm, workdir_lock
from free_jax.data import batching, sort_of_clevr, sources
from free_jax.data import tokenizer as tokenizer_lib
from free_jax.eval import evaluator, teacher_scores
from free_jax.models import blip2
from free_jax.models.opt import OPTConfig
from free_jax.models.qformer import QFormerConfig
from free_jax.models.vit import VisionConfig
from free_jax.training import (backbone_step, checkpoint, distributed, free_step, frozen_features, grounding, growth,
                               hidden_labels, optim, parallel, sharding)
from free_jax.training import state as state_lib
from free_jax.training import logging as metrics_logging

PyTree = Any
EVAL_FILE = 'train_eval.json'
BACKBONE_DIR = 'backbone'
CHECKPOINT_DIR = 'checkpoints'
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# Part of the backbone cache key: bump it when code changes what stage 1 trains for the same config
# (2: sin-cos ViT position init, the grounding loss and caption steps; 3: relational questions unambiguous on the
# lattice, its own 'backbone' data split; 4: the lookup/relational default question set), so a stale cached
# backbone is never reused.
BACKBONE_VERSION = 4


# ---------------------------------------------------------------------------------------------------
# Configuration.


def embedded_model_config(e: ml_collections.ConfigDict, tokenizer) -> blip2.Blip2Config:
  """The tiny BLIP-2 of ``config.model.embedded`` over `tokenizer`'s vocabulary."""
  return blip2.Blip2Config(
      vision=VisionConfig(hidden_size=e.vision_hidden, intermediate_size=4 * e.vision_hidden,
                          num_hidden_layers=e.vision_layers, num_attention_heads=e.vision_heads,
                          image_size=e.image_size, patch_size=e.patch_size),
      qformer=QFormerConfig(hidden_size=e.qformer_hidden, num_hidden_layers=e.qformer_layers,
                            num_attention_heads=e.qformer_heads, intermediate_size=4 * e.qformer_hidden,
                            cross_attention_frequency=1, encoder_hidden_size=e.vision_hidden),
      text=OPTConfig(vocab_size=len(tokenizer), hidden_size=e.lm_hidden, num_hidden_layers=e.lm_layers,
                     num_attention_heads=e.lm_heads, ffn_dim=e.lm_ffn, max_position_embeddings=e.max_positions,
                     word_embed_proj_dim=e.lm_hidden, pad_token_id=tokenizer.pad_token_id,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
      num_query_tokens=e.num_query_tokens,
      image_token_index=tokenizer.convert_tokens_to_ids(tokenizer_lib.IMAGE))


def _tokenizer(config: ml_collections.ConfigDict):
  if config.model.source == 'pretrained':
    return tokenizer_lib.load_tokenizer(config.model.pretrained_path)
  return tokenizer_lib.embedded_tokenizer('opt')


def _model_config(config: ml_collections.ConfigDict) -> blip2.Blip2Config:
  if config.model.source == 'pretrained':
    return blip2.Blip2Config.from_pretrained(config.model.pretrained_path)
  return embedded_model_config(config.model.embedded, _tokenizer(config))


def validate_config(config: ml_collections.ConfigDict) -> blip2.Blip2Config:
  """Checks every field the run reads; returns the backbone's config. Errors are one line and name the field."""
  check(config.model.source in ('embedded', 'pretrained'),
         f"model.source={config.model.source!r}; expected 'embedded' or 'pretrained'")
  check(config.model.dtype in _DTYPES, f'model.dtype={config.model.dtype!r}; expected one of {tuple(_DTYPES)}')
  check(config.data.task in configs.TASKS, f'data.task={config.data.task!r}; expected one of {configs.TASKS}')
  check(config.data.source in configs.DATA_SOURCES,
         f'data.source={config.data.source!r}; expected one of {configs.DATA_SOURCES}')
  check(config.data.task in sources.SOURCE_TASKS[config.data.source],
         f'data.task={config.data.task!r} is not available from data.source={config.data.source!r} '
         f'(it has {sources.SOURCE_TASKS[config.data.source]})')
  if config.data.source in sources.REAL_SOURCES:
    check(bool(config.data.data_dir), f'data.source={config.data.source!r} needs data.data_dir (nothing is '
           'downloaded)')
    check(os.path.isdir(config.data.data_dir), f'data.data_dir={config.data.data_dir!r} is not a directory')
  if config.model.source == 'pretrained':
    check(bool(config.model.pretrained_path), "model.source='pretrained' needs model.pretrained_path")
    check(os.path.isdir(config.model.pretrained_path),
           f'model.pretrained_path={config.model.pretrained_path!r} is not a directory')
    if os.path.isfile(os.path.join(config.model.pretrained_path, shipped.RECORD_FILE)):
      shipped.verify(config.model.pretrained_path)  # a shipped backbone: its files are the recorded ones
  check(config.train.backbone_sharding in sharding.MODES,
         f'train.backbone_sharding={config.train.backbone_sharding!r}; expected one of {sharding.MODES}')
  check(config.free.mode in configs.FREE_MODES,
         f'free.mode={config.free.mode!r}; expected one of {configs.FREE_MODES}')
  check(config.exits.init in exits_lib.EXIT_INITS,
         f'exits.init={config.exits.init!r}; expected one of {exits_lib.EXIT_INITS}')
  check(0.0 <= config.data.label_fraction <= 1.0,
         f'data.label_fraction={config.data.label_fraction} must be in [0, 1]')
  if 'ce' in free_step.MODES[config.free.mode][1]:
    check(round(config.data.label_fraction * config.data.num_train) > 0,
           f'free.mode={config.free.mode!r} needs labelled examples but data.label_fraction='
           f'{config.data.label_fraction} of data.num_train={config.data.num_train} labels none')
  n = jax.device_count()
  for name in ('train', 'backbone_train'):
    section = config[name]
    check(section.batch_size > 0 and section.batch_size % n == 0,
           f'{name}.batch_size={section.batch_size} must be a positive multiple of the {n} devices')
    check(section.steps >= 1, f'{name}.steps={section.steps} must be >= 1')
    check(0 <= section.warmup_steps < section.steps,
           f'{name}.warmup_steps={section.warmup_steps} must be in [0, {name}.steps={section.steps})')
  check(config.data.num_train >= config.train.batch_size,
         f'data.num_train={config.data.num_train} is smaller than train.batch_size={config.train.batch_size}')
  check(config.backbone_train.num_examples >= config.backbone_train.batch_size,
         f'backbone_train.num_examples={config.backbone_train.num_examples} is smaller than '
         f'backbone_train.batch_size={config.backbone_train.batch_size}')
  # Stage-1 aids that only the generated scenes can feed.
  for name, needs in (('grounding_weight', 'the scene metadata'), ('caption_every', 'the captions')):
    value = config.backbone_train[name]
    check(value >= 0, f'backbone_train.{name}={value} must be >= 0')
    if value > 0 and config.model.source == 'embedded':
      check(config.data.source == 'sort_of_clevr',
             f"backbone_train.{name}={value} needs {needs} of data.source='sort_of_clevr' "
             f'(got {config.data.source!r}); set it to 0')
  for name in ('log_every', 'checkpoint_every', 'keep_checkpoints'):
    check(config.train[name] >= 1, f'train.{name}={config.train[name]} must be >= 1')
  check(config.train.validate_every >= 0, f'train.validate_every={config.train.validate_every} must be >= 0')
  if config.train.validate_every:
    check(1 <= config.train.validation_examples <= config.data.num_calibration,
          f'train.validation_examples={config.train.validation_examples} must be in [1, data.num_calibration='
          f'{config.data.num_calibration}] (they are calibration examples)')
  check(config.free.adv_positions in free_step.ADV_POSITIONS,
        f'free.adv_positions={config.free.adv_positions!r}; expected one of {free_step.ADV_POSITIONS}')
  check(config.free.term_clip >= 0, f'free.term_clip={config.free.term_clip} must be >= 0 (0 = off)')
  check(config.data.num_test >= 1, f'data.num_test={config.data.num_test} must be >= 1')
  model_config = _model_config(config)
  num_layers = blip2.lm_stack(model_config).num_layers
  exits_lib.validate_layers(config.exits.layers, num_layers)
  if config.model.source == 'embedded':
    check(not model_config.is_encoder_decoder, 'the embedded backbone is OPT-only')
    _check_growth(config, model_config)
  fmt = make_input_format(config, model_config, _tokenizer(config))  # text lengths vs data.max_text_length
  if config.train.cache_features:
    _check_feature_cache(config, model_config, fmt)
  evaluator.check_eval_config(config)
  return model_config


def _check_feature_cache(config: ml_collections.ConfigDict, model_config: blip2.Blip2Config,
                         fmt: batching.InputFormat) -> None:
  check(not model_config.is_encoder_decoder,
        'train.cache_features=True needs a decoder-only backbone (a T5 exit also reads the encoder); set it False')
  check(jax.process_count() == 1, 'train.cache_features=True runs on one host; set it False on several')
  need = frozen_features.nbytes(config.data.num_train, len(config.exits.layers),
                                fmt.num_query_tokens + fmt.prompt_length + fmt.target_length,
                                blip2.lm_stack(model_config).hidden_size)
  ram = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  check(need <= ram // 2, f'train.cache_features=True needs {need / 2**30:.1f} GiB of host memory for '
        f'data.num_train={config.data.num_train} examples, more than half of the {ram / 2**30:.0f} GiB here; '
        'set it False')


def _check_growth(config: ml_collections.ConfigDict, model_config: blip2.Blip2Config) -> None:
  c = config.backbone_train
  check(0.0 <= c.grow_split_noise < 1.0, f'backbone_train.grow_split_noise={c.grow_split_noise} must be in [0, 1)')
  if not c.grow_from:
    return
  check(os.path.isfile(os.path.join(c.grow_from, 'config.json')),
        f'backbone_train.grow_from={c.grow_from!r} holds no HF BLIP-2 config.json')
  if os.path.isfile(os.path.join(c.grow_from, shipped.RECORD_FILE)):
    shipped.verify(c.grow_from)
  try:
    growth.check_growable(blip2.Blip2Config.from_pretrained(c.grow_from), model_config)
  except ValueError as e:
    raise ValueError(f'backbone_train.grow_from={c.grow_from!r}: {e}') from None


# ---------------------------------------------------------------------------------------------------
# Data.


def load_examples(config: ml_collections.ConfigDict, split: str, num_examples: int, image_size: int) -> dict:
  """`num_examples` examples of `split` (`sources.SPLITS`) of data.source: `sources.load_examples`."""
  return sources.load_examples(config, split, num_examples, image_size)


def train_batches(examples: dict, backbone: Backbone, task: str, batch_size: int, seed: int,
                  start_step: int) -> Iterator[dict[str, np.ndarray]]:
  """Model batches from step `start_step` on, exactly as an uninterrupted pass would yield them."""
  for chunk in batching.iterate_batches(examples, batch_size, seed, start_step=start_step):
    batch = batching.train_batch(chunk, backbone.tokenizer, backbone.fmt, task)
    batch.update({k: chunk[k] for k in frozen_features.COLUMNS if k in chunk})  # `frozen_features` rows
    yield batch


def _to_dict(value):
  return value.to_dict() if hasattr(value, 'to_dict') else value


# ---------------------------------------------------------------------------------------------------
# Stage 1: the backbone.


def _backbone_hash(config) -> str:
  """What the backbone depends on: changing exit or evaluation settings keeps the cached backbone."""
  data = {k: config.data[k] for k in ('task', 'source', 'seed', 'max_text_length')}
  return checkpoint.config_hash({'model': _to_dict(config.model), 'backbone_train': _to_dict(config.backbone_train),
                                 'seed': config.seed, 'data': data, 'version': BACKBONE_VERSION})


def load_backbone(config: ml_collections.ConfigDict, workdir: str) -> Backbone | None:
  """The backbone of a run: pretrained from disk, or the finished embedded one in the workdir (else None)."""
  model_config = validate_config(config)
  dtype = _DTYPES[config.model.dtype]
  if config.model.source == 'pretrained':
    import free_jax  # pylint: disable=g-import-not-at-top  (lazy: pulls in transformers' loaders)
    model, params = free_jax.load_pretrained(config.model.pretrained_path, dtype)
    tokenizer = _tokenizer(config)
    return Backbone(model, params, tokenizer, make_input_format(config, model_config, tokenizer))
  model, tokenizer, fmt = _embedded_parts(config)
  with _backbone_checkpointer(config, workdir) as ckpt:
    if not ckpt.is_finished():
      return None
    restored = ckpt.restore_latest(_abstract_backbone_state(config, model, fmt))
  if not restored.meta.get('final'):  # the final step was unreadable: an earlier one is not the backbone
    logging.warning('backbone: the final checkpoint is unreadable; training on from step %d', restored.step)
    return None
  return Backbone(model, restored.state.params, tokenizer, fmt)


def _backbone_checkpointer(config, workdir: str) -> checkpoint.Checkpointer:
  return checkpoint.Checkpointer(os.path.join(workdir, BACKBONE_DIR, CHECKPOINT_DIR), max_to_keep=1,
                                 config_hash=_backbone_hash(config))


def _embedded_parts(config) -> tuple[blip2.Blip2Model, Any, batching.InputFormat]:
  """The embedded backbone's model, tokenizer and input format (no params)."""
  model_config = validate_config(config)
  tokenizer = _tokenizer(config)
  return (blip2.Blip2Model(model_config, _DTYPES[config.model.dtype]), tokenizer,
          make_input_format(config, model_config, tokenizer))


def untrained_backbone(config: ml_collections.ConfigDict) -> Backbone:
  """The embedded backbone as stage 1 starts it: random params (seed ``config.seed``), tokenizer, input format."""
  model, tokenizer, fmt = _embedded_parts(config)
  return Backbone(model, init_backbone_params(model, fmt, jax.random.key(config.seed)), tokenizer, fmt)


def init_backbone_params(model: blip2.Blip2Model, fmt: batching.InputFormat, rng: jax.Array) -> PyTree:
  """Random `Blip2Model` params (jitted: op-by-op init of the layer scans takes tens of seconds)."""
  pixels = jnp.zeros((1, fmt.image_size, fmt.image_size, 3), model.dtype)
  ids = jnp.zeros((1, fmt.num_query_tokens + 2), jnp.int32)
  return jax.jit(lambda r: model.init(r, pixels, ids)['params'])(rng)


def _backbone_tx(config):
  c = config.backbone_train
  return optim.make_optimizer(optim.optimizer_config(
      learning_rate=c.learning_rate, warmup_steps=c.warmup_steps, weight_decay=c.weight_decay,
      grad_clip_norm=c.grad_clip), c.steps)


def _initial_backbone_params(config, model: blip2.Blip2Model, fmt: batching.InputFormat) -> PyTree:
  """Stage 1's starting params: random (seed ``config.seed``), or the narrower ``backbone_train.grow_from``
  widened without changing its function (`growth`)."""
  c = config.backbone_train
  if not c.grow_from:
    return init_backbone_params(model, fmt, jax.random.key(config.seed))
  import free_jax  # pylint: disable=g-import-not-at-top  (lazy: pulls in transformers' loaders)
  narrow, narrow_params = free_jax.load_pretrained(c.grow_from)
  return growth.widen(narrow_params, narrow.config, model.config, config.seed, c.grow_split_noise)


def _backbone_state(config, model: blip2.Blip2Model, fmt: batching.InputFormat, tx: optax.GradientTransformation,
                    params: PyTree) -> state_lib.BackboneState:
  probe = None
  if config.backbone_train.grounding_weight > 0:
    probe = grounding.init_probe(fmt.num_query_tokens, model.lm_stack().hidden_size)
  return state_lib.create_backbone_state(params, tx, probe)


def _abstract_backbone_state(config, model, fmt) -> state_lib.BackboneState:
  # Shapes only: random params have the grown ones' shapes, and nothing is read from disk.
  return jax.eval_shape(lambda: _backbone_state(config, model, fmt, _backbone_tx(config),
                                                init_backbone_params(model, fmt, jax.random.key(0))))


def _caption_format(fmt: batching.InputFormat, tokenizer, max_positions: int) -> batching.InputFormat:
  """The input format of the embedded scenes' captions (their own lengths, same ids and image size)."""
  probe = sort_of_clevr.make_split('val', PROBE_EXAMPLES, 0, task='caption', image_size=fmt.image_size)
  prompt_length, target_length = batching.required_lengths(tokenizer, fmt.family, 'caption', probe)
  check(fmt.num_query_tokens + prompt_length + target_length <= max_positions,
         f'backbone_train.caption_every needs {fmt.num_query_tokens + prompt_length + target_length} LM positions for '
         f'captions, model.embedded.max_positions={max_positions}')
  return dataclasses.replace(fmt, prompt_length=prompt_length, target_length=target_length)


def backbone_batches(examples: dict, backbone: Backbone, config, start_step: int) -> Iterator[dict[str, np.ndarray]]:
  """Stage-1 batches from `start_step` on: the task's rows, every `caption_every`-th step the same scenes'
  captions instead, plus the grounding labels if that loss is on. Step k's batch depends only on k."""
  c = config.backbone_train
  captions = _caption_format(backbone.fmt, backbone.tokenizer, config.model.embedded.max_positions) \
      if c.caption_every else None
  chunks = batching.iterate_batches(examples, c.batch_size, config.data.seed, start_step=start_step)
  for step, chunk in enumerate(chunks, start_step + 1):
    if captions is not None and step % c.caption_every == 0:
      batch = batching.train_batch(chunk, backbone.tokenizer, captions, 'caption')
    else:
      batch = batching.train_batch(chunk, backbone.tokenizer, backbone.fmt, config.data.task)
    if c.grounding_weight > 0:
      batch.update(grounding.batch_labels(chunk['objects'], backbone.fmt.image_size))
    yield batch


def backbone_stage(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh) -> Backbone:
  """Stage 1: loads the backbone, training (or resuming) the embedded one first if it is not finished."""
  backbone = load_backbone(config, workdir)
  if backbone is not None:
    _export_backbone(config, workdir, backbone)
    return backbone
  model, tokenizer, fmt = _embedded_parts(config)
  c = config.backbone_train
  tx = _backbone_tx(config)
  state = _backbone_state(config, model, fmt, tx, _initial_backbone_params(config, model, fmt))
  step_fn = backbone_step.make_backbone_step(model, tx, mesh, c.grounding_weight)
  backbone = Backbone(model, None, tokenizer, fmt)
  examples = load_examples(config, 'backbone', c.num_examples, fmt.image_size)
  run_dir = os.path.join(workdir, BACKBONE_DIR)
  with _backbone_checkpointer(config, workdir) as ckpt:
    state = train_loop(state, step_fn, ckpt, run_dir, mesh, total_steps=c.steps,
                       batches=lambda start: backbone_batches(examples, backbone, config, start),
                       log_every=config.train.log_every, checkpoint_every=c.checkpoint_every,
                       progress_keys=('loss', 'grounding', 'token_acc'), desc='backbone')
  backbone = dataclasses.replace(backbone, params=state.params)
  _export_backbone(config, workdir, backbone)
  return backbone


def _export_backbone(config, workdir: str, backbone: Backbone) -> None:
  """The finished embedded backbone as an HF BLIP-2 checkpoint in ``workdir/backbone/hf`` (what
  `free_jax.EarlyExitVLM.load` reads); written once, atomically."""
  directory = os.path.join(workdir, vlm.HF_BACKBONE_DIR)
  if config.model.source == 'embedded' and jax.process_index() == 0 and not os.path.isdir(directory):
    from free_jax import export  # pylint: disable=g-import-not-at-top  (lazy: pulls in transformers)
    export.save_pretrained(backbone.model, backbone.params, directory, backbone.tokenizer)


# ---------------------------------------------------------------------------------------------------
# The shared training loop.


def _global_batch(batch: dict, mesh: jax.sharding.Mesh) -> dict:
  """The step's input from the global batch that every host builds identically: on several hosts each
  contributes only its own rows (`batching.process_split`) to one globally sharded array."""
  if jax.process_count() == 1:
    return parallel.shard_batch(batch, mesh)
  local = batching.process_split(batch, jax.process_index(), jax.process_count())
  return distributed.make_global_batch(local, mesh)


def train_loop(state, step_fn: Callable, ckpt: checkpoint.Checkpointer, run_dir: str, mesh, *, total_steps: int,
               batches: Callable[[int], Iterator[dict]], log_every: int, checkpoint_every: int,
               progress_keys: Sequence[str], desc: str, validate: Callable[[Any], dict] | None = None,
               validate_every: int = 0):
  """Resumes from the newest readable checkpoint, trains to `total_steps`, saves the final state.

  A NaN/inf metric raises FloatingPointError before anything of that step is saved, so the last
  good checkpoint stays the newest one. With `validate`, ``validate(state)``'s scalars join the step's record every
  `validate_every` steps and at the last one (a learning curve in metrics.jsonl and TensorBoard).
  """
  restored = ckpt.restore_latest(jax.tree.map(np.asarray, state))
  start = 0
  if restored is not None:
    state, start = restored.state, int(restored.meta['data_position'])
    logging.info('%s: resuming from step %d', desc, restored.step)
  state = parallel.replicate(state, mesh)
  writer = metrics_logging.MetricsWriter(run_dir, resume_step=start)
  progress = metrics_logging.Progress(total_steps, start, keys=progress_keys, desc=desc)
  try:
    data = batches(start)
    for step in range(start + 1, total_steps + 1):
      state, metrics = step_fn(state, _global_batch(next(data), mesh))
      metrics = jax.device_get(metrics)
      checkpoint.check_finite(metrics, step)
      validated = validate is not None and (step % validate_every == 0 or step == total_steps)
      if validated or step % log_every == 0 or step == total_steps:
        progress.update(step, writer.write(step, dict(metrics, **(validate(state) if validated else {}))))
      if step % checkpoint_every == 0 or step == total_steps:
        ckpt.save(step, state, data_position=step, final=step == total_steps)
  finally:
    progress.close()
    writer.close()
    ckpt.wait()
  return state


# ---------------------------------------------------------------------------------------------------
# Stage 2: FREE exits.


def gan_optimizers(config) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
  """(generator, discriminator) optimizers of the exit stage from ``config.train``."""
  t = config.train
  common = dict(warmup_steps=t.warmup_steps, grad_clip_norm=t.grad_clip)
  return optim.make_gan_optimizers(ml_collections.ConfigDict(dict(
      generator=optim.optimizer_config(learning_rate=t.g_learning_rate, **common),
      discriminator=optim.optimizer_config(learning_rate=t.d_learning_rate, **common))), t.steps)


def init_free_state(config: ml_collections.ConfigDict, backbone: Backbone) -> state_lib.FreeState:
  """Exits initialised from the backbone (``exits.init``) and fresh discriminators, with optimizer states."""
  stack = blip2.lm_stack(backbone.model.config, backbone.model.dtype)
  lm_params = backbone.params['language_model']
  e_rng, d_rng = jax.random.split(jax.random.key(config.seed))
  exit_params = exits_lib.init_exit_params(stack, lm_params, config.exits.layers, init=config.exits.init,
                                           separate_head=config.exits.separate_head, rng=e_rng)
  disc = free_step.make_discriminators(len(config.exits.layers), config.discriminator)
  features = jax.eval_shape(lambda: stack.final_features(lm_params, jnp.zeros((1, 1, stack.hidden_size))))
  d_params = disc.init(d_rng, jnp.zeros((disc.num_exits, 1, features.shape[-1])))['params']
  return state_lib.create_free_state(exit_params, d_params, *gan_optimizers(config))


def exit_stage(config: ml_collections.ConfigDict, workdir: str, backbone: Backbone,
               mesh: jax.sharding.Mesh) -> state_lib.FreeState:
  """Stage 2: trains (or resumes, or just restores when finished) the exits and discriminators."""
  state = init_free_state(config, backbone)
  # Evaluation and validation settings do not change training, so they may differ on a re-run.
  trained_on = {k: _to_dict(v) for k, v in config.items() if k != 'eval'}
  trained_on['train'] = {k: v for k, v in trained_on['train'].items() if k not in _VALIDATION_FIELDS}
  with checkpoint.Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), max_to_keep=config.train.keep_checkpoints,
                               config_hash=checkpoint.config_hash(trained_on)) as ckpt:
    if ckpt.is_finished():
      restored = ckpt.restore_latest(jax.tree.map(np.asarray, state))
      if restored.meta.get('final'):
        _save_exits(config, workdir, backbone, restored.state.exits)
        return restored.state
      # The final step was unreadable (moved aside): train on from the last good one, never report it as final.
      logging.warning('exits: the final checkpoint is unreadable; training on from step %d', restored.step)
    disc = free_step.make_discriminators(len(config.exits.layers), config.discriminator)
    step_fn = free_step.make_free_step(backbone.model, config.exits.layers, config.free, disc, *gan_optimizers(config),
                                       mesh)
    examples = exit_training_examples(config, workdir, backbone)
    if config.train.cache_features:
      make_batch = lambda chunk: batching.train_batch(chunk, backbone.tokenizer, backbone.fmt, config.data.task)
      examples = dict(examples, **frozen_features.precompute(backbone.model, backbone.params, examples,
                                                             config.exits.layers, make_batch,
                                                             config.train.batch_size))
    params = sharding.place_backbone(backbone.params, mesh, config.train.backbone_sharding)
    adversarial = free_step.MODES[config.free.mode][0]
    state = train_loop(state, lambda s, b: step_fn(s, params, b), ckpt, workdir, mesh,
                       validate=_exit_validation(config, backbone) if config.train.validate_every else None,
                       validate_every=config.train.validate_every,
                       total_steps=config.train.steps,
                       batches=lambda start: train_batches(examples, backbone, config.data.task,
                                                           config.train.batch_size, config.data.seed, start),
                       log_every=config.train.log_every, checkpoint_every=config.train.checkpoint_every,
                       progress_keys=('d_loss', 'g_loss') if adversarial else ('g_loss',), desc='exits')
  _save_exits(config, workdir, backbone, state.exits)
  return state


_VALIDATION_FIELDS = ('validate_every', 'validation_examples')


def _exit_validation(config: ml_collections.ConfigDict, backbone: Backbone) -> Callable[[Any], dict]:
  """state -> {'val/exit{l}/answer_acc', 'val/exit{l}/token_acc', ...}: teacher-forced scores on the first
  ``train.validation_examples`` calibration examples (held out from training, like the threshold they calibrate)."""
  examples = load_examples(config, 'calibration', config.train.validation_examples, backbone.fmt.image_size)
  scorer = teacher_scores.TeacherScorer(backbone, config.exits.layers, config.data.task, config.train.batch_size)

  def validate(state) -> dict:
    scores = scorer(state.exits, examples)
    return {f'val/{name}/{kind}': value for kind, values in (('answer_acc', scores.answer_accuracy()),
                                                              ('token_acc', scores.token_accuracy()))
            for name, value in values.items()}
  return validate


def exit_training_examples(config: ml_collections.ConfigDict, workdir: str, backbone: Backbone) -> dict:
  """The exit stage's examples: only ``data.label_fraction`` of them keep their labels, the others are
  taught on the backbone's own outputs (`hidden_labels`, cached in the workdir)."""
  d = config.data
  examples = load_examples(config, 'train', d.num_train, backbone.fmt.image_size)
  labelled = batching.label_subset(d.num_train, d.label_fraction, d.seed)
  made_from = {k: d[k] for k in ('task', 'source', 'data_dir', 'seed', 'num_train', 'label_fraction',
                                 'max_text_length')}
  return hidden_labels.exit_stage_examples(workdir, backbone, examples, labelled, d.task, made_from)


def _save_exits(config, workdir: str, backbone: Backbone, exit_params: PyTree) -> None:
  """The finished exits in ``workdir/exits`` (`free_jax.exits_io`) with the backbone's fingerprint, their own
  digest and the training config; rewritten (atomically) only when the exits differ from the saved ones."""
  directory = os.path.join(workdir, vlm.EXITS_DIR)
  exit_params = exits_lib.with_placement(exit_params, config.exits.layers)
  digest = exits_io.fingerprint(exit_params)
  if jax.process_index() or (os.path.isdir(directory) and exits_io.saved_digest(directory) == digest):
    return
  meta = exits_io.ExitsMeta(
      exit_layers=tuple(config.exits.layers), num_layers=backbone.num_layers, family=backbone.fmt.family,
      backbone_fingerprint=backbone.fingerprint, confidence=config.eval.confidence,
      training={k: _to_dict(v) for k, v in config.items() if k != 'eval'}, digest=digest, task=config.data.task)
  exits_io.save_exits(directory, jax.device_get(exit_params), meta, overwrite=True)


# ---------------------------------------------------------------------------------------------------
# Stage 3: evaluation.


def evaluate_stage(config: ml_collections.ConfigDict, backbone: Backbone, exit_params: PyTree) -> dict:
  """Teacher-forced answer accuracy of every exit and of the backbone on the test split, per question type
  (`teacher_scores`).

  Returns:
    {'exit_layers', 'num_layers', 'num_test', 'accuracy': {name: {question_type | 'all': float}},
     'token_accuracy': {name: float}} with names 'exit{l}' and 'backbone'.
  """
  examples = load_examples(config, 'test', config.data.num_test, backbone.fmt.image_size)
  scorer = teacher_scores.TeacherScorer(backbone, config.exits.layers, config.data.task, config.train.batch_size)
  scores = scorer(exit_params, examples)
  return {'exit_layers': list(config.exits.layers), 'num_layers': backbone.num_layers,
          'num_test': int(scores.right.shape[1]), 'accuracy': scores.per_kind(),
          'token_accuracy': scores.token_accuracy()}


def format_table(summary: dict) -> str:
  """A plain-text table: rows = question types, columns = exits then the backbone."""
  names = list(summary['accuracy'])
  kinds = list(summary['accuracy'][names[-1]])
  width = max(map(len, kinds + ['token acc'])) + 2
  lines = [''.ljust(width) + ''.join(n.rjust(10) for n in names)]
  for k in kinds:
    lines.append(k.ljust(width) + ''.join(f"{summary['accuracy'][n][k]:10.3f}" for n in names))
  lines.append('token acc'.ljust(width) + ''.join(f"{summary['token_accuracy'][n]:10.3f}" for n in names))
  return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------------
# The whole run.

Evaluator = Callable[[ml_collections.ConfigDict, str, Backbone, PyTree], dict]


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """The resolved config as ``workdir/config.json`` (what `free_jax.EarlyExitVLM.load` reads), atomically."""
  if jax.process_index():
    return
  path = os.path.join(workdir, vlm.CONFIG_FILE)
  with open(path + '.tmp', 'w') as f:
    json.dump(config.to_dict(), f, indent=1, sort_keys=True)
  os.replace(path + '.tmp', path)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       evaluators: Sequence[Evaluator] = ()) -> dict:
  """Runs (or resumes, or skips what is finished) backbone, exits and evaluation; returns the eval summary.

  Args:
    config: a config from `free_jax.configs` (e.g. experiments/configs/vqa.py).
    workdir: the run directory.
    evaluators: extra ``fn(config, workdir, backbone, exit_params) -> dict`` run after training (e.g.
      `evaluator.early_exit_evaluation`), on every call: each stores its own results and reuses them while
      they are up to date. They are merged into the returned summary under their function names, not into
      ``train_eval.json``, which holds only what is deterministic.
  """
  validate_config(config)
  with workdir_lock.hold(workdir):  # one run per workdir (a second one is refused, naming this one)
    return _train_and_evaluate(config, workdir, evaluators)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, evaluators: Sequence[Evaluator]) -> dict:
  write_config(config, workdir)
  mesh = parallel.make_mesh()
  eval_path = os.path.join(workdir, EVAL_FILE)
  backbone = backbone_stage(config, workdir, mesh)
  state = exit_stage(config, workdir, backbone, mesh)
  # What the evaluation was made from: it is reused only for these exits and these evaluation settings.
  made_from = evaluator.made_from(config, state.exits)
  summary = None
  if os.path.exists(eval_path):
    with open(eval_path) as f:
      summary = json.load(f)
    if summary.get('made_from') != made_from:
      logging.warning('%s was made from other exits or evaluation settings: evaluating again', eval_path)
      summary = None  # otherwise a finished run: nothing is recomputed or rewritten
  if summary is None:
    summary = evaluate_stage(config, backbone, state.exits)
    summary['made_from'] = made_from
    tmp = eval_path + '.tmp'
    with open(tmp, 'w') as f:  # deterministic: the same command gives the same file (timings live in eval/)
      json.dump(summary, f, indent=1)
    os.replace(tmp, eval_path)
  # Each evaluator keeps its own results (and reuses them while they are up to date).
  summary = dict(summary, **{fn.__name__: fn(config, workdir, backbone, state.exits) for fn in evaluators})
  print(format_table(summary), flush=True)
  return summary
