"""OPT as a DecoderStack: parity with transformers' OPTForCausalLM, cache and layer-range identities."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from free_jax.models import lm_api
from free_jax.models.lm_api import lm_step
from free_jax.models.hf_tensors import TensorSource
from free_jax.models.opt import OPTConfig, OPTLayer, OPTStack, opt_params_from_hf
from tests.hf_fixtures import text_config

VARIANTS = {
    # BLIP-2 cannot use project_in/out (see test_blip2_parity), so they are checked here.
    'projections': dict(word_embed_proj_dim=16),
    'post_ln_3_layers': dict(do_layer_norm_before=False, num_hidden_layers=3),
    'untied_no_bias_no_affine': dict(tie_word_embeddings=False, enable_bias=False,
                                     layer_norm_elementwise_affine=False, num_attention_heads=2),
}


def _hf_opt(seed=0, **overrides):
  torch.manual_seed(seed)
  fields = {k: v for k, v in text_config('opt', **overrides).items() if k != 'model_type'}
  config = transformers.OPTConfig(**fields)
  config._attn_implementation = 'eager'
  model = transformers.OPTForCausalLM(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.2)
  return model


def _load(hf_model):
  get = TensorSource({k: v.numpy() for k, v in hf_model.state_dict().items()})
  config = OPTConfig.from_hf(hf_model.config)
  lm_params = jax.tree.map(jnp.asarray, opt_params_from_hf(get, config))
  assert get.unused() == []
  return OPTStack(config), lm_params


def _batch(seed=0, batch=3, length=9):
  """Left-padded ids int[B, T] and mask bool[B, T] with rows of different lengths."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, 99, (batch, length))
  mask = np.ones((batch, length), bool)
  for b in range(batch):
    mask[b, :2 * b] = False
  return jnp.asarray(ids), jnp.asarray(mask)


@functools.partial(jax.jit, static_argnums=0)
def _full_forward(stack, lm_params, ids, mask):
  cache = stack.init_cache(*ids.shape)
  h, cache, ctx = lm_api.begin_step(stack, lm_params, cache, mask, input_ids=ids)
  out, hiddens, cache = stack.run_layers(lm_params, h, cache, ctx, 0, stack.num_layers)
  features = stack.final_features(lm_params, out)
  return stack.logits(lm_params, features), (h, *hiddens[:-1], features), cache


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_matches_transformers_opt(variant):
  hf = _hf_opt(**VARIANTS[variant])
  stack, lm_params = _load(hf)
  ids, mask = _batch()
  with torch.no_grad():
    want = hf(input_ids=torch.tensor(np.asarray(ids)), attention_mask=torch.tensor(np.asarray(mask)).long(),
              output_hidden_states=True)
  logits, hiddens, _ = _full_forward(stack, lm_params, ids, mask)
  valid = np.asarray(mask)
  assert len(hiddens) == len(want.hidden_states) == stack.num_layers + 1
  np.testing.assert_allclose(np.asarray(logits)[valid], want.logits.numpy()[valid], atol=1e-4)
  for i, (ours, theirs) in enumerate(zip(hiddens, want.hidden_states)):
    np.testing.assert_allclose(np.asarray(ours)[valid], theirs.numpy()[valid], atol=1e-4,
                               err_msg=f'hidden state {i}')


@pytest.fixture(scope='module')
def opt4():
  return _load(_hf_opt(num_hidden_layers=4))


_begin = jax.jit(lambda stack, p, cache, mask, ids: lm_api.begin_step(stack, p, cache, mask, input_ids=ids),
                 static_argnums=0)
_run = jax.jit(lambda stack, *args: stack.run_layers(*args), static_argnums=(0, 5, 6))
_propagate = jax.jit(lambda stack, *args: stack.propagate_kv(*args), static_argnums=(0, 5, 6))


def test_cached_decode_equals_full_forward(opt4):
  stack, lm_params = opt4
  ids, mask = _batch(length=10)
  want, _, _ = _full_forward(stack, lm_params, ids, mask)
  prompt = 6
  cache = stack.init_cache(ids.shape[0], ids.shape[1])
  features, cache = lm_step(stack, lm_params, cache, mask[:, :prompt], input_ids=ids[:, :prompt])
  got = [stack.logits(lm_params, features)]
  step = jax.jit(lambda c, t: lm_step(stack, lm_params, c, jnp.ones_like(t, bool), input_ids=t))
  for t in range(prompt, ids.shape[1]):
    features, cache = step(cache, ids[:, t:t + 1])
    got.append(stack.logits(lm_params, features))
  valid = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(got, axis=1))[valid], np.asarray(want)[valid],
                             atol=1e-5)
  assert int(cache.index) == ids.shape[1]


def test_layer_ranges_compose(opt4):
  stack, lm_params = opt4
  ids, mask = _batch()
  h, cache, ctx = _begin(stack, lm_params, stack.init_cache(*ids.shape), mask, ids)
  full_h, full_hiddens, full_cache = _run(stack, lm_params, h, cache, ctx, 0, 4)
  mid_h, low_hiddens, split_cache = _run(stack, lm_params, h, cache, ctx, 0, 1)
  split_h, high_hiddens, split_cache = _run(stack, lm_params, mid_h, split_cache, ctx, 1, 4)
  np.testing.assert_allclose(split_h, full_h, atol=1e-6)
  np.testing.assert_allclose(jnp.concatenate([low_hiddens, high_hiddens]), full_hiddens, atol=1e-6)
  np.testing.assert_allclose(split_cache.k, full_cache.k, atol=1e-6)
  np.testing.assert_allclose(split_cache.v, full_cache.v, atol=1e-6)


def test_propagate_kv_writes_each_layers_projection_of_h(opt4):
  stack, lm_params = opt4
  ids, mask = _batch()
  cache = stack.init_cache(ids.shape[0], ids.shape[1] + 2)
  h, cache, ctx = _begin(stack, lm_params, cache, mask, ids)
  h1, _, ran = _run(stack, lm_params, h, cache, ctx, 0, 2)  # h1 is layer 2's input
  propagated = _propagate(stack, lm_params, h1, ran, ctx, 2, 4)
  _, _, reference = _run(stack, lm_params, h1, ran, ctx, 2, 3)
  t = ids.shape[1]
  # Layer 2 really sees h1, so its propagated K/V are the ones running it writes.
  np.testing.assert_allclose(propagated.k[2], reference.k[2], atol=1e-6)
  np.testing.assert_allclose(propagated.v[2], reference.v[2], atol=1e-6)
  # Layer 3: its own norm and projections applied to h1 (not to layer 2's output).
  layer3 = jax.tree.map(lambda x: x[3], lm_params['layers'])
  k3, v3 = OPTLayer(stack.config).apply({'params': layer3}, h1, method=OPTLayer.kv)
  np.testing.assert_allclose(propagated.k[3, :, :t], k3, atol=1e-6)
  np.testing.assert_allclose(propagated.v[3, :, :t], v3, atol=1e-6)
  # Layers outside the range and slots beyond the step are untouched.
  np.testing.assert_array_equal(propagated.k[:2], ran.k[:2])
  np.testing.assert_array_equal(propagated.k[:, :, t:], ran.k[:, :, t:])


def test_init_builds_the_converted_tree():
  hf = _hf_opt(**VARIANTS['projections'])
  stack, lm_params = _load(hf)
  shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
  assert shapes(jax.eval_shape(stack.init, jax.random.key(0))) == shapes(lm_params)
