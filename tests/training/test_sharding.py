"""Backbone placement: FSDP-sharded params give the replicated forward, at ~1/8 of the memory per device.

The 8-device checks re-run themselves in a subprocess with 8 fake CPU devices (JAX fixes the device
count at start-up), like tests/training/test_parallel.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from free_jax.training import parallel, sharding
from tests.fake_devices import NUM_FAKE_DEVICES, rerun_with_fake_devices

L, D, F, H, V = 2, 64, 256, 4, 96
BATCH, T = 16, 8
MIN_SIZE = 1024  # the test model is tiny: shard everything from 1024 elements up


def _params():
  """A tiny pre-LN decoder: embeddings, stacked layers [L, ...] (scan-friendly, as the backbone's), head."""
  keys = iter(jax.random.split(jax.random.key(0), 8))
  normal = lambda shape, scale: scale * jax.random.normal(next(keys), shape)
  return {
      'embed': normal((V, D), 1.0),
      'layers': {'ln': 1.0 + normal((L, D), 0.1), 'qkv': normal((L, D, 3 * D), D**-0.5),
                 'out': normal((L, D, D), D**-0.5), 'fc1': normal((L, D, F), D**-0.5),
                 'fc2': normal((L, F, D), F**-0.5)},
      'head': normal((D, V), D**-0.5),
  }


def _forward(params, tokens):
  """int[B, T] -> float[B, T, V] logits of a causal transformer over stacked layers."""
  def norm(x, scale):
    return scale * (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-6)

  def layer(h, p):
    q, k, v = jnp.split((norm(h, p['ln']) @ p['qkv']).reshape(*h.shape[:2], 3 * H, D // H), 3, axis=2)
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(D // H)
    scores = jnp.where(jnp.tril(jnp.ones((T, T), bool)), scores, -1e9)
    attn = jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(scores), v).reshape(h.shape)
    h = h + attn @ p['out']
    return h + jax.nn.gelu(norm(h, p['ln']) @ p['fc1']) @ p['fc2'], None

  h, _ = jax.lax.scan(layer, params['embed'][tokens], params['layers'])
  return h @ params['head']


def _tokens():
  return jax.random.randint(jax.random.key(1), (BATCH, T), 0, V)


def test_fsdp_spec_picks_the_largest_divisible_axis():
  assert sharding.fsdp_spec((4, 64, 256), 8, MIN_SIZE) == P(None, None, 'data')
  assert sharding.fsdp_spec((4, 256, 64), 8, MIN_SIZE) == P(None, 'data')
  assert sharding.fsdp_spec((64, 64), 8, MIN_SIZE) == P(None, 'data')  # ties: the later axis
  assert sharding.fsdp_spec((97, 104), 8, MIN_SIZE) == P(None, 'data')  # 97 does not split
  assert sharding.fsdp_spec((97, 101), 8, MIN_SIZE) == P()  # nothing splits: replicated
  assert sharding.fsdp_spec((8, 64), 8, MIN_SIZE) == P()  # under min_size_to_shard
  assert sharding.fsdp_spec((64, 256), 1, MIN_SIZE) == P()  # one device


def test_bad_mode_and_mesh_are_clear_errors():
  mesh = parallel.make_mesh(1)
  with pytest.raises(ValueError, match=r"backbone_sharding='zero3'; expected one of \('replicated', 'fsdp'"):
    sharding.backbone_shardings(jax.eval_shape(_params), mesh, 'zero3')
  other = jax.make_mesh((1,), ('model',), devices=jax.devices()[:1])
  with pytest.raises(ValueError, match=r"mesh has axes \('model',\); backbone sharding needs the 'data'"):
    sharding.backbone_shardings(jax.eval_shape(_params), other, 'fsdp')


def test_fsdp_forward_equals_replicated_at_an_eighth_of_the_memory():
  if rerun_with_fake_devices(__file__, 'test_fsdp_forward_equals_replicated_at_an_eighth_of_the_memory'):
    return
  mesh = parallel.make_mesh()
  params, tokens = _params(), _tokens()
  replicated = sharding.place_backbone(params, mesh, 'replicated', MIN_SIZE)
  fsdp = sharding.place_backbone(params, mesh, 'fsdp', MIN_SIZE)
  tokens = parallel.shard_batch(tokens, mesh)

  # Memory at rest: the whole tree on every device vs ~1/8 of it (the replicated LN scales are tiny).
  total = sum(x.nbytes for x in jax.tree.leaves(params))
  rep_bytes, fsdp_bytes = sharding.bytes_per_device(replicated), sharding.bytes_per_device(fsdp)
  assert len(fsdp_bytes) == NUM_FAKE_DEVICES and set(rep_bytes.values()) == {total}
  assert max(fsdp_bytes.values()) <= 1.02 * total / NUM_FAKE_DEVICES, (max(fsdp_bytes.values()), total)
  assert fsdp['layers']['fc1'].sharding.spec == P(None, None, 'data')
  assert fsdp['layers']['ln'].sharding.spec == P()

  # GSPMD: plain jit, XLA partitions the forward; and the FREE step's shape: a shard_map body with
  # replicated in_specs, for which jit all-gathers the fsdp params at entry.
  gspmd = jax.jit(_forward)
  per_device = jax.jit(jax.shard_map(_forward, mesh=mesh, in_specs=(P(), P(parallel.DATA)),
                                     out_specs=P(parallel.DATA)))
  expected = np.asarray(per_device(replicated, tokens))
  # Gathered at entry, the shard_map body computes exactly what the replicated one does.
  np.testing.assert_array_equal(np.asarray(per_device(fsdp, tokens)), expected)
  # The partitioner may split contractions (partial sums): float32 reassociation, 1e-6 of the scale.
  atol = 1e-6 * np.abs(expected).max()
  for placed in (replicated, fsdp):
    np.testing.assert_allclose(np.asarray(gspmd(placed, tokens)), expected, rtol=0, atol=atol)

  # Peak memory of the compiled programs (docs/scaling.md): under GSPMD the scan never materialises
  # the whole backbone; the shard_map step holds a gathered full copy as a temporary.
  def peak(fn, p):
    stats = fn.lower(p, tokens).compile().memory_analysis()
    return stats.argument_size_in_bytes + stats.temp_size_in_bytes
  assert peak(gspmd, fsdp) < total <= peak(gspmd, replicated)
  assert peak(per_device, fsdp) >= total
