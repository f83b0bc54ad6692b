"""The embedded backbone's CE step: the loss it minimises is next-token CE on the target tokens, and it falls."""

import jax
import jax.numpy as jnp
import numpy as np

from experiments.configs import vqa
from free_jax.data import batching, tokenizer as tokenizer_lib
from free_jax.models import blip2
from free_jax.training import backbone_step, grounding, optim, parallel, pipeline, state as state_lib


def _smoke_backbone():
  """The smoke config's random backbone and one batch of 8 generated questions."""
  config = vqa.get_config('smoke')
  model_config = pipeline.validate_config(config)
  tok = tokenizer_lib.embedded_tokenizer('opt')
  model = blip2.Blip2Model(model_config)
  fmt = pipeline.make_input_format(config, model_config, tok)
  params = pipeline.init_backbone_params(model, fmt, jax.random.key(0))
  examples = pipeline.load_examples(config, 'train', 8, fmt.image_size)
  return model, params, tok, fmt, examples, batching.train_batch(examples, tok, fmt, 'vqa')


def test_backbone_step_minimises_shifted_target_ce_and_loss_falls():
  model, params, tok, _, examples, batch = _smoke_backbone()

  # The loss is CE of logits[:, t] against input_ids[:, t + 1] on target (answer, EOS) tokens only.
  logits = np.asarray(backbone_step.forward_logits(model, params, batch), np.float64)
  log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  ids, total = batch['input_ids'], 0.0
  for b, answer in enumerate(examples['answer']):
    (answer_id,) = tok.convert_tokens_to_ids([answer])
    j = np.flatnonzero(ids[b] == answer_id)[-1]  # the answer follows the prompt, then EOS
    assert ids[b, j + 1] == tok.eos_token_id
    total -= log_probs[b, j - 1, answer_id] + log_probs[b, j, tok.eos_token_id]
  count = 2 * len(examples['answer'])

  tx = optim.make_optimizer(optim.optimizer_config(learning_rate=3e-3, warmup_steps=0), 10)
  step = backbone_step.make_backbone_step(model, tx, parallel.make_mesh(1))
  state = state_lib.create_backbone_state(params, tx)
  losses = []
  for _ in range(10):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  np.testing.assert_allclose(losses[0], total / count, rtol=1e-4)
  assert losses[-1] < 0.85 * losses[0] and all(np.diff(losses) < 0), losses
  assert int(state.step) == 10


def test_backbone_step_with_grounding_keeps_the_answer_loss_and_learns_the_probe():
  model, params, _, fmt, examples, batch = _smoke_backbone()
  batch.update(grounding.batch_labels(examples['objects'], fmt.image_size))
  # 20 steps: on the lookup/relational question set's scenes 10 steps bring the probe loss to 0.706x, just short.
  tx = optim.make_optimizer(optim.optimizer_config(learning_rate=3e-3, warmup_steps=0), 20)
  mesh = parallel.make_mesh(1)

  plain = backbone_step.make_backbone_step(model, tx, mesh)
  _, plain_metrics = plain(state_lib.create_backbone_state(jax.tree.map(jnp.copy, params), tx), batch)  # donated
  step = backbone_step.make_backbone_step(model, tx, mesh, grounding_weight=1.0)
  probe = grounding.init_probe(fmt.num_query_tokens, model.lm_stack().hidden_size)
  state = state_lib.create_backbone_state(params, tx, probe)
  history = []
  for _ in range(20):
    state, metrics = step(state, batch)
    history.append(metrics)
  # 'loss' is the answer CE alone, identical to the plain step's on the same params.
  np.testing.assert_allclose(history[0]['loss'], plain_metrics['loss'], rtol=1e-6)
  ground = [float(m['grounding']) for m in history]
  assert ground[-1] < 0.7 * ground[0], ground
  assert float(jnp.abs(state.probe['kernel']).max()) > 0


def test_backbone_batches_interleave_captions_and_resume_exactly():
  config = vqa.get_config('smoke')
  model_config = pipeline.validate_config(config)
  tok = tokenizer_lib.embedded_tokenizer('opt')
  fmt = pipeline.make_input_format(config, model_config, tok)
  backbone = pipeline.Backbone(blip2.Blip2Model(model_config), None, tok, fmt)
  examples = pipeline.load_examples(config, 'train', 64, fmt.image_size)
  every = config.backbone_train.caption_every
  assert every == 2 and config.backbone_train.grounding_weight > 0
  run = pipeline.backbone_batches(examples, backbone, config, 0)
  batches = [next(run) for _ in range(6)]
  for step, batch in enumerate(batches, 1):
    is_caption = step % every == 0
    target_ids = batch['labels'][batch['loss_mask'] > 0]
    words = set(tok.convert_ids_to_tokens(target_ids.tolist()))
    # Caption steps name the objects ("a red circle , ..."), task steps answer in one word + EOS.
    assert ('from' in words) == is_caption, (step, words)
    assert batch['slot_shape'].shape == (config.backbone_train.batch_size, 8)
  resumed = pipeline.backbone_batches(examples, backbone, config, 3)
  for expected in batches[3:]:
    got = next(resumed)
    assert got.keys() == expected.keys()
    for key in got:
      np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
