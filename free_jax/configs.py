"""The config schema shared by every experiment config (experiments/configs/*.py).

Each experiment file calls `base_config()`, overrides what it needs and returns the config locked, so a
typo on the command line (`--config.exits.layerz=...`) fails at once instead of being silently ignored.
Every field is documented here, once.
"""

import pathlib
from typing import Any

import ml_collections

TASKS = ('vqa', 'caption')
DATA_SOURCES = ('sort_of_clevr', 'clevr', 'coco_captions', 'vqav2')
FREE_MODES = ('semi_supervised', 'unsupervised_kd', 'unsupervised_pseudo', 'ce_only', 'kd_only', 'cosine')
CONFIDENCE_MEASURES = ('max_prob', 'top2_margin', 'entropy', 'patience')
# The embedded BLIP-2s shipped with the project (free_jax.shipped; docs/backbone.md): the default one, whose LM
# is wide enough (512) for a decode step to cost bytes and FLOPs as on an accelerator, and the small fast one
# (width 128, ':small') for the reproduction study and quick experiments.
_ASSETS = pathlib.Path(__file__).resolve().parents[1] / 'assets'
SHIPPED_BACKBONE = str(_ASSETS / 'sort_of_clevr_blip2')
SMALL_BACKBONE = str(_ASSETS / 'sort_of_clevr_blip2_small')
CONFIG_ARGS = ('', 'smoke', 'small')


def embedded_backbone() -> ml_collections.ConfigDict:
  """A BLIP-2-shaped tiny backbone (ViT -> Q-Former -> OPT) that free_jax trains itself on CPU."""
  c = ml_collections.ConfigDict()
  c.image_size = 64            # input resolution of the vision encoder (pixels, square)
  c.patch_size = 16            # ViT patch size -> (64/16)^2 = 16 patches, one per cell of the scene lattice
  c.vision_hidden = 96         # ViT width
  c.vision_layers = 2          # ViT depth
  c.vision_heads = 4           # ViT attention heads
  c.qformer_hidden = 96        # Q-Former width
  c.qformer_layers = 2         # Q-Former depth (cross-attention in every layer)
  c.qformer_heads = 4          # Q-Former attention heads
  c.num_query_tokens = 8       # learned queries = image tokens seen by the LM
  c.lm_hidden = 128            # OPT width
  c.lm_layers = 8              # OPT depth: deep enough for exits to matter
  c.lm_heads = 4               # OPT attention heads
  c.lm_ffn = 256               # OPT feed-forward width
  c.max_positions = 64         # OPT learned positions (image tokens + prompt + answer)
  return c


def base_config() -> ml_collections.ConfigDict:
  """Every field any stage reads, with defaults for the embedded VQA benchmark (unlocked)."""
  c = ml_collections.ConfigDict()
  c.seed = 0                    # PRNG seed for parameter init and anything stochastic in training

  c.model = ml_collections.ConfigDict()
  c.model.source = 'embedded'   # 'embedded' (train the tiny backbone here first) or 'pretrained' (a local HF dir;
                                # the embedded benchmark's default: the shipped one, `use_shipped_backbone`)
  c.model.pretrained_path = ''  # local directory with HF BLIP-2 config.json + *.safetensors + tokenizer
  c.model.dtype = 'float32'     # 'float32' or 'bfloat16': params and activations of the frozen backbone
  c.model.embedded = embedded_backbone()

  c.backbone_train = ml_collections.ConfigDict()  # stage 1 (embedded only): end-to-end CE training
  c.backbone_train.steps = 3000         # optimizer steps; skipped when a cached backbone exists
  c.backbone_train.batch_size = 32      # global batch size
  c.backbone_train.learning_rate = 1.5e-3  # AdamW peak learning rate (warmup + cosine decay)
  c.backbone_train.warmup_steps = 100   # linear warmup steps
  c.backbone_train.weight_decay = 0.01  # AdamW weight decay
  c.backbone_train.num_examples = 32000  # generated training examples (cycled over epochs)
  c.backbone_train.grad_clip = 1.0      # global-norm gradient clipping (0 = off)
  c.backbone_train.grounding_weight = 1.0  # weight of the scene-grounding loss on the image prefix (sort_of_clevr
                                           # only; 0 = off): without it the LM never learns to use the image
  c.backbone_train.caption_every = 2     # every k-th step trains on the same scenes' captions (sort_of_clevr only;
                                         # 0 = never): naming each object teaches the LM to read the image tokens
  c.backbone_train.checkpoint_every = 500  # steps between orbax checkpoints of the backbone stage
  c.backbone_train.grow_from = ''        # '' (random init) or a local HF BLIP-2 directory with a narrower OPT LM
                                         # (same vision side and depth) widened to model.embedded without changing
                                         # its function (training/growth.py), then trained on
  c.backbone_train.grow_split_noise = 0.5  # random split of the grown weights over their copies, in [0, 1):
                                           # keeps the function and lets the copies diverge in training

  c.data = ml_collections.ConfigDict()
  c.data.task = 'vqa'                # one of TASKS
  c.data.source = 'sort_of_clevr'    # one of DATA_SOURCES; real sources read from data_dir only
  c.data.data_dir = ''               # tfds data_dir / VQAv2 root for real sources (never downloaded)
  c.data.seed = 0                    # seed of the training split (generator stream / shuffling)
  c.data.test_seed = 1               # seed of the test split (a fresh test set per value)
  c.data.num_train = 16000           # training examples for the exit stage
  c.data.num_calibration = 2000      # calibration examples for the exit threshold (LTT at delta 0.01 needs
                                     # ~2000 to certify a 0.5% risk: with 500 not even 0.4% passes)
  c.data.num_test = 1000             # test examples for evaluation
  c.data.label_fraction = 0.1        # share of training examples whose labels the exit stage may use
  c.data.max_text_length = 24        # text tokens after the image tokens (prompt + target, padded)

  c.exits = ml_collections.ConfigDict()
  c.exits.layers = (2, 4, 6)         # exit after these many LM layers (1 <= l < num_layers)
  c.exits.init = 'next_layer'        # exit transformer init: 'next_layer' (copy layer l+1), 'random'
  c.exits.separate_head = False      # False: frozen backbone norm + LM head (paper); True: trainable head

  c.discriminator = ml_collections.ConfigDict()
  c.discriminator.hidden = 128       # MLP width of each per-exit discriminator
  c.discriminator.depth = 2          # hidden layers of the discriminator MLP

  c.free = ml_collections.ConfigDict()
  c.free.mode = 'semi_supervised'    # one of FREE_MODES (the last three are baselines)
  c.free.adv_weight = 1.0            # weight of the non-saturating adversarial loss
  c.free.ce_weight = 1.0             # weight of CE on labelled targets (or pseudo-labels)
  c.free.kd_weight = 1.0             # weight of KD / cosine terms in the modes that use them
  c.free.kd_temperature = 1.0        # softmax temperature of knowledge distillation
  c.free.r1_weight = 0.0             # R1 gradient penalty on real features (0 = off)
  c.free.label_smoothing = 0.0       # one-sided smoothing of the discriminator's real label (0 = off)
  c.free.adv_positions = 'tokens'    # where the adversarial game is played: 'tokens' (every real token, as the
                                     # paper) or 'targets' (the positions CE/KD are taken at: the answer)
  c.free.term_clip = 0.0             # > 0: each exit-loss term's gradient (adv, ce, kd, ...) is clipped to this
                                     # norm before they are summed, so no term's scale crowds out the others

  c.train = ml_collections.ConfigDict()  # stage 2: exits and discriminators (backbone frozen)
  c.train.steps = 3000               # steps of the alternating D/G updates (800: exit 2 at 0.75, 3000: 0.88)
  c.train.batch_size = 32            # global batch size (divisible by the device count)
  c.train.g_learning_rate = 3e-4     # exit (generator) AdamW peak learning rate
  c.train.d_learning_rate = 1e-4     # discriminator AdamW peak learning rate
  c.train.warmup_steps = 100         # linear warmup of both schedules
  c.train.grad_clip = 1.0            # global-norm gradient clipping
  c.train.log_every = 25             # steps between metrics.jsonl / TensorBoard records
  c.train.checkpoint_every = 200     # steps between orbax checkpoints
  c.train.keep_checkpoints = 3       # orbax max_to_keep
  c.train.validate_every = 0         # steps between validation scores of the exits in the logs (0 = off)
  c.train.validation_examples = 500  # calibration examples those scores are taken on (teacher-forced)
  c.train.cache_features = False     # True: run the frozen backbone once per example and reuse its exit inputs and
                                     # final states every epoch (training/frozen_features.py; decoder-only backbones
                                     # on one host; host RAM N x (E + 1) x T x D float32); False: every step
  c.train.backbone_sharding = 'replicated'  # frozen backbone placement: 'replicated' or 'fsdp' (training/sharding.py)

  c.eval = ml_collections.ConfigDict()
  c.eval.confidence = 'max_prob'     # one of CONFIDENCE_MEASURES
  c.eval.threshold = -1.0            # fixed exit threshold; < 0 means calibrate it (below)
  c.eval.patience = 2                # k for the patience measure (same token from k consecutive exits)
  c.eval.calibration_reference = 'full_model'  # risk against 'full_model' outputs or 'ground_truth'
  c.eval.risk_delta = 0.01           # tolerated disagreement rate delta
  c.eval.risk_epsilon = 0.1          # the guarantee holds with probability >= 1 - epsilon
  c.eval.max_new_tokens = 4          # generated tokens (answers are one word + EOS)
  c.eval.batch_size = 1              # decoding batch size of the wall-clock figures and their costs (layers, bytes)
  c.eval.quality_batch_size = 32     # decoding batch size of the passes that only need tokens (calibration, the
                                     # threshold sweep's qualities): the same tokens, many times faster
  c.eval.timing_repeats = 5          # repeats of the interleaved full vs early-exit timing (medians)
  c.eval.num_calibration_thresholds = 11  # candidate thresholds of the calibration, tested in sequence from 1 down
                                          # (denser near 1: `evaluator.threshold_grid`); each is one token-only pass
  c.eval.num_sweep_thresholds = 7    # thresholds of the timed quality-vs-speedup sweep (the same kind of grid)
  c.eval.calibration_method = 'ltt'  # 'ltt' (Learn-then-Test) or 'crc' (conformal risk control)
  c.eval.prefill = 'early_exit'      # 'early_exit': the prompt step may exit too; 'full': prompt at full depth
  c.eval.propagation = 'recompute'   # skipped layers' K/V: 'recompute' (exact, deferred) or 'calm' (projected)
  c.eval.timing_examples = 128       # test examples in the wall-clock timing (0 = all of data.num_test)
  # Speculative decoding (lossless: drafts by an exit, verified by the deeper layers): the draft lengths k
  # tried with every exit on the calibration split; the fastest is evaluated on the test split. (): skip.
  c.eval.draft_lengths = (2, 4)
  c.eval.selection_examples = 32     # calibration examples timed per (draft exit, k) choice (capped by the timed
                                     # test examples): a ranking needs fewer than the reported figure
  return c


def use_shipped_backbone(c: ml_collections.ConfigDict, path: str = SHIPPED_BACKBONE) -> ml_collections.ConfigDict:
  """The embedded benchmark's backbone: one shipped in assets/ (`free_jax.shipped`, docs/backbone.md), so a
  run trains only the exits. ``--config.model.source=embedded`` (and `:smoke`) trains one here instead."""
  c.model.source, c.model.pretrained_path = 'pretrained', path
  c.train.cache_features = True  # a few GiB at most: the exit stage runs only the exits
  # A width-512 exit step costs ~4x a width-128 one: 2000 steps keep make train within ~25 minutes.
  c.train.steps = {SHIPPED_BACKBONE: 2000, SMALL_BACKBONE: 3000}.get(path, c.train.steps)
  return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks any config so a full run (backbone + exits + evaluation) takes well under a minute; the embedded
  benchmark's shipped backbone is replaced by a tiny one trained from scratch (the path CI exercises)."""
  if c.model.source == 'pretrained' and c.model.pretrained_path == SHIPPED_BACKBONE:
    c.model.source = 'embedded'
  e = c.model.embedded
  e.vision_hidden, e.vision_layers, e.qformer_hidden, e.qformer_layers = 32, 1, 32, 1
  e.vision_heads, e.qformer_heads, e.lm_heads = 2, 2, 2
  e.num_query_tokens, e.lm_hidden, e.lm_layers, e.lm_ffn = 4, 32, 4, 64
  c.exits.layers = (1, 2)
  c.backbone_train.steps, c.backbone_train.batch_size, c.backbone_train.num_examples = 20, 16, 256
  c.backbone_train.warmup_steps, c.backbone_train.checkpoint_every = 5, 10
  c.data.num_train, c.data.num_calibration, c.data.num_test = 128, 32, 32
  c.train.steps, c.train.batch_size, c.train.warmup_steps = 10, 16, 2
  c.train.log_every, c.train.checkpoint_every, c.train.validation_examples = 5, 5, 32
  c.discriminator.hidden = 32
  c.eval.timing_repeats, c.eval.num_sweep_thresholds, c.eval.num_calibration_thresholds = 2, 3, 3
  c.eval.draft_lengths = ()
  return c


def finalize(c: ml_collections.ConfigDict, arg: str,
             smoke_overrides=None) -> ml_collections.ConfigDict:
  """Applies the config argument (`CONFIG_ARGS`: '', 'smoke' then `smoke_overrides(c)`, or 'small': the small
  shipped backbone instead of the default one) and locks the config."""
  if arg == 'smoke':
    smoke(c)
    if smoke_overrides is not None:
      smoke_overrides(c)
  elif arg == 'small':
    if c.model.pretrained_path != SHIPPED_BACKBONE:
      raise ValueError("config argument 'small' swaps the shipped default backbone, which this config does not use")
    use_shipped_backbone(c, SMALL_BACKBONE)
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; expected one of {CONFIG_ARGS}')
  c.lock()
  return c



def set_field(c: ml_collections.ConfigDict, path: str, value: Any) -> None:
  """``c.<path> = value`` for a dotted path (``'train.steps'``); a path that names no field is a ValueError."""
  *parents, name = path.split('.')
  node = c
  for p in parents:
    if p not in node:
      raise ValueError(f'override {path!r} names no config field')
    node = node[p]
  if name not in node:
    raise ValueError(f'override {path!r} names no config field')
  node[name] = value
