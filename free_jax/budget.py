"""Memory and throughput budget of FREE exit training on real BLIP-2 backbones, computed from model shapes.

For each backbone (BLIP-2 with OPT-2.7B/6.7B or Flan-T5-XL/XXL; ViT-g/14 + Q-Former), accelerator
(TPU v4-8, A100-80G, H200) and backbone placement (``train.backbone_sharding``: 'replicated' or
'fsdp', see `free_jax.training.sharding`) it estimates, per device:

  memory = frozen backbone params (bf16; FSDP: 1/N of them + two gathered units in flight)
         + trainable state: exit and discriminator params, their grads and two Adam moments (fp32)
         + activations (formulas in `activation_bytes`)

and the step time from FLOPs at an assumed MFU: 2 * params * tokens for the frozen forward, 6 *
params * tokens for the exit layers (forward + backward), 4 * D * V * tokens for each exit's frozen
LM head (forward + input gradient, no weight gradient). Parameter counts reproduce transformers'
`Blip2ForConditionalGeneration` exactly (tests/test_budget.py checks them on the meta device).

The figures are estimates (±30%): XLA fusion, rematerialisation, workspace buffers and
fragmentation are not modelled; a share of HBM (`Workload.usable_memory`) is kept free for them.
"""

from __future__ import annotations

import dataclasses
import math

from free_jax.training.sharding import MODES

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class VisionShape:
  """BLIP-2's EVA ViT-g/14 (transformers `Blip2VisionConfig` defaults)."""
  hidden: int = 1408
  layers: int = 39
  heads: int = 16
  ffn: int = 6144
  image_size: int = 224
  patch_size: int = 14

  @property
  def tokens(self) -> int:
    return (self.image_size // self.patch_size)**2 + 1  # patches + CLS


@dataclasses.dataclass(frozen=True)
class QFormerShape:
  """BLIP-2's Q-Former (BERT-base sized, cross-attention to the image every other layer)."""
  hidden: int = 768
  layers: int = 12
  heads: int = 12
  ffn: int = 3072
  cross_attention_frequency: int = 2
  num_queries: int = 32

  @property
  def cross_layers(self) -> int:
    return math.ceil(self.layers / self.cross_attention_frequency)  # layers i with i % frequency == 0


@dataclasses.dataclass(frozen=True)
class LMShape:
  """The language model: 'opt' (decoder-only, tied head) or 't5' (Flan-T5: gated-GELU FFN, untied head).

  `layers` are the decoder layers (the ones exits attach to); `encoder_layers` only for T5.
  """
  family: str
  hidden: int
  layers: int
  heads: int
  ffn: int
  vocab: int
  head_dim: int = 0                 # T5 d_kv; OPT: hidden // heads
  encoder_layers: int = 0
  max_positions: int = 2048         # OPT learned positions (HF adds an offset of 2)
  word_embed_proj_dim: int = 0      # OPT: embedding width if it differs from hidden (project_in/out)
  relative_attention_buckets: int = 32  # T5

  @property
  def inner(self) -> int:
    """Attention width: heads * head_dim."""
    return self.heads * (self.head_dim or self.hidden // self.heads)


@dataclasses.dataclass(frozen=True)
class Blip2Shape:
  name: str
  lm: LMShape
  vision: VisionShape = VisionShape()
  qformer: QFormerShape = QFormerShape()


# Published configs: Salesforce/blip2-* on the Hugging Face hub (OPT vocab padded to 50304 there).
MODELS = {m.name: m for m in (
    Blip2Shape('blip2-opt-2.7b', LMShape('opt', hidden=2560, layers=32, heads=32, ffn=10240, vocab=50304)),
    Blip2Shape('blip2-opt-6.7b', LMShape('opt', hidden=4096, layers=32, heads=32, ffn=16384, vocab=50304)),
    Blip2Shape('blip2-flan-t5-xl', LMShape('t5', hidden=2048, layers=24, heads=32, ffn=5120, vocab=32128,
                                           head_dim=64, encoder_layers=24)),
    Blip2Shape('blip2-flan-t5-xxl', LMShape('t5', hidden=4096, layers=24, heads=64, ffn=10240, vocab=32128,
                                            head_dim=64, encoder_layers=24)),
)}


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """One device as JAX sees it.

  Attributes:
    memory: HBM bytes. peak_flops: dense bf16 FLOP/s. devices: devices of one host / slice (the FSDP
    group). gather_bandwidth: assumed all-gather bytes/s received per device (~70% of one direction
    of its links).
  """
  name: str
  memory: float
  peak_flops: float
  devices: int
  gather_bandwidth: float


ACCELERATORS = {a.name: a for a in (
    # v4-8 = 4 chips (8 TensorCores, one JAX device per chip), 32 GiB HBM and 275 TFLOP/s each; ICI.
    Accelerator('TPU v4-8', 32 * GiB, 275e12, 4, 100e9),
    # 8-GPU HGX/DGX nodes; NVLink 3 (300 GB/s per direction) and NVLink 4 (450 GB/s).
    Accelerator('A100-80G', 80 * GiB, 312e12, 8, 210e9),
    Accelerator('H200', 141e9, 989e12, 8, 315e9),
)}


@dataclasses.dataclass(frozen=True)
class Workload:
  """What one training step processes, and the assumptions of the estimate.

  Token counts: OPT sees T = queries + prompt + target tokens; T5's encoder sees S = queries +
  prompt and its decoder (where the exits are) T = target tokens.
  """
  per_device_batch: int = 32
  prompt_tokens: int = 32
  target_tokens: int = 32
  num_exits: int = 3            # exit transformers (one LM decoder layer each), like exits.layers
  disc_hidden: int = 256        # config.discriminator.hidden
  disc_depth: int = 2           # config.discriminator.depth
  mfu: float = 0.4              # model FLOP utilisation assumed for the step
  usable_memory: float = 0.9    # share of HBM the estimate may fill


# ---------------------------------------------------------------------------------------------------
# Parameter counts (exactly as transformers lays the modules out).


def vision_layer_params(v: VisionShape) -> int:
  d, f = v.hidden, v.ffn
  return (3 * d * d + 3 * d) + (d * d + d) + 2 * 2 * d + (2 * d * f + f + d)  # qkv, proj, 2 LN, MLP


def vision_params(v: VisionShape) -> int:
  d = v.hidden
  embeddings = d + v.tokens * d + 3 * v.patch_size**2 * d + d  # CLS, positions, patch conv + bias
  return embeddings + v.layers * vision_layer_params(v) + 2 * d  # + post layer norm


def qformer_cross_kv_params(q: QFormerShape, encoder_hidden: int) -> int:
  """Cross-attention key/value projections: they run on the image tokens, not the queries."""
  return q.cross_layers * 2 * (encoder_hidden * q.hidden + q.hidden)


def qformer_params(q: QFormerShape, encoder_hidden: int) -> int:
  """Q-Former + its query tokens (the projection to the LM is counted in `blip2_params`)."""
  h = q.hidden
  attention = 4 * (h * h + h) + 2 * h  # q, k, v, output dense + LayerNorm
  ffn = 2 * h * q.ffn + q.ffn + h + 2 * h  # the query FFN (intermediate_query, output_query) + LN
  cross = 2 * (h * h + h) + 2 * h  # query and output dense + LN; k, v in qformer_cross_kv_params
  cross_kv = qformer_cross_kv_params(q, encoder_hidden)
  return 2 * h + q.layers * (attention + ffn) + q.cross_layers * cross + cross_kv + q.num_queries * h


def lm_layer_params(lm: LMShape) -> int:
  """One decoder layer (= one exit transformer)."""
  d, f, inner = lm.hidden, lm.ffn, lm.inner
  if lm.family == 'opt':
    return 4 * (d * d + d) + 2 * d + (2 * d * f + f + d) + 2 * d
  return 2 * 4 * d * inner + 3 * d * f + 3 * d  # self + cross attention (no biases), gated FFN, 3 RMS norms


def lm_encoder_layer_params(lm: LMShape) -> int:
  return 4 * lm.hidden * lm.inner + 3 * lm.hidden * lm.ffn + 2 * lm.hidden


def lm_embedding_params(lm: LMShape) -> int:
  """Token embeddings (OPT: + positions and projections; T5: + the untied LM head)."""
  d = lm.hidden
  if lm.family == 'opt':
    width = lm.word_embed_proj_dim or d
    projections = 2 * width * d if width != d else 0
    return lm.vocab * width + (lm.max_positions + 2) * d + projections
  return 2 * lm.vocab * d


def lm_params(lm: LMShape) -> int:
  if lm.family not in ('opt', 't5'):
    raise ValueError(f'LMShape.family={lm.family!r}; expected opt or t5')
  layers = lm.layers * lm_layer_params(lm)
  if lm.family == 'opt':
    return lm_embedding_params(lm) + layers + 2 * lm.hidden  # + final layer norm
  relative_bias = 2 * lm.relative_attention_buckets * lm.heads  # first layer of encoder and decoder
  return lm_embedding_params(lm) + layers + lm.encoder_layers * lm_encoder_layer_params(lm) + relative_bias \
      + 2 * lm.hidden


def blip2_params(shape: Blip2Shape) -> dict[str, int]:
  """Parameter counts per component, named as the children of HF `Blip2ForConditionalGeneration`."""
  counts = {
      'vision_model': vision_params(shape.vision),
      'qformer': qformer_params(shape.qformer, shape.vision.hidden),  # incl. query_tokens
      'language_projection': shape.qformer.hidden * shape.lm.hidden + shape.lm.hidden,
      'language_model': lm_params(shape.lm),
  }
  counts['total'] = sum(counts.values())
  return counts


def discriminator_params(hidden_in: int, width: int, depth: int) -> int:
  """One `Discriminator`: `depth` Dense(width) layers, then Dense(1)."""
  return hidden_in * width + width + (depth - 1) * (width * width + width) + width + 1


# ---------------------------------------------------------------------------------------------------
# Budget.


def _tokens(shape: Blip2Shape, w: Workload) -> tuple[int, int]:
  """(T decoder tokens, S encoder tokens; 0 for OPT)."""
  q = shape.qformer.num_queries
  if shape.lm.family == 'opt':
    return q + w.prompt_tokens + w.target_tokens, 0
  return w.target_tokens, q + w.prompt_tokens


def activation_bytes(shape: Blip2Shape, w: Workload, batch: int) -> dict[str, float]:
  """Activation bytes per device for `batch` examples.

  * backbone_kept (bf16 hidden states, fp32 final logits), alive during the exit updates: all L + 1
    decoder hidden states b*T*D*(L+1)*2 (the layer scan returns them; exits read theirs), T5's encoder
    output b*S*D*2, final logits b*T*V*4 (KD / agreement / pseudo-labels).
  * backbone_transient: the frozen forward saves nothing for backprop (stop_gradient), so only one
    layer's working set is alive: the largest of a ViT layer b*N*(4D+F)*2 + b*H*N^2*4 and an LM
    layer b*T*(4D+F)*2 + b*H*T*T_kv*4 (fp32 attention scores).
  * exits (fp32, kept for backprop), per exit: b*T*(c_D*D + c_F*F)*4 (OPT c_D=9, c_F=2: norms in/out,
    q, k, v, attention output, residual, FFN hidden pre/post activation; T5 c_D=15, c_F=3 with the
    cross-attention and gated FFN, + encoder K/V 2*b*S*D_attn*4) + attention probabilities
    b*H*T*T_kv*4 + the exit head's logits and their gradient 2*b*T*V*4.
  * discriminators: per exit, real and fake features through depth layers of width h, pre/post
    activation: 2*2*depth*b*T*h*4.
  """
  lm, v = shape.lm, shape.vision
  t, s = _tokens(shape, w)
  d, f, h = lm.hidden, lm.ffn, lm.heads
  kept = batch * t * d * (lm.layers + 1) * 2 + batch * s * d * 2 + batch * t * lm.vocab * 4
  vit_layer = batch * v.tokens * (4 * v.hidden + v.ffn) * 2 + batch * v.heads * v.tokens**2 * 4
  if lm.family == 'opt':
    lm_layer = batch * t * (4 * d + f) * 2 + batch * h * t * t * 4
    per_exit = batch * t * (9 * d + 2 * f) * 4 + batch * h * t * t * 4
  else:
    lm_layer = batch * s * (4 * d + 2 * f) * 2 + batch * h * s * s * 4  # the encoder's layers are the widest
    per_exit = (batch * t * (15 * d + 3 * f) * 4 + 2 * batch * s * lm.inner * 4
                + batch * h * t * (t + s) * 4)
  per_exit += 2 * batch * t * lm.vocab * 4
  discs = w.num_exits * 2 * 2 * w.disc_depth * batch * t * w.disc_hidden * 4
  return {'backbone_kept': kept, 'backbone_transient': max(vit_layer, lm_layer),
          'exits': w.num_exits * per_exit + discs}


def forward_flops(shape: Blip2Shape, w: Workload) -> float:
  """FLOPs of the frozen forward for one example: 2 * params * tokens per component, + the LM head."""
  lm, v, q = shape.lm, shape.vision, shape.qformer
  t, s = _tokens(shape, w)
  cross_kv = qformer_cross_kv_params(q, v.hidden)
  flops = 2 * vision_params(v) * v.tokens
  flops += 2 * (qformer_params(q, v.hidden) - cross_kv) * q.num_queries + 2 * cross_kv * v.tokens
  flops += 2 * (q.hidden * lm.hidden) * q.num_queries
  flops += 2 * lm.layers * lm_layer_params(lm) * t + 2 * lm.hidden * lm.vocab * t
  flops += 2 * lm.encoder_layers * lm_encoder_layer_params(lm) * s
  return flops


def trainable_params(shape: Blip2Shape, w: Workload) -> int:
  """Exit transformers + discriminators (the exit classifier reuses the frozen head)."""
  return w.num_exits * (lm_layer_params(shape.lm) + discriminator_params(shape.lm.hidden, w.disc_hidden,
                                                                           w.disc_depth))


def train_flops(shape: Blip2Shape, w: Workload) -> float:
  """FLOPs of one example's exit and discriminator updates (forward + backward)."""
  lm = shape.lm
  t, _ = _tokens(shape, w)
  exits = w.num_exits * (6 * lm_layer_params(lm) * t + 4 * lm.hidden * lm.vocab * t)
  # D step: real and fake through D, forward + backward (6 * 2T); G step: fake through D + input grad (4T).
  disc = w.num_exits * 16 * discriminator_params(lm.hidden, w.disc_hidden, w.disc_depth) * t
  return exits + disc


def _largest_unit(shape: Blip2Shape) -> int:
  """The biggest block FSDP gathers at once: a layer (ViT, Q-Former or LM) or an embedding table."""
  lm = shape.lm
  table = lm.vocab * (lm.word_embed_proj_dim or lm.hidden)  # T5's untied head is a second one
  return max(lm_layer_params(lm), lm_encoder_layer_params(lm) if lm.encoder_layers else 0, table,
             vision_layer_params(shape.vision))


@dataclasses.dataclass(frozen=True)
class Row:
  """One line of the budget table (bytes per device, seconds per step)."""
  model: str
  accelerator: str
  devices: int
  sharding: str
  backbone_bytes: float
  trainable_bytes: float
  activation_bytes: float
  total_bytes: float
  usable_bytes: float
  max_batch: int
  step_seconds: float
  examples_per_second: float  # over all `devices`

  @property
  def fits(self) -> bool:
    return self.total_bytes <= self.usable_bytes


def budget(shape: Blip2Shape, accel: Accelerator, sharding: str, w: Workload = Workload()) -> Row:
  """The budget of training `shape`'s exits on `accel.devices` devices with the backbone `sharding`."""
  if sharding not in MODES:
    raise ValueError(f'backbone_sharding={sharding!r}; expected one of {MODES}')
  n = accel.devices
  backbone = blip2_params(shape)['total']
  if sharding == 'replicated':
    backbone_bytes = 2.0 * backbone
  else:  # 1/N at rest + the unit being used and the next one being gathered (double buffering)
    backbone_bytes = 2.0 * backbone / n + 2 * 2.0 * _largest_unit(shape)
  trainable_bytes = 4.0 * 4 * trainable_params(shape, w)  # params, grads, Adam mu and nu (fp32)
  per_example = sum(activation_bytes(shape, w, 1).values())
  activations = sum(activation_bytes(shape, w, w.per_device_batch).values())
  usable = w.usable_memory * accel.memory
  max_batch = max(0, int((usable - backbone_bytes - trainable_bytes) // per_example))

  flops = w.per_device_batch * (forward_flops(shape, w) + train_flops(shape, w))
  compute = flops / (accel.peak_flops * w.mfu)
  # Per-step traffic: the gradient all-reduce (exits, discriminators; fp32), plus in FSDP every device
  # receiving the (N-1)/N of the backbone it does not hold. Assumed overlapped with compute.
  traffic = 2 * 4.0 * trainable_params(shape, w) * (n - 1) / n
  if sharding == 'fsdp':
    traffic += 2.0 * backbone * (n - 1) / n
  step = max(compute, traffic / accel.gather_bandwidth)
  return Row(model=shape.name, accelerator=accel.name, devices=n, sharding=sharding,
             backbone_bytes=backbone_bytes, trainable_bytes=trainable_bytes, activation_bytes=activations,
             total_bytes=backbone_bytes + trainable_bytes + activations, usable_bytes=usable,
             max_batch=max_batch, step_seconds=step, examples_per_second=n * w.per_device_batch / step)


def budget_table(w: Workload = Workload()) -> list[Row]:
  """Every model x accelerator x sharding mode."""
  return [budget(m, a, s, w) for m in MODELS.values() for a in ACCELERATORS.values() for s in MODES]


def _gib(x: float) -> str:
  return f'{x / GiB:.1f}'


def params_markdown(w: Workload = Workload()) -> str:
  """Parameter counts per component (the ones the table is built from)."""
  lines = ['| model | ViT-g | Q-Former (+queries, proj.) | LM | total | one exit layer | '
           'trainable (exits + D) |',
           '|---|---:|---:|---:|---:|---:|---:|']
  for m in MODELS.values():
    c = blip2_params(m)
    lines.append(f"| {m.name} | {c['vision_model'] / 1e9:.3f} B | "
                 f"{(c['qformer'] + c['language_projection']) / 1e6:.1f} M | "
                 f"{c['language_model'] / 1e9:.3f} B | "
                 f"{c['total'] / 1e9:.3f} B | {lm_layer_params(m.lm) / 1e6:.1f} M | "
                 f'{trainable_params(m, w) / 1e6:.1f} M |')
  return '\n'.join(lines)


def table_markdown(rows: list[Row], w: Workload = Workload()) -> str:
  """The budget table: GiB per device at the workload's batch, largest batch that fits, throughput."""
  lines = [f'| model | accelerator | backbone | backbone GiB | exits+D+Adam GiB | activations GiB '
           f'(b={w.per_device_batch}) | total GiB | usable GiB | fits | max batch/device | step ms | '
           'examples/s (all devices) |',
           '|---|---|---|---:|---:|---:|---:|---:|:---:|---:|---:|---:|']
  for r in rows:
    lines.append(f'| {r.model} | {r.accelerator} ×{r.devices} | {r.sharding} | {_gib(r.backbone_bytes)} | '
                 f'{_gib(r.trainable_bytes)} | {_gib(r.activation_bytes)} | {_gib(r.total_bytes)} | '
                 f"{_gib(r.usable_bytes)} | {'yes' if r.fits else 'NO'} | {r.max_batch} | "
                 f'{1e3 * r.step_seconds:.0f} | {r.examples_per_second:.0f} |')
  return '\n'.join(lines)


def assumptions_markdown(w: Workload = Workload()) -> str:
  accels = '; '.join(f'{a.name}: {a.devices} devices of {a.memory / 1e9:.0f} GB ({a.memory / GiB:.0f} GiB), '
                     f'{a.peak_flops / 1e12:.0f} TFLOP/s bf16, all-gather {a.gather_bandwidth / 1e9:.0f} GB/s'
                     for a in ACCELERATORS.values())
  return '\n'.join([
      f'- Workload: {w.per_device_batch} examples per device; {w.prompt_tokens} prompt + '
      f'{w.target_tokens} target '
      f'text tokens (OPT decoder: 32 queries + prompt + target; T5: encoder 32 + prompt, decoder target); '
      f'ViT-g/14 at 224 px (257 tokens); {w.num_exits} exits, each one LM decoder layer in fp32 reusing the '
      f'frozen head; discriminators {w.disc_depth}x{w.disc_hidden} MLPs.',
      f'- Accelerators: {accels}.',
      f'- Memory: backbone bf16 (FSDP: 1/N + 2 largest units in flight); exits and discriminators fp32 with '
      f'grads and 2 Adam moments (16 bytes/param); activations as in `free_jax.budget.activation_bytes`; '
      f'{w.usable_memory:.0%} of HBM usable.',
      f'- Throughput: MFU {w.mfu:.0%} of peak on 2·params·tokens (frozen forward) + 6·params·tokens '
      '(exit layers) '
      f'+ 4·D·V·tokens (each exit head); communication assumed overlapped (step = max(compute, traffic)).',
  ])
