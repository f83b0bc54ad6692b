"""Parity of the Flax BLIP-2 vision encoder and Q-Former with transformers 5 (PyTorch), and converters."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel

from free_jax.models.hf_tensors import TensorSource, WeightsError
from free_jax.models.qformer import QFormer, QFormerConfig, qformer_params_from_hf
from free_jax.models.vit import VisionConfig, VisionModel, vision_params_from_hf

F32_TOL = 1e-4
# bf16 keeps 8 mantissa bits. Observed on these random weights: ViT max 5.3e-2; the Q-Former (post-LN
# residuals, no pre-LN rescue) max 0.39, mean 4.3e-2 -- which is why HF, and BLIP-2 here, keep it in f32.
VIT_BF16_TOL = 1e-1
QFORMER_BF16_MAX, QFORMER_BF16_MEAN = 0.6, 0.1


def _randomized_state(model: torch.nn.Module, seed: int) -> dict[str, np.ndarray]:
  """Perturbs every parameter (HF's init leaves biases, q/k/v biases and LayerNorms trivial)."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.3 * torch.randn_like(p))
  model.eval()
  return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def _shapes(tree):
  return jax.tree.map(lambda x: tuple(x.shape), tree)


def _vision_setup(hidden_act='gelu'):
  hf_config = Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                num_attention_heads=4, image_size=32, patch_size=8, hidden_act=hidden_act)
  hf_model = Blip2VisionModel(hf_config)
  state = _randomized_state(hf_model, seed=0)
  return hf_config, hf_model, state


@pytest.mark.parametrize('hidden_act', ['gelu', 'gelu_pytorch_tanh'])
def test_vision_matches_transformers(hidden_act):
  hf_config, hf_model, state = _vision_setup(hidden_act)
  config = VisionConfig.from_hf(hf_config)
  get = TensorSource(state)
  params = vision_params_from_hf(get, config)
  assert get.unused() == []

  pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    expected = hf_model(pixel_values=pixels).last_hidden_state.numpy()
  model = VisionModel(config)
  got = model.apply({'params': params}, jnp.asarray(pixels.numpy().transpose(0, 2, 3, 1)))
  assert got.shape == (2, 1 + config.num_patches, 32) == expected.shape
  np.testing.assert_allclose(np.asarray(got), expected, atol=F32_TOL, rtol=0)

  # bfloat16 compute (params cast too, as a bf16 checkpoint would load) stays close to the f32 reference.
  bf16 = VisionModel(config, dtype=jnp.bfloat16)
  params16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
  got16 = bf16.apply({'params': params16}, jnp.asarray(pixels.numpy().transpose(0, 2, 3, 1), jnp.bfloat16))
  assert got16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got16, np.float32), expected, atol=VIT_BF16_TOL, rtol=0)


def test_vision_converted_tree_is_init_tree():
  hf_config, _, state = _vision_setup()
  config = VisionConfig.from_hf(hf_config)
  init = jax.eval_shape(VisionModel(config).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
  assert _shapes(vision_params_from_hf(TensorSource(state), config)) == _shapes(init)


def test_vision_weight_errors_name_the_key():
  hf_config, _, state = _vision_setup()
  config = VisionConfig.from_hf(hf_config)
  missing = {f'vision_model.{k}': v for k, v in state.items() if k != 'encoder.layers.1.mlp.fc2.weight'}
  with pytest.raises(WeightsError, match=re.escape("'vision_model.encoder.layers.1.mlp.fc2.weight'")):
    vision_params_from_hf(TensorSource(missing).child('vision_model.'), config)
  bad = dict(state, **{'embeddings.position_embedding': state['embeddings.position_embedding'][:, :5]})
  with pytest.raises(WeightsError, match=re.escape("'embeddings.position_embedding' has shape (1, 5, 32)")):
    vision_params_from_hf(TensorSource(bad), config)


def test_vision_rejects_wrong_image_size():
  config = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                        image_size=32, patch_size=8)
  with pytest.raises(ValueError, match=re.escape('pixel_values has shape (1, 3, 32, 32)')):
    VisionModel(config).init(jax.random.key(0), jnp.zeros((1, 3, 32, 32)))


def _qformer_setup(frequency):
  hf_config = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                 intermediate_size=64, cross_attention_frequency=frequency,
                                 encoder_hidden_size=48)
  hf_model = Blip2QFormerModel(hf_config)
  state = _randomized_state(hf_model, seed=frequency)
  return hf_config, hf_model, state


@pytest.mark.parametrize('frequency', [1, 2])
def test_qformer_matches_transformers(frequency):
  hf_config, hf_model, state = _qformer_setup(frequency)
  config = QFormerConfig.from_hf(hf_config)
  get = TensorSource(state)
  params = qformer_params_from_hf(get, config)
  assert get.unused() == []
  num_cross = sum('crossattention' in layer for layer in params.values())
  assert num_cross == len(range(0, 3, frequency))

  gen = torch.Generator().manual_seed(2)
  queries = torch.randn(2, 8, 32, generator=gen)
  image = torch.randn(2, 17, 48, generator=gen)
  # Row 0 sees every image token; row 1 only the first 9.
  mask = torch.ones(2, 17, dtype=torch.long)
  mask[1, 9:] = 0
  model = QFormer(config)
  with torch.no_grad():
    expected_full = hf_model(query_embeds=queries, encoder_hidden_states=image,
                             encoder_attention_mask=torch.ones_like(mask)).last_hidden_state.numpy()
    expected_masked = hf_model(query_embeds=queries, encoder_hidden_states=image,
                               encoder_attention_mask=mask).last_hidden_state.numpy()
  q, x = jnp.asarray(queries.numpy()), jnp.asarray(image.numpy())
  got_full = model.apply({'params': params}, q, x)
  got_masked = model.apply({'params': params}, q, x, jnp.asarray(mask.numpy(), bool))
  np.testing.assert_allclose(np.asarray(got_full), expected_full, atol=F32_TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(got_masked), expected_masked, atol=F32_TOL, rtol=0)
  assert np.abs(expected_full[1] - expected_masked[1]).max() > 1e-2  # the mask matters

  got16 = QFormer(config, dtype=jnp.bfloat16).apply(
      {'params': params}, q.astype(jnp.bfloat16), x.astype(jnp.bfloat16))
  assert got16.dtype == jnp.bfloat16
  err16 = np.abs(np.asarray(got16, np.float32) - expected_full)
  assert err16.max() < QFORMER_BF16_MAX and err16.mean() < QFORMER_BF16_MEAN


def test_qformer_converted_tree_is_init_tree():
  hf_config, _, state = _qformer_setup(2)
  config = QFormerConfig.from_hf(hf_config)
  init = jax.eval_shape(QFormer(config).init, jax.random.key(0), jnp.zeros((1, 8, 32)),
                        jnp.zeros((1, 17, 48)))['params']
  assert _shapes(qformer_params_from_hf(TensorSource(state), config)) == _shapes(init)


def test_qformer_weight_errors_name_the_key():
  hf_config, _, state = _qformer_setup(2)
  config = QFormerConfig.from_hf(hf_config)
  key = 'encoder.layer.2.crossattention.attention.key.weight'
  missing = {f'qformer.{k}': v for k, v in state.items() if k != key}
  with pytest.raises(WeightsError, match=re.escape(f"missing tensor 'qformer.{key}'")):
    qformer_params_from_hf(TensorSource(missing).child('qformer.'), config)
  # A Q-Former config whose encoder_hidden_size disagrees with the checkpoint's cross-attention.
  wrong = QFormerConfig.from_hf(Blip2QFormerConfig(**{**hf_config.to_dict(), 'encoder_hidden_size': 40}))
  key = 'encoder.layer.0.crossattention.attention.key.weight'
  expected_error = f"'{key}' has shape (32, 48), the config expects (32, 40)"
  with pytest.raises(WeightsError, match=re.escape(expected_error)):
    qformer_params_from_hf(TensorSource(state), wrong)
