"""Function-preserving widening of a trained OPT BLIP-2 (Net2WiderNet, Chen et al., ICLR 2016).

A wide embedded backbone costs hours to train from scratch on a CPU; grown from a trained narrow one it starts
where the narrow one ended and only has to be trained on. `widen` maps the narrow params onto a wider LM
(width D -> r D, FFN F -> s F, H heads of Dh -> H' heads of Dh', same depth, vocabulary and vision side):

- every residual-stream vector is the narrow one tiled r times (`[h, h, ..., h]`). A LayerNorm of a tiled
  vector is the tiled LayerNorm (same mean and variance), so the norms keep their tiled scale and bias;
- a linear layer reads its tiled input through weights split over the copies of each input unit (the split
  fractions of a unit sum to 1, so the output is unchanged) and writes the tiled output;
- head h' of the wide attention is narrow head h' mod H with every dimension repeated Dh'/Dh times; the
  queries are scaled by sqrt(Dh / Dh') so that the wider head's Dh'^-0.5 gives the narrow scores;
- the final LayerNorm is divided by r: the LM head is tied to the (tiled) token embeddings, and their
  product over r copies would otherwise multiply the logits by r.

The wide model computes the narrow one's logits (up to float rounding). Equal split fractions would leave
the copies of a unit with equal gradients forever; random fractions (`split_noise`) keep the function and
break that symmetry, so training can make the copies diverge.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from free_jax.models import blip2
from free_jax.models.opt import OPTConfig

PyTree = Any


def check_growable(narrow: blip2.Blip2Config, wide: blip2.Blip2Config) -> None:
  """A one-line ValueError unless `widen` can map `narrow` onto `wide` (OPT, same vision side and depth)."""
  a, b = narrow.text, wide.text
  if not isinstance(a, OPTConfig) or not isinstance(b, OPTConfig):
    raise ValueError('growth widens OPT language models only')
  if narrow.vision != wide.vision or narrow.qformer != wide.qformer or narrow.num_query_tokens != wide.num_query_tokens:
    raise ValueError('growth keeps the vision encoder and Q-Former: their configs must match the grown model\'s')
  for field in ('vocab_size', 'num_hidden_layers', 'max_position_embeddings', 'do_layer_norm_before',
                'activation_function', 'enable_bias', 'tie_word_embeddings'):
    if getattr(a, field) != getattr(b, field):
      raise ValueError(f'growth keeps text.{field}: {getattr(a, field)} in the narrow model, {getattr(b, field)} in '
                       'the wide one')
  if a.has_projections or b.has_projections or not a.has_final_layer_norm:
    raise ValueError('growth needs pre-LN OPT models without project_in/out')
  for name, n, m in (('width', a.hidden_size, b.hidden_size), ('FFN width', a.ffn_dim, b.ffn_dim),
                     ('number of heads', a.num_attention_heads, b.num_attention_heads),
                     ('head size', a.head_dim, b.head_dim)):
    if m < n or m % n:
      raise ValueError(f'growth needs the wide {name} ({m}) to be a multiple of the narrow one ({n})')


def _head_map(heads: int, head_dim: int, wide_heads: int, wide_head_dim: int) -> np.ndarray:
  """int[H' Dh']: the narrow attention unit each wide one copies (head h' <- h' mod H, dims repeated)."""
  wide = np.arange(wide_heads * wide_head_dim)
  head, dim = wide // wide_head_dim, wide % wide_head_dim
  return (head % heads) * head_dim + dim % head_dim


def _split(shape: tuple[int, ...], in_map: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
  """float[..., I', O']: the fractions of each narrow input unit's weight given to its wide copies (per
  layer and output column they sum to 1 over the copies of a unit)."""
  raw = 1.0 + noise * rng.uniform(-1.0, 1.0, size=shape)
  copies = np.eye(in_map.max() + 1)[in_map]  # [I', I]: wide unit -> the narrow unit it copies
  totals = np.einsum('...io,ij->...jo', raw, copies)
  return raw / totals[..., in_map, :]


def _linear(params: dict, in_map: np.ndarray, out_map: np.ndarray, noise: float, rng: np.random.Generator,
            out_scale: float = 1.0) -> dict:
  """{kernel: float[..., I, O], bias: float[..., O]} -> the wide layer reading copies `in_map`, writing `out_map`."""
  kernel = np.asarray(params['kernel'], np.float64)
  wide = kernel[..., in_map, :][..., out_map]
  wide = wide * _split(wide.shape, in_map, noise, rng) * out_scale
  out = {'kernel': wide.astype(params['kernel'].dtype)}
  if 'bias' in params:
    out['bias'] = (np.asarray(params['bias'], np.float64)[..., out_map] * out_scale).astype(params['bias'].dtype)
  return out


def _norm(params: dict, res_map: np.ndarray, scale: float = 1.0) -> dict:
  return {k: (np.asarray(v)[..., res_map] * scale).astype(v.dtype) for k, v in params.items()}


def widen(params: PyTree, narrow: blip2.Blip2Config, wide: blip2.Blip2Config, seed: int,
          split_noise: float = 0.5) -> PyTree:
  """The narrow BLIP-2's params as params of the `wide` config computing the same function (module docstring).

  Args:
    params: `Blip2Model` params of `narrow` (float32 or bfloat16; the result keeps each leaf's dtype).
    narrow, wide: the two configs (`check_growable`).
    seed: seed of the random split fractions.
    split_noise: the fractions are (1 + split_noise * U[-1, 1]) normalised over a unit's copies (0: equal
      split, the copies then never diverge in training); in [0, 1).
  """
  check_growable(narrow, wide)
  if not 0.0 <= split_noise < 1.0:
    raise ValueError(f'split_noise={split_noise} must be in [0, 1)')
  a, b = narrow.text, wide.text
  rng = np.random.default_rng(seed)
  res = np.arange(b.hidden_size) % a.hidden_size
  ffn = np.arange(b.ffn_dim) % a.ffn_dim
  attn = _head_map(a.num_attention_heads, a.head_dim, b.num_attention_heads, b.head_dim)
  q_scale = float(np.sqrt(a.head_dim / b.head_dim))
  lm = params['language_model']
  layers = lm['layers']
  attn_params = layers['self_attn']
  wide_layers = {
      'self_attn_layer_norm': _norm(layers['self_attn_layer_norm'], res),
      'final_layer_norm': _norm(layers['final_layer_norm'], res),
      'self_attn': {
          'q_proj': _linear(attn_params['q_proj'], res, attn, split_noise, rng, q_scale),
          'k_proj': _linear(attn_params['k_proj'], res, attn, split_noise, rng),
          'v_proj': _linear(attn_params['v_proj'], res, attn, split_noise, rng),
          'out_proj': _linear(attn_params['out_proj'], attn, res, split_noise, rng)},
      'mlp': {'fc1': _linear(layers['mlp']['fc1'], res, ffn, split_noise, rng),
              'fc2': _linear(layers['mlp']['fc2'], ffn, res, split_noise, rng)},
  }
  wide_lm = {
      'embed_tokens': _norm(lm['embed_tokens'], res),
      'embed_positions': _norm(lm['embed_positions'], res),
      # Tied head: the logits sum over r copies of the embedding, so the features are r times smaller.
      'final_layer_norm': _norm(lm['final_layer_norm'], res, a.hidden_size / b.hidden_size),
      'layers': wide_layers,
  }
  grown = dict(params)
  grown['language_projection'] = _linear(params['language_projection'],
                                         np.arange(params['language_projection']['kernel'].shape[0]), res, 0.0, rng)
  grown['language_model'] = wide_lm
  return jax.tree_util.tree_map(jax.numpy.asarray, grown)
