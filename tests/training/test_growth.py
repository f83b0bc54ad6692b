"""Function-preserving widening: the grown BLIP-2 computes the narrow one's logits, and can train apart."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import vqa
from free_jax.models import blip2
from free_jax.training import growth, parallel, pipeline


@pytest.fixture(scope='module')
def narrow():
  config = vqa.get_config('smoke')
  backbone = pipeline.untrained_backbone(config)
  return config, backbone


def _wide(config: blip2.Blip2Config, **text) -> blip2.Blip2Config:
  return dataclasses.replace(config, text=dataclasses.replace(config.text, **text))


def _inputs(backbone):
  fmt = backbone.fmt
  pixels = jax.random.uniform(jax.random.key(0), (2, fmt.image_size, fmt.image_size, 3))
  ids = jax.random.randint(jax.random.key(1), (2, 9), 5, backbone.model.config.text.vocab_size)
  ids = jnp.concatenate([jnp.full((2, fmt.num_query_tokens), backbone.model.config.image_token_index), ids], 1)
  return pixels, ids, jnp.ones_like(ids).at[1, -3:].set(0)


@pytest.mark.parametrize('text', [dict(hidden_size=128, word_embed_proj_dim=128, ffn_dim=256, num_attention_heads=4),
                                  dict(hidden_size=64, word_embed_proj_dim=64, ffn_dim=64, num_attention_heads=2),
                                  dict(hidden_size=64, word_embed_proj_dim=64, ffn_dim=128, num_attention_heads=4)])
def test_grown_model_computes_the_narrow_models_outputs(narrow, text):
  _, backbone = narrow
  wide = _wide(backbone.model.config, **text)
  params = growth.widen(backbone.params, backbone.model.config, wide, seed=0, split_noise=0.5)
  want = backbone.model.apply({'params': backbone.params}, *_inputs(backbone))
  got = blip2.Blip2Model(wide).apply({'params': params}, *_inputs(backbone))
  valid = np.asarray(_inputs(backbone)[2], bool)
  np.testing.assert_allclose(np.asarray(got.logits)[valid], np.asarray(want.logits)[valid], atol=2e-5, rtol=1e-4)
  # The residual stream is the narrow one tiled: hidden state after layer 2, copy 3 == the narrow one.
  d = backbone.model.lm_stack().hidden_size
  np.testing.assert_allclose(np.asarray(got.lm_hidden_states[2])[..., 3 * d:4 * d][valid] if text['hidden_size'] >= 4 * d
                             else np.asarray(got.lm_hidden_states[2])[..., d:2 * d][valid],
                             np.asarray(want.lm_hidden_states[2])[valid], atol=2e-5, rtol=1e-4)


def test_random_split_breaks_the_symmetry_of_the_copies(narrow):
  _, backbone = narrow
  d = backbone.model.lm_stack().hidden_size
  wide = _wide(backbone.model.config, hidden_size=2 * d, word_embed_proj_dim=2 * d)
  fc1 = lambda noise: np.asarray(growth.widen(backbone.params, backbone.model.config, wide, 0, noise)
                                 ['language_model']['layers']['mlp']['fc1']['kernel'])
  equal, split = fc1(0.0), fc1(0.5)
  np.testing.assert_array_equal(equal[:, :d], equal[:, d:])  # equal split: the copies would train alike
  assert not np.allclose(split[:, :d], split[:, d:])
  np.testing.assert_allclose(split[:, :d] + split[:, d:], 2 * equal[:, :d], atol=1e-6)


@pytest.mark.parametrize('text, match', [
    (dict(hidden_size=48, word_embed_proj_dim=48), r'wide width \(48\) to be a multiple of the narrow one \(32\)'),
    (dict(num_hidden_layers=6), 'growth keeps text.num_hidden_layers: 4 in the narrow model, 6 in the wide one'),
    (dict(hidden_size=64, word_embed_proj_dim=64, num_attention_heads=1), r'wide number of heads \(1\)'),
])
def test_ungrowable_pairs_are_refused_in_one_line(narrow, text, match):
  _, backbone = narrow
  with pytest.raises(ValueError, match=match):
    growth.check_growable(backbone.model.config, _wide(backbone.model.config, **text))


def test_config_names_a_bad_grow_from_before_any_work(narrow, tmp_path):
  config = vqa.get_config('smoke')
  with config.unlocked():
    config.backbone_train.grow_from = str(tmp_path)
  with pytest.raises(ValueError, match=r'backbone_train.grow_from=.* holds no HF BLIP-2 config.json'):
    pipeline.validate_config(config)
  with config.unlocked():
    config.backbone_train.grow_split_noise = 1.0
  with pytest.raises(ValueError, match=r'backbone_train.grow_split_noise=1.0 must be in \[0, 1\)'):
    pipeline.validate_config(config)


def test_a_grown_backbone_trains_on_and_is_restored_without_regrowing(smoke_run, tmp_path, monkeypatch):
  config = vqa.get_config('smoke')
  with config.unlocked():
    e = config.model.embedded
    e.lm_hidden, e.lm_ffn = 2 * e.lm_hidden, 2 * e.lm_ffn
    config.backbone_train.grow_from = str(smoke_run[0] / 'backbone' / 'hf')
    config.backbone_train.steps, config.backbone_train.warmup_steps = 2, 0
  mesh = parallel.make_mesh(1)
  trained = pipeline.backbone_stage(config, str(tmp_path / 'run'), mesh)
  assert trained.model.lm_stack().hidden_size == config.model.embedded.lm_hidden
  monkeypatch.setattr(growth, 'widen', lambda *a, **k: pytest.fail('a finished backbone was grown again'))
  restored = pipeline.load_backbone(config, str(tmp_path / 'run'))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored.params),
               jax.tree.map(np.asarray, trained.params))
