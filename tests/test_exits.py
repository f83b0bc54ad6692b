"""Exit placement, initialisation and the exit forward on a tiny random OPT stack."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from free_jax import exits
from free_jax.models import lm_api
from free_jax.models.opt import OPTConfig, OPTStack

STACK = OPTStack(OPTConfig(vocab_size=40, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                           ffn_dim=64, max_position_embeddings=32, word_embed_proj_dim=32))
LAYERS = (1, 3)


@pytest.fixture(scope='module')
def lm_params():
  return STACK.init(jax.random.key(0))


def _prefill(lm_params, ids, valid):
  cache = STACK.init_cache(*ids.shape)
  h, cache, ctx = lm_api.begin_step(STACK, lm_params, cache, valid, input_ids=ids)
  _, hiddens, _ = STACK.run_layers(lm_params, h, cache, ctx, 0, STACK.num_layers)
  return hiddens, ctx


@pytest.mark.parametrize('layers, message', [
    ((), 'exits.layers is empty'),
    ((0, 2), r'\[1, 3\] for a backbone with 4 LM layers'),
    ((2, 4), r'\[1, 3\] for a backbone with 4 LM layers'),
    ((2, 2), 'strictly increasing'),
    ((3, 1), 'strictly increasing'),
    ((1.5,), 'must be integers'),
])
def test_validate_layers_errors(layers, message):
  with pytest.raises(ValueError, match=message):
    exits.validate_layers(layers, 4)


def test_next_layer_init_copies_the_layer_that_runs_next(lm_params):
  params = exits.init_exit_params(STACK, lm_params, LAYERS)
  for e, l in enumerate(LAYERS):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x[e, 0], y[l]), params['layers'], lm_params['layers'])
  assert exits.num_exits(params) == 2


def test_random_init_differs_from_the_backbone(lm_params):
  params = exits.init_exit_params(STACK, lm_params, LAYERS, init='random', rng=jax.random.key(1))
  kernel = params['layers']['self_attn']['q_proj']['kernel']
  assert kernel.shape == (2, 1, 32, 32)
  assert not np.allclose(kernel[0, 0], lm_params['layers']['self_attn']['q_proj']['kernel'][1])
  with pytest.raises(ValueError, match="exits.init='random' needs an rng"):
    exits.init_exit_params(STACK, lm_params, LAYERS, init='random')
  with pytest.raises(ValueError, match="exits.init='copy'"):
    exits.init_exit_params(STACK, lm_params, LAYERS, init='copy')


def test_exit_reads_layer_l_output_and_equals_the_backbone_continuing(lm_params):
  """Exit e (copy of layer l) on hiddens after [0, l) == backbone layers [0, l + 1), same head."""
  ids = jax.random.randint(jax.random.key(2), (2, 7), 5, 40)
  valid = jnp.ones(ids.shape, bool).at[1, 5:].set(False)
  hiddens, ctx = _prefill(lm_params, ids, valid)
  params = exits.init_exit_params(STACK, lm_params, LAYERS, separate_head=True)
  features, logits = exits.apply_exits(STACK, lm_params, params, hiddens[jnp.asarray(LAYERS) - 1], valid, ctx)
  for e, l in enumerate(LAYERS):
    want = STACK.final_features(lm_params, hiddens[l])
    np.testing.assert_allclose(features[e], want, atol=1e-5)
    # The separate head starts at zero: the exit classifier starts as the frozen one.
    np.testing.assert_allclose(logits[e], STACK.logits(lm_params, want), atol=1e-4)


def test_exit_attention_is_causal(lm_params):
  ids = jax.random.randint(jax.random.key(3), (1, 6), 5, 40)
  valid = jnp.ones(ids.shape, bool)
  params = exits.init_exit_params(STACK, lm_params, LAYERS, init='random', rng=jax.random.key(4))
  outs = []
  for row in (ids, ids.at[0, 4:].set(7)):
    hiddens, ctx = _prefill(lm_params, row, valid)
    outs.append(exits.apply_exits(STACK, lm_params, params, hiddens[jnp.asarray(LAYERS) - 1], valid, ctx)[1])
  np.testing.assert_allclose(outs[0][:, :, :4], outs[1][:, :, :4], atol=1e-5)
  assert not np.allclose(outs[0][:, :, 4:], outs[1][:, :, 4:])


def test_trained_separate_head_changes_logits(lm_params):
  ids = jax.random.randint(jax.random.key(5), (1, 5), 5, 40)
  valid = jnp.ones(ids.shape, bool)
  hiddens, ctx = _prefill(lm_params, ids, valid)
  params = exits.init_exit_params(STACK, lm_params, LAYERS, separate_head=True)
  params['head']['kernel'] = params['head']['kernel'].at[1].set(0.1)
  base = exits.init_exit_params(STACK, lm_params, LAYERS)
  run = lambda p: exits.apply_exits(STACK, lm_params, p, hiddens[jnp.asarray(LAYERS) - 1], valid, ctx)[1]
  with_head, frozen = run(params), run(base)
  np.testing.assert_allclose(with_head[0], frozen[0], atol=1e-5)
  assert not np.allclose(with_head[1], frozen[1])
