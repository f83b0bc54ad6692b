"""The budget's parameter counts equal transformers' own, and its memory/throughput model is consistent.

Reference counts come from `Blip2ForConditionalGeneration` instantiated on torch's meta device: shapes
only, no memory, so the full-size BLIP-2 models cost nothing.
"""

import dataclasses

import numpy as np
import pytest
import torch
import transformers

from free_jax import budget

_TINY_OPT = budget.LMShape('opt', hidden=32, layers=2, heads=4, ffn=48, vocab=100, max_positions=40,
                           word_embed_proj_dim=16)
_TINY_T5 = budget.LMShape('t5', hidden=32, layers=3, heads=4, ffn=48, vocab=100, head_dim=16,
                          encoder_layers=2, relative_attention_buckets=8)
TINY = (
    budget.Blip2Shape(
        'tiny-opt', _TINY_OPT,
        vision=budget.VisionShape(hidden=24, layers=2, heads=2, ffn=40, image_size=32, patch_size=8),
        qformer=budget.QFormerShape(hidden=16, layers=3, heads=2, ffn=20, num_queries=4)),
    budget.Blip2Shape(
        'tiny-t5', _TINY_T5,
        vision=budget.VisionShape(hidden=24, layers=1, heads=2, ffn=40, image_size=28, patch_size=14),
        qformer=budget.QFormerShape(hidden=16, layers=2, heads=2, ffn=20, cross_attention_frequency=1,
                                    num_queries=3)),
)
# Nominal LM sizes in the checkpoints' names (Flan-T5-XL is "3B"; it has 2.85e9 params).
NOMINAL_LM = {'blip2-opt-2.7b': 2.7e9, 'blip2-opt-6.7b': 6.7e9, 'blip2-flan-t5-xl': 3e9,
              'blip2-flan-t5-xxl': 11e9}


def _hf_config(shape: budget.Blip2Shape) -> transformers.Blip2Config:
  v, q, lm = shape.vision, shape.qformer, shape.lm
  vision = dict(hidden_size=v.hidden, num_hidden_layers=v.layers, num_attention_heads=v.heads,
                intermediate_size=v.ffn, image_size=v.image_size, patch_size=v.patch_size)
  qformer = dict(hidden_size=q.hidden, num_hidden_layers=q.layers, num_attention_heads=q.heads,
                 intermediate_size=q.ffn, cross_attention_frequency=q.cross_attention_frequency,
                 encoder_hidden_size=v.hidden)
  if lm.family == 'opt':
    text = transformers.OPTConfig(hidden_size=lm.hidden, num_hidden_layers=lm.layers,
                                  num_attention_heads=lm.heads, ffn_dim=lm.ffn, vocab_size=lm.vocab,
                                  max_position_embeddings=lm.max_positions,
                                  word_embed_proj_dim=lm.word_embed_proj_dim or lm.hidden)
  else:
    text = transformers.T5Config(d_model=lm.hidden, num_layers=lm.encoder_layers,
                                 num_decoder_layers=lm.layers, num_heads=lm.heads, d_kv=lm.head_dim,
                                 d_ff=lm.ffn, vocab_size=lm.vocab,
                                 feed_forward_proj='gated-gelu', tie_word_embeddings=False,
                                 relative_attention_num_buckets=lm.relative_attention_buckets)
  return transformers.Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text.to_dict(),
                                  num_query_tokens=q.num_queries)


def _hf_counts(shape: budget.Blip2Shape) -> dict[str, int]:
  with torch.device('meta'):
    model = transformers.Blip2ForConditionalGeneration(_hf_config(shape))
    if shape.lm.family == 't5':
      # transformers 5 ties T5's head to `shared` at construction and unties it only when a
      # checkpoint holds both, as Flan-T5's do (tests/hf_fixtures.py does the same).
      lm = model.language_model
      assert not lm.config.scale_decoder_outputs  # i.e. built from tie_word_embeddings=False
      lm.lm_head.weight = torch.nn.Parameter(torch.empty_like(lm.lm_head.weight))
  count = lambda module: sum(p.numel() for p in module.parameters())
  counts = {'vision_model': count(model.vision_model),
            'qformer': count(model.qformer) + model.query_tokens.numel(),
            'language_projection': count(model.language_projection),
            'language_model': count(model.language_model)}
  assert sum(counts.values()) == count(model)  # nothing left out
  return dict(counts, total=count(model))


@pytest.mark.parametrize('shape', TINY, ids=lambda s: s.name)
def test_counts_equal_transformers_on_tiny_configs(shape):
  assert budget.blip2_params(shape) == _hf_counts(shape)


@pytest.mark.parametrize('name', sorted(budget.MODELS))
def test_counts_equal_transformers_at_full_size(name):
  shape = budget.MODELS[name]
  counts = budget.blip2_params(shape)
  assert counts == _hf_counts(shape)
  np.testing.assert_allclose(counts['language_model'], NOMINAL_LM[name], rtol=0.06)
  # The vision and Q-Former shapes are BLIP-2's (transformers' defaults: Salesforce/blip2-opt-2.7b).
  defaults = transformers.Blip2Config()
  assert (shape.vision.hidden, shape.vision.layers, shape.vision.ffn) == (
      defaults.vision_config.hidden_size, defaults.vision_config.num_hidden_layers,
      defaults.vision_config.intermediate_size)
  qformer = defaults.qformer_config
  assert (shape.qformer.hidden, shape.qformer.layers, shape.qformer.num_queries) == (
      qformer.hidden_size, qformer.num_hidden_layers, defaults.num_query_tokens)


def test_exit_layer_is_one_decoder_layer_of_the_lm():
  for shape in budget.MODELS.values():
    lm = budget.blip2_params(shape)['language_model']
    per_layer = budget.lm_layer_params(shape.lm)
    # The decoder layers are most of a decoder-only LM, about half of an encoder-decoder's.
    share = shape.lm.layers * per_layer / lm
    assert (0.9 < share < 1.0) if shape.lm.family == 'opt' else (0.5 < share < 0.6), (shape.name, share)


def test_fsdp_divides_the_backbone_and_raises_the_batch_that_fits():
  for shape in budget.MODELS.values():
    for accel in budget.ACCELERATORS.values():
      rep = budget.budget(shape, accel, 'replicated')
      fsdp = budget.budget(shape, accel, 'fsdp')
      assert fsdp.backbone_bytes < rep.backbone_bytes / 2
      assert fsdp.backbone_bytes >= rep.backbone_bytes / accel.devices
      assert fsdp.trainable_bytes == rep.trainable_bytes and fsdp.activation_bytes == rep.activation_bytes
      assert fsdp.max_batch > rep.max_batch
      assert fsdp.step_seconds >= rep.step_seconds  # the gathers cost time (when not hidden by compute)


def test_max_batch_is_the_largest_that_fits():
  for shape in budget.MODELS.values():
    for accel in budget.ACCELERATORS.values():
      for mode in budget.MODES:
        row = budget.budget(shape, accel, mode)
        assert row.fits == (row.total_bytes <= row.usable_bytes)
        bigger = budget.budget(shape, accel, mode, budget.Workload(per_device_batch=row.max_batch + 1))
        assert not bigger.fits
        if row.max_batch:
          assert budget.budget(shape, accel, mode, budget.Workload(per_device_batch=row.max_batch)).fits


def test_activations_and_step_time_scale_with_the_batch():
  shape, accel = budget.MODELS['blip2-opt-2.7b'], budget.ACCELERATORS['H200']
  one = budget.activation_bytes(shape, budget.Workload(), 1)
  four = budget.activation_bytes(shape, budget.Workload(), 4)
  assert four == {k: 4 * v for k, v in one.items()}
  w = budget.Workload(per_device_batch=64)
  slow = budget.budget(shape, accel, 'replicated', dataclasses.replace(w, mfu=0.2))
  fast = budget.budget(shape, accel, 'replicated', w)
  np.testing.assert_allclose(slow.step_seconds, 2 * fast.step_seconds)
  # Per example, the frozen forward of a 3.7e9-param BLIP-2 costs at least 2 * LM params * LM tokens.
  tokens = shape.qformer.num_queries + w.prompt_tokens + w.target_tokens
  assert budget.forward_flops(shape, w) > 2 * budget.blip2_params(shape)['language_model'] * tokens * 0.9


def test_table_lists_every_combination_and_bad_modes_are_clear():
  rows = budget.budget_table()
  assert len(rows) == len(budget.MODELS) * len(budget.ACCELERATORS) * len(budget.MODES)
  text = budget.table_markdown(rows)
  assert len(text.splitlines()) == 2 + len(rows)
  for name in list(budget.MODELS) + list(budget.ACCELERATORS):
    assert name in text
  with pytest.raises(ValueError, match=r"backbone_sharding='zero3'; expected one of \('replicated', 'fsdp'"):
    budget.budget(budget.MODELS['blip2-opt-2.7b'], budget.ACCELERATORS['H200'], 'zero3')
