"""BLIP-2 (ViT -> Q-Former -> projection -> OPT or Flan-T5), equal to transformers 5
``Blip2ForConditionalGeneration``.

Contract (see DESIGN.md)::

  model = Blip2Model(config, dtype)
  out = model.apply({'params': params}, pixel_values, input_ids, attention_mask,
                    decoder_input_ids=None, decoder_attention_mask=None)

``input_ids`` are laid out as the transformers 5 BLIP-2 processor makes them: ``num_query_tokens``
copies of ``image_token_index`` (after any left padding), then the text. The embeddings at those
positions are replaced by the projected Q-Former outputs, in order. The language model then runs
through the `lm_api.DecoderStack` of its family (`lm_stack`), the same code path that decoding,
early exits and exit training use.

Parameter tree: ``vision_model``, ``query_tokens`` float[Q, Dq], ``qformer``,
``language_projection``, ``language_model`` (the family's ``lm_params``, see opt.py / t5.py). As in
HF, ``query_tokens`` and the Q-Former stay float32 in half-precision models.

Helpers for decoding and exits (call through ``model.apply(..., method=...)``):
``image_prefix`` (float[B, Q, D_lm]), ``prompt_embeddings`` (the LM's input embeddings) and
``encode`` (T5's encoder state).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import transformers

from free_jax.models import lm_api
from free_jax.models.hf_tensors import read_json
from free_jax.models.opt import OPTConfig, OPTStack
from free_jax.models.qformer import QFormer, QFormerConfig
from free_jax.models.t5 import T5Config, T5Encoded, T5Stack
from free_jax.models.vit import VisionConfig, VisionModel


_TEXT_CONFIGS = {'opt': OPTConfig, 't5': T5Config}


@dataclasses.dataclass(frozen=True)
class Blip2Config:
  """The BLIP-2 shape: vision encoder, Q-Former, language model and the image-token layout."""

  vision: VisionConfig
  qformer: QFormerConfig
  text: OPTConfig | T5Config
  num_query_tokens: int = 32
  image_token_index: int = 50265

  def __post_init__(self):
    if isinstance(self.text, OPTConfig) and self.text.word_embed_proj_dim != self.text.hidden_size:
      # HF projects the queries to hidden_size and scatters them among word embeddings of size
      # word_embed_proj_dim, which silently scrambles them; refuse rather than copy that.
      raise ValueError(f'text_config.word_embed_proj_dim={self.text.word_embed_proj_dim} differs from '
                       f'hidden_size={self.text.hidden_size}: BLIP-2 cannot place its image queries')
    if not 0 <= self.image_token_index < self.text.vocab_size:
      raise ValueError(f'image_token_index={self.image_token_index} is outside the text vocabulary '
                       f'(vocab_size={self.text.vocab_size})')

  @property
  def is_encoder_decoder(self) -> bool:
    return isinstance(self.text, T5Config)

  @classmethod
  def from_hf(cls, hf_config: transformers.Blip2Config) -> 'Blip2Config':
    """From a transformers ``Blip2Config``."""
    text_type = hf_config.text_config.model_type
    if text_type not in _TEXT_CONFIGS:
      raise ValueError(f'text_config.model_type={text_type!r} is not supported; expected one of '
                       f'{sorted(_TEXT_CONFIGS)}')
    if hf_config.image_token_index is None:
      raise ValueError('config has no image_token_index: re-save the checkpoint with transformers>=4.47 '
                       '(its processor puts num_query_tokens image tokens in input_ids)')
    return cls(vision=VisionConfig.from_hf(hf_config.vision_config),
               qformer=QFormerConfig.from_hf(hf_config.qformer_config),
               text=_TEXT_CONFIGS[text_type].from_hf(hf_config.text_config),
               num_query_tokens=hf_config.num_query_tokens,
               image_token_index=hf_config.image_token_index)

  @classmethod
  def from_pretrained(cls, path) -> 'Blip2Config':
    """From the ``config.json`` of a local HF BLIP-2 checkpoint directory (no download)."""
    path = pathlib.Path(path)
    if not path.is_dir():
      raise FileNotFoundError(f'{path}: no such model directory')
    config_file = path / 'config.json'
    if not config_file.is_file():
      raise FileNotFoundError(f'{config_file}: missing (expected an HF BLIP-2 config.json)')
    raw = read_json(config_file)
    if raw.get('model_type') != 'blip-2':
      raise ValueError(f'{config_file}: model_type={raw.get("model_type")!r}, expected "blip-2"')
    text_type = raw.get('text_config', {}).get('model_type')
    if text_type not in _TEXT_CONFIGS:  # before transformers parses (and maybe rejects) it
      raise ValueError(f'{config_file}: text_config.model_type={text_type!r} is not supported; '
                       f'expected one of {sorted(_TEXT_CONFIGS)}')
    return cls.from_hf(transformers.Blip2Config.from_dict(raw))


def lm_stack(config: Blip2Config, dtype=jnp.float32) -> OPTStack | T5Stack:
  """The language model's `lm_api.DecoderStack` (OPT, or T5's decoder with its encoder)."""
  if config.is_encoder_decoder:
    return T5Stack(config.text, dtype)
  return OPTStack(config.text, dtype)


@flax.struct.dataclass
class SequenceInputs:
  """A whole sequence as the LM decoder takes it (`Blip2Model.sequence_inputs`).

  Attributes:
    step_inputs: `lm_api.begin_step` keyword inputs: {'inputs_embeds': float[B, T, E]} (OPT: the prompt
      embeddings with the image prefix in place) or {'input_ids': int[B, T]} (T5: decoder ids).
    valid: bool[B, T] real tokens of that sequence.
    encoder: T5 only: the encoder state (`T5Encoded`); None for OPT.
    encoder_hidden_states: T5 only: the encoder's L_enc + 1 hidden states in HF order; None for OPT.
  """

  step_inputs: dict[str, jax.Array]
  valid: jax.Array
  encoder: T5Encoded | None
  encoder_hidden_states: tuple[jax.Array, ...] | None


@flax.struct.dataclass
class Blip2Output:
  """Model outputs, as HF returns them.

  Attributes:
    logits: float32[B, T, V]; T = input length (decoder-only) or decoder length (T5).
    lm_hidden_states: L + 1 arrays float[B, T, D]: the input of layer 0, then the output of each
      layer, except that the last one is ``final_features`` (after the final norm and, for OPT,
      ``project_out``), exactly as HF ``output_hidden_states`` reports it.
    encoder_hidden_states: T5 only: L_enc + 1 arrays float[B, T_enc, D] in HF order (last one after
      the final norm); None for OPT.
  """

  logits: jax.Array
  lm_hidden_states: tuple[jax.Array, ...]
  encoder_hidden_states: tuple[jax.Array, ...] | None = None


class Blip2Model(nn.Module):
  """HF ``Blip2ForConditionalGeneration`` forward; see the module docstring."""

  config: Blip2Config
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    self.vision_model = VisionModel(cfg.vision, self.dtype)
    self.query_tokens = self.param('query_tokens', nn.initializers.normal(0.02),
                                   (cfg.num_query_tokens, cfg.qformer.hidden_size), jnp.float32)
    self.qformer = QFormer(cfg.qformer, jnp.float32)
    self.language_projection = nn.Dense(self.lm_stack().hidden_size, dtype=self.dtype,
                                        param_dtype=self.dtype)
    self.language_model = self.param('language_model', self.lm_stack().init)

  def lm_stack(self) -> OPTStack | T5Stack:
    """The LM's `DecoderStack`; its params are ``params['language_model']``."""
    return lm_stack(self.config, self.dtype)

  def image_prefix(self, pixel_values: jax.Array) -> jax.Array:
    """float[B, H, W, 3] channels-last pixels -> float[B, Q, D_lm] projected Q-Former outputs."""
    if not jnp.issubdtype(pixel_values.dtype, jnp.floating):
      raise ValueError(f'pixel_values are {pixel_values.dtype}: pass normalised float pixels '
                       '(free_jax.data.preprocess.preprocess_images, as the BLIP-2 image processor does)')
    image = self.vision_model(pixel_values)
    queries = jnp.broadcast_to(self.query_tokens, (image.shape[0], *self.query_tokens.shape))
    return self.language_projection(self.qformer(queries, image).astype(self.dtype))

  def prompt_embeddings(self, pixel_values: jax.Array, input_ids: jax.Array) -> jax.Array:
    """float[B, T, E] LM input embeddings: word embeddings with the image prefix at image tokens.

    The k-th image token of a row gets the k-th query; HF's ``masked_scatter`` does the same when
    every row has exactly ``num_query_tokens`` image tokens, which is how the processor lays them out.
    """
    chex.assert_rank(input_ids, 2)
    chex.assert_equal_shape_prefix([pixel_values, input_ids], 1)
    prefix = self.image_prefix(pixel_values)
    stack = self.lm_stack()
    if isinstance(stack, OPTStack):
      words = stack.embed_tokens(self.language_model, input_ids)
    else:
      words = stack.embed(self.language_model, input_ids=input_ids)
    is_image = input_ids == self.config.image_token_index
    slot = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, self.config.num_query_tokens - 1)
    placed = jnp.take_along_axis(prefix, slot[..., None], axis=1)
    return jnp.where(is_image[..., None], placed.astype(words.dtype), words)

  def encode(self, pixel_values: jax.Array, input_ids: jax.Array,
             attention_mask: jax.Array) -> T5Encoded:
    """T5 only: the encoder state (output and cross-attention K/V) for the decoder."""
    return self.lm_stack().encode(self.language_model,
                                  self.prompt_embeddings(pixel_values, input_ids), attention_mask)

  def decoder_inputs(self, pixel_values: jax.Array, input_ids: jax.Array,
                     attention_mask: jax.Array) -> tuple[jax.Array, jax.Array, T5Encoded | None]:
    """What an LM decoder starts from, for either family: (prompt, prompt_valid bool[B, P], encoder).

    OPT: prompt = the prompt embeddings float[B, P, E] (image prefix in place), valid = the attention mask
    (left padding), encoder None. T5: prompt = the decoder start id int32[B, 1], valid all True, encoder =
    the encoded image + prompt (`encode`).
    """
    if self.config.is_encoder_decoder:
      start = jnp.full((input_ids.shape[0], 1), self.config.text.decoder_start_token_id, jnp.int32)
      return start, jnp.ones_like(start, bool), self.encode(pixel_values, input_ids, attention_mask)
    return self.prompt_embeddings(pixel_values, input_ids), attention_mask.astype(bool), None

  def sequence_inputs(self, pixel_values: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
                      decoder_input_ids: jax.Array | None = None,
                      decoder_attention_mask: jax.Array | None = None) -> 'SequenceInputs':
    """What the LM decoder runs on for a whole (teacher-forced) sequence, for either family.

    OPT: the prompt embeddings (image prefix in place) under the attention mask. T5: the decoder ids under
    the decoder mask (default all valid), with the encoded image + prompt. Shapes as `__call__`'s arguments.
    """
    chex.assert_equal_shape([input_ids, attention_mask])
    embeds = self.prompt_embeddings(pixel_values, input_ids)
    if not self.config.is_encoder_decoder:
      return SequenceInputs({'inputs_embeds': embeds}, attention_mask.astype(bool), None, None)
    if decoder_input_ids is None:
      raise ValueError('decoder_input_ids is required for a T5 (encoder-decoder) BLIP-2')
    if decoder_attention_mask is None:
      decoder_attention_mask = jnp.ones_like(decoder_input_ids)
    chex.assert_equal_shape([decoder_input_ids, decoder_attention_mask])
    encoder, hiddens = self.lm_stack().encode_with_hiddens(self.language_model, embeds, attention_mask)
    return SequenceInputs({'input_ids': decoder_input_ids}, decoder_attention_mask.astype(bool), encoder, hiddens)

  def __call__(self, pixel_values: jax.Array, input_ids: jax.Array,
               attention_mask: jax.Array | None = None, decoder_input_ids: jax.Array | None = None,
               decoder_attention_mask: jax.Array | None = None) -> Blip2Output:
    """Full forward.

    Args:
      pixel_values: float[B, H, W, 3] normalised, channels-last.
      input_ids: int[B, T] with the image tokens (left-padded batches).
      attention_mask: int/bool[B, T], default all ones.
      decoder_input_ids: int[B, T_dec], required for T5 (e.g. `t5.shift_right(labels)`).
      decoder_attention_mask: int/bool[B, T_dec], default all ones (T5 only).

    Returns:
      `Blip2Output`.
    """
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    stack, lm_params = self.lm_stack(), self.language_model
    seq = self.sequence_inputs(pixel_values, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)
    batch, length = seq.valid.shape
    h, cache, ctx = lm_api.begin_step(stack, lm_params, stack.init_cache(batch, length), seq.valid,
                                      encoder=seq.encoder, **seq.step_inputs)
    out, hiddens, _ = stack.run_layers(lm_params, h, cache, ctx, 0, stack.num_layers)
    features = stack.final_features(lm_params, out)
    return Blip2Output(logits=stack.logits(lm_params, features),
                       lm_hidden_states=(h, *hiddens[:-1], features),
                       encoder_hidden_states=seq.encoder_hidden_states)
