"""Tiny random transformers BLIP-2 models and inputs, for parity, decoding and training tests.

Everything is built offline from configs (no hub access) with `torch.manual_seed`, so a test gets the
same weights every run. Typical use::

  from tests.hf_fixtures import blip2_inputs, save_tiny_blip2
  path = save_tiny_blip2(tmp_path / 'opt', 'opt')              # config.json + model.safetensors
  model, params = free_jax.load_pretrained(path)
  batch = blip2_inputs(model.config, batch=2, prompt_lengths=(3, 5))

`text` selects the language model: 'opt' (decoder-only) or 't5' (Flan-T5-style encoder-decoder).
Keyword overrides go to the text config (e.g. ``num_hidden_layers=4`` for OPT, ``num_layers=3`` or
``feed_forward_proj='relu'`` for T5).
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch
import transformers

VOCAB_SIZE = 100
IMAGE_TOKEN_INDEX = VOCAB_SIZE - 1  # like real BLIP-2 checkpoints: an extra token at the vocab end
NUM_QUERY_TOKENS = 4
IMAGE_SIZE = 16

_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               image_size=IMAGE_SIZE, patch_size=8, layer_norm_eps=1e-6)
_QFORMER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                cross_attention_frequency=1)
_OPT = dict(model_type='opt', vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
            num_attention_heads=4, max_position_embeddings=64, pad_token_id=1, bos_token_id=2,
            eos_token_id=2)
_T5 = dict(model_type='t5', vocab_size=VOCAB_SIZE, d_model=32, d_kv=8, d_ff=64, num_layers=2,
           num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
           relative_attention_max_distance=16, feed_forward_proj='gated-gelu',
           tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def text_config(text: str, **overrides) -> dict:
  """The tiny text-config dict for 'opt' or 't5' with `overrides` applied."""
  base = {'opt': _OPT, 't5': _T5}.get(text)
  if base is None:
    raise ValueError(f'text={text!r}: expected "opt" or "t5"')
  return {**base, **overrides}


def tiny_blip2_config(text: str = 'opt', qformer: dict | None = None,
                      **text_overrides) -> transformers.Blip2Config:
  """A transformers `Blip2Config` with a tiny ViT, Q-Former and OPT/T5 (vocab 100, 4 queries)."""
  return transformers.Blip2Config(
      vision_config=dict(_VISION), qformer_config={**_QFORMER, **(qformer or {})},
      text_config=text_config(text, **text_overrides), num_query_tokens=NUM_QUERY_TOKENS,
      image_token_index=IMAGE_TOKEN_INDEX)


def tiny_blip2(text: str = 'opt', seed: int = 0, qformer: dict | None = None,
               **text_overrides) -> transformers.Blip2ForConditionalGeneration:
  """A seeded random `Blip2ForConditionalGeneration` in eval mode (float32, eager attention)."""
  torch.manual_seed(seed)
  config = tiny_blip2_config(text, qformer, **text_overrides)
  config._attn_implementation = 'eager'
  model = transformers.Blip2ForConditionalGeneration(config).eval()
  # HF initialises the ViT with a tiny std (1e-10) and some norms/biases to constants; random
  # values everywhere make the parity tests exercise every tensor.
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.2)
  if text == 't5' and not config.text_config.scale_decoder_outputs:
    # A Flan-T5 (untied) head: transformers 5 always ties lm_head to `shared` at construction and
    # only unties when a checkpoint holds both, so give it its own tensor before saving.
    lm = model.language_model
    lm.lm_head.weight = torch.nn.Parameter(torch.randn_like(lm.lm_head.weight) * 0.2)
  return model


def save_tiny_blip2(path, text: str = 'opt', seed: int = 0, max_shard_size: str | None = None,
                    qformer: dict | None = None, **text_overrides) -> pathlib.Path:
  """Builds `tiny_blip2(...)` and `save_pretrained`s it to `path` (sharded if `max_shard_size`)."""
  path = pathlib.Path(path)
  model = tiny_blip2(text, seed, qformer, **text_overrides)
  kwargs = {} if max_shard_size is None else {'max_shard_size': max_shard_size}
  model.save_pretrained(path, **kwargs)
  return path


def blip2_inputs(batch: int = 2, prompt_lengths=(3, 5), seed: int = 0,
                 pad_token_id: int = 1, bos_token_id: int | None = 2) -> dict[str, np.ndarray]:
  """Left-padded BLIP-2 inputs as the transformers 5 processor lays them out.

  Each row is ``[pad]*p + [image]*NUM_QUERY_TOKENS + [bos] + prompt`` with prompt lengths cycling
  through `prompt_lengths` (the BOS is omitted when `bos_token_id` is None, as for T5).

  Returns:
    pixel_values float32[B, H, W, 3] (channels-last; ``np.transpose(x, (0, 3, 1, 2))`` for torch),
    input_ids int32[B, T], attention_mask int32[B, T].
  """
  rng = np.random.default_rng(seed)
  lengths = [prompt_lengths[i % len(prompt_lengths)] for i in range(batch)]
  prefix = [IMAGE_TOKEN_INDEX] * NUM_QUERY_TOKENS + ([] if bos_token_id is None else [bos_token_id])
  rows = [prefix + list(rng.integers(3, IMAGE_TOKEN_INDEX, n)) for n in lengths]
  width = max(len(r) for r in rows)
  input_ids = np.full((batch, width), pad_token_id, np.int32)
  attention_mask = np.zeros((batch, width), np.int32)
  for b, row in enumerate(rows):
    input_ids[b, width - len(row):] = row
    attention_mask[b, width - len(row):] = 1
  pixel_values = rng.standard_normal((batch, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  return {'pixel_values': pixel_values, 'input_ids': input_ids, 'attention_mask': attention_mask}


def torch_inputs(inputs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
  """`blip2_inputs` output as the tensors HF expects (NCHW pixels, int64 ids)."""
  out = {k: torch.from_numpy(np.asarray(v)).long() for k, v in inputs.items() if k != 'pixel_values'}
  out['pixel_values'] = torch.from_numpy(np.transpose(inputs['pixel_values'], (0, 3, 1, 2)).copy())
  return out
