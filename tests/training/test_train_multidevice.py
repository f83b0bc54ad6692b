"""The FREE step on 1 vs 8 (fake CPU) devices: the same losses and metrics within 1e-5 (params: 1e-4).

The device count is fixed when JAX starts, so the comparison runs in a subprocess started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``; both meshes live in that one process.
"""

import os
import subprocess
import sys

from tests.fake_devices import fake_device_flags

_SCRIPT = r'''
import jax, numpy as np
from experiments.configs import vqa
from free_jax.data import batching
from free_jax.training import free_step, parallel, pipeline

assert jax.device_count() == 8, jax.devices()
config = vqa.get_config('smoke')
with config.unlocked():
  config.train.warmup_steps = 0
backbone = pipeline.untrained_backbone(config)
model, tok, fmt = backbone.model, backbone.tokenizer, backbone.fmt
examples = pipeline.load_examples(config, 'train', 16, fmt.image_size)
examples['labelled'] = np.arange(16) % 3 == 0  # devices hold different numbers of labelled tokens
batch = batching.train_batch(examples, tok, fmt, 'vqa')
batch['valid'][-1] = False  # and a padding row
disc = free_step.make_discriminators(len(config.exits.layers), config.discriminator)
results = []
for n in (1, 8):
  mesh = parallel.make_mesh(n)
  step = free_step.make_free_step(model, config.exits.layers, config.free, disc, *pipeline.gan_optimizers(config), mesh)
  state = parallel.replicate(pipeline.init_free_state(config, backbone), mesh)
  for _ in range(2):
    state, metrics = step(state, parallel.replicate(backbone.params, mesh), parallel.shard_batch(batch, mesh))
  results.append((jax.device_get(metrics), jax.device_get(state)))
(m1, s1), (m8, s8) = results
assert m1.keys() == m8.keys()
for k in m1:
  np.testing.assert_allclose(m8[k], m1[k], atol=1e-5, rtol=1e-5, err_msg=k)
# Params get 1e-4 (a third of one step's learning rate): Adam divides each gradient by its own scale, so a
# ~1e-9 gradient (e.g. a bias behind dead ReLUs) turns reduction-order noise into a visible update.
for name in ('exits', 'discriminators'):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-5, err_msg=name),
               getattr(s1, name), getattr(s8, name))
print('MATCH', len(m1), 'metrics', float(m1['g_loss']), float(m8['g_loss']))
'''


def test_one_and_eight_devices_agree():
  env = dict(os.environ, XLA_FLAGS=fake_device_flags(8), JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', _SCRIPT], env=env, capture_output=True, text=True, timeout=900,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'MATCH' in out.stdout
