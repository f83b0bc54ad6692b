"""Tests for free_jax.inference.early_exit: equivalences with full-depth and teacher-forced decoding."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from free_jax import exits as exits_lib
from free_jax.inference import confidence
from free_jax.inference.early_exit import EarlyExitDecoder, layer_cost
from free_jax.models import lm_api
from free_jax.models.opt import OPTConfig, OPTStack
from free_jax.models.t5 import T5Config, T5Stack

N = 6  # new tokens
EXITS = (1, 2)


def _opt_case():
  stack = OPTStack(OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                             ffn_dim=64, max_position_embeddings=16, word_embed_proj_dim=32))
  lm_params = stack.init(jax.random.PRNGKey(0))
  ids = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (3, 5), 3, 100), np.int32)
  valid = np.ones((3, 5), bool)
  valid[1, :2] = False  # left padding
  valid[2, :4] = False
  return stack, lm_params, ids, valid, None


def _t5_case():
  stack = T5Stack(T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=4,
                           num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                           feed_forward_proj='gated-gelu', tie_word_embeddings=False))
  lm_params = stack.init(jax.random.PRNGKey(0))
  embeds = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 32))
  encoder_mask = np.ones((2, 7), bool)
  encoder_mask[1, 5:] = False
  encoded = stack.encode(lm_params, embeds, encoder_mask)
  start = np.zeros((2, 1), np.int32)  # decoder_start_token_id
  return stack, lm_params, start, np.ones((2, 1), bool), encoded


CASES = {'opt': _opt_case, 't5': _t5_case}


@functools.cache
def _setup(family):
  stack, lm_params, prompt, valid, encoder = CASES[family]()
  exit_params = exits_lib.init_exit_params(stack, lm_params, EXITS, init='random', rng=jax.random.PRNGKey(2))
  decoder = EarlyExitDecoder(stack, EXITS, max_new_tokens=N, eos_token_id=None)
  return stack, lm_params, exit_params, prompt, valid, encoder, decoder


@functools.partial(jax.jit, static_argnums=0)
def _teacher_forced(stack, lm_params, exit_params, ids, valid, encoder):
  """Uncached full forward of a whole sequence: (exit logits [E, B, T, V], final logits [B, T, V])."""
  cache = stack.init_cache(*ids.shape)
  h, cache, ctx = lm_api.begin_step(stack, lm_params, cache, valid, input_ids=ids, encoder=encoder)
  out, hiddens, _ = stack.run_layers(lm_params, h, cache, ctx, 0, stack.num_layers)
  _, exit_logits = exits_lib.apply_exits(stack, lm_params, exit_params, hiddens[np.asarray(EXITS) - 1],
                                         valid, ctx)
  return exit_logits, stack.logits(lm_params, stack.final_features(lm_params, out))


def _full_greedy(stack, lm_params, exit_params, prompt, valid, encoder):
  """Full-depth greedy decode by re-running the uncached forward on the growing sequence."""
  batch, length = valid.shape
  ids = np.concatenate([prompt, np.zeros((batch, N), np.int32)], 1)
  mask = np.concatenate([valid, np.zeros((batch, N), bool)], 1)
  for t in range(N):
    _, logits = _teacher_forced(stack, lm_params, exit_params, ids, mask, encoder)
    ids[:, length + t] = np.argmax(logits[:, length + t - 1], -1)
    mask[:, length + t] = True
  return ids[:, length:]


def _on_generated(stack, lm_params, exit_params, prompt, valid, encoder, tokens):
  """Teacher-forced exit and final logits at the positions that predicted each generated token."""
  length = valid.shape[1]
  ids = np.concatenate([prompt, tokens], 1)
  mask = np.concatenate([valid, np.ones(tokens.shape, bool)], 1)
  exit_logits, final = _teacher_forced(stack, lm_params, exit_params, ids, mask, encoder)
  positions = slice(length - 1, length + N - 1)
  return np.asarray(exit_logits[:, :, positions]), np.asarray(final[:, positions])


@pytest.mark.parametrize('family', sorted(CASES))
def test_never_exit_equals_full_depth_greedy(family):
  stack, lm_params, exit_params, prompt, valid, encoder, decoder = _setup(family)
  out = decoder(lm_params, exit_params, prompt, valid, confidence.NEVER_EXIT, encoder=encoder)
  np.testing.assert_array_equal(out.tokens, _full_greedy(stack, lm_params, exit_params, prompt, valid, encoder))
  np.testing.assert_array_equal(out.exit_index, len(EXITS))
  np.testing.assert_array_equal(out.step_depth, len(EXITS))
  assert int(out.num_steps) == N
  if family == 'opt':  # the exit-free decoder (the wall-clock baseline) decodes the same
    full = EarlyExitDecoder(stack, (), max_new_tokens=N, eos_token_id=None)
    np.testing.assert_array_equal(full(lm_params, None, prompt, valid).tokens, out.tokens)


@pytest.mark.parametrize('family', sorted(CASES))
def test_always_exit_equals_first_exit_teacher_forced(family):
  # Every step stops at exit 0, so deeper layers only ever receive propagated K/V and are never read:
  # each token is exactly exit 0's teacher-forced argmax on the generated prefix.
  stack, lm_params, exit_params, prompt, valid, encoder, decoder = _setup(family)
  out = decoder(lm_params, exit_params, prompt, valid, 0.0, encoder=encoder)
  tokens = np.asarray(out.tokens)
  exit_logits, final = _on_generated(stack, lm_params, exit_params, prompt, valid, encoder, tokens)
  np.testing.assert_array_equal(tokens, exit_logits[0].argmax(-1))
  np.testing.assert_array_equal(out.exit_index, 0)
  np.testing.assert_array_equal(out.step_depth, 0)
  # The exits are untrained, so this is not the full model's output.
  assert (tokens != final.argmax(-1)).any()


@pytest.mark.parametrize('family', sorted(CASES))
def test_a_deeper_exit_after_a_shallow_prompt_equals_its_teacher_forced_prediction(family):
  # The prompt stops at exit 0 (exit 0's layer computes only its last position's output; the others write
  # K/V alone) and every later step at exit 1, whose layer then reads the prompt's K/V that the deferred
  # prompt pass wrote without computing the layer's output: each token is exit 1's teacher-forced argmax.
  stack, lm_params, exit_params, prompt, valid, encoder, decoder = _setup(family)
  out = decoder(lm_params, exit_params, prompt, valid, encoder=encoder, depth_schedule=[0] + [1] * (N - 1))
  tokens = np.asarray(out.tokens)
  exit_logits, _ = _on_generated(stack, lm_params, exit_params, prompt, valid, encoder, tokens)
  np.testing.assert_array_equal(tokens[:, 0], exit_logits[0, :, 0].argmax(-1))
  np.testing.assert_array_equal(tokens[:, 1:], exit_logits[1, :, 1:].argmax(-1))
  np.testing.assert_array_equal(out.exit_index, [[0] + [1] * (N - 1)] * len(tokens))


@pytest.mark.parametrize('family', sorted(CASES))
def test_prepared_params_decode_the_same_without_copying_the_weights(family):
  """The per-layer decoding form (`prepare`) gives the stacked params' tokens and exits (here at a threshold
  that mixes depths, so propagation runs), and the compiled program holds no copy of the layer weights:
  from stacked params XLA hoists a copy of every layer's slice out of the decode loop."""
  stack, lm_params, exit_params, prompt, valid, encoder, decoder = _setup(family)
  # Host (numpy) exits, as read from safetensors: prepared once onto the device, not copied at every call.
  prepared = decoder.prepare(lm_params, jax.tree.map(np.asarray, exit_params))
  assert isinstance(prepared[0]['layers'], tuple) and isinstance(prepared[1], tuple)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(prepared))
  probe = decoder(lm_params, exit_params, prompt, valid, 0.0, encoder=encoder)
  exit_logits, _ = _on_generated(stack, lm_params, exit_params, prompt, valid, encoder, np.asarray(probe.tokens))
  thresholds = [float(np.median(confidence.max_prob(exit_logits[0]))), confidence.NEVER_EXIT]
  stacked_out = decoder(lm_params, exit_params, prompt, valid, thresholds, encoder=encoder)
  out = decoder(*prepared, prompt, valid, thresholds, encoder=encoder)
  np.testing.assert_array_equal(out.tokens, stacked_out.tokens)
  np.testing.assert_array_equal(out.exit_index, stacked_out.exit_index)
  assert len(set(np.asarray(out.step_depth).tolist())) > 1  # several depths: propagation was exercised

  def temp_bytes(params):
    return decoder.compile(*params, prompt, valid, encoder)[0].memory_analysis().temp_size_in_bytes

  layer_bytes = sum(x.nbytes for x in jax.tree.leaves(lm_params['layers']))
  assert temp_bytes((lm_params, exit_params)) - temp_bytes(prepared) >= layer_bytes


def test_first_exit_decisions_follow_confidence():
  # Exit 0 always runs on exact inputs, so wherever a token left there it is exit 0's teacher-forced
  # argmax, and it left there exactly when that confidence reached the threshold; the synchronous
  # batch went as deep as its least confident row.
  stack, lm_params, exit_params, prompt, valid, encoder, decoder = _setup('opt')
  probe = decoder(lm_params, exit_params, prompt, valid, 0.0)
  exit_logits, _ = _on_generated(stack, lm_params, exit_params, prompt, valid, encoder,
                                 np.asarray(probe.tokens))
  threshold = float(np.median(confidence.max_prob(exit_logits[0])))
  out = decoder(lm_params, exit_params, prompt, valid, [threshold, confidence.NEVER_EXIT])
  tokens, exit_index = np.asarray(out.tokens), np.asarray(out.exit_index)
  exit_logits, _ = _on_generated(stack, lm_params, exit_params, prompt, valid, encoder, tokens)
  confident = np.asarray(confidence.max_prob(exit_logits[0])) >= threshold
  np.testing.assert_array_equal(exit_index == 0, confident)
  np.testing.assert_array_equal(exit_index, np.where(confident, 0, len(EXITS)))
  np.testing.assert_array_equal(tokens[confident], exit_logits[0].argmax(-1)[confident])
  np.testing.assert_array_equal(out.step_depth, exit_index.max(0))
  assert 0 < confident.mean() < 1
  assert (np.diff(np.asarray(out.step_depth)) > 0).any()  # deep steps after early exits: catch-up ran


def test_rows_stop_at_their_own_eos():
  stack, lm_params, exit_params, prompt, valid, _, decoder = _setup('opt')
  free = np.asarray(decoder(lm_params, exit_params, prompt, valid, 0.0).tokens)
  eos = int(free[0, 2])
  stopping = EarlyExitDecoder(stack, EXITS, max_new_tokens=N, eos_token_id=eos, pad_token_id=1)
  out = stopping(lm_params, exit_params, prompt, valid, 0.0)
  for row, expected in zip(np.asarray(out.tokens), free):
    hits = np.flatnonzero(expected == eos)
    end = hits[0] + 1 if hits.size else N
    np.testing.assert_array_equal(row[:end], expected[:end])
    np.testing.assert_array_equal(row[end:], 1)
  ends = [(np.flatnonzero(r == eos)[0] + 1 if (r == eos).any() else N) for r in free]
  assert int(out.num_steps) == max(ends)
  np.testing.assert_array_equal(np.asarray(out.exit_index) >= 0, np.arange(N)[None] < np.asarray(ends)[:, None])


def test_patience():
  # k = 1: the first exit always agrees with itself; k beyond the exits: never exit.
  stack, lm_params, exit_params, prompt, valid, _, _ = _setup('opt')
  decoder = EarlyExitDecoder(stack, EXITS, max_new_tokens=N, eos_token_id=None, confidence='patience')
  np.testing.assert_array_equal(decoder(lm_params, exit_params, prompt, valid, patience=1).exit_index, 0)
  out = decoder(lm_params, exit_params, prompt, valid, patience=len(EXITS) + 1)
  np.testing.assert_array_equal(out.exit_index, len(EXITS))
  assert decoder.traces == 1
  # k = 1 is now held on the device for later calls; True (== 1 as a dict key) is still refused.
  with pytest.raises(ValueError, match='patience must be a positive integer'):
    decoder(lm_params, exit_params, prompt, valid, patience=True)


def test_threshold_sweep_never_retraces():
  stack, lm_params, exit_params, prompt, valid, _, decoder = _setup('opt')
  decoder(lm_params, exit_params, prompt, valid, 0.5)  # compiled here (or by an earlier test)
  traces = decoder.traces
  depths = []
  for thresholds in (0.0, 0.3, [0.2, 0.9], 1.0, confidence.NEVER_EXIT, np.inf):
    depths.append(float(np.mean(decoder(lm_params, exit_params, prompt, valid, thresholds).exit_index)))
  assert decoder.traces == traces
  assert depths[0] == 0 and depths[-1] == len(EXITS)
  # Scalar thresholds are checked once and then held on the device; a bad one is still refused at every call.
  for _ in range(2):
    with pytest.raises(ValueError, match=r'threshold\[0\] = nan'):
      decoder(lm_params, exit_params, prompt, valid, np.nan)
  traces = decoder.traces
  decoder(lm_params, exit_params, prompt[:1], valid[:1], 0.5)  # a new batch shape compiles once more
  assert decoder.traces == traces + 1
  # Params are matched by shape, not identity: an equal-shaped copy reuses the program, other shapes compile.
  decoder(jax.tree.map(jnp.array, lm_params), jax.tree.map(jnp.array, exit_params), prompt, valid, 0.5)
  assert decoder.traces == traces + 1
  table = lm_params['embed_tokens']['embedding']
  more_words = {**lm_params, 'embed_tokens': {'embedding': jnp.concatenate([table, table[:4]])}}
  decoder(more_words, exit_params, prompt, valid, 0.5)
  assert decoder.traces == traces + 2


def _copies_inside_loops(hlo: str) -> list[int]:
  """Byte sizes of the buffer copies outside the entry computation (in loop bodies and branches): copy
  instructions and fusions that only copy or transpose (a fused in-place update is not one), except
  copies of a broadcast zero: XLA materialises the zero-initialised caches once per call that way."""
  sizes, computation = [], None
  bytes_per = {'f32': 4, 'bf16': 2, 's32': 4, 'pred': 1, 'f16': 2}
  for line in hlo.splitlines():
    if line and not line.startswith(' '):
      computation = line.split(' ')[0]
    match = (re.search(r'= (\w+)\[([\d,]*)\]\S* copy\((?!%wrapped_broadcast)', line)
             or re.search(r'%(?:transpose_|bitcast_)?copy(?:_bitcast|_transpose)?_fusion\S* = (\w+)\[([\d,]*)\]', line))
    if match and computation not in ('ENTRY',) and not computation.startswith('%fused'):
      dims = [int(d) for d in match.group(2).split(',') if d]
      sizes.append(int(np.prod(dims)) * bytes_per.get(match.group(1), 4))
  return sizes


@pytest.mark.parametrize('batch', [1, 2])
@pytest.mark.parametrize('mode', ['recompute', 'calm', 'speculative'])
def test_no_step_copies_a_cache_sized_buffer(mode, batch):
  """Caches updated in place: the compiled full-depth, early-exit and speculative programs copy no buffer
  as large as one layer's K or V cache inside the decode loops or their conditionals, at batch 1 too (a
  stacked cache made XLA copy the whole [L, ...] array at every layer; a [B, S, H, Dh] layout made it
  transpose every layer's cache at every step)."""
  stack = OPTStack(OPTConfig(vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                             ffn_dim=128, max_position_embeddings=128, word_embed_proj_dim=64))
  lm_params = stack.init(jax.random.PRNGKey(0))
  exit_params = exits_lib.init_exit_params(stack, lm_params, EXITS)
  prompt, valid = np.ones((batch, 40), np.int32), np.ones((batch, 40), bool)
  kwargs = dict(mode='speculative', max_draft=3) if mode == 'speculative' else dict(propagation=mode)
  for exits in ((), EXITS):
    decoder = EarlyExitDecoder(stack, exits, max_new_tokens=8, eos_token_id=None, **(kwargs if exits else {}))
    params = decoder.prepare(lm_params, exit_params if exits else None)
    hlo = decoder.compile(*params, prompt, valid)[0].as_text()
    prompt_kv_bytes = batch * 4 * 40 * 16 * 4  # the prompt's new K (or V), moved into the cache layout
    assert not [n for n in _copies_inside_loops(hlo) if n > prompt_kv_bytes], exits  # a cache has more slots
    stacked = re.findall(r'\[\d+,%d,(\d+),16\]' % (batch * 4), hlo)  # [L, B * H, S, Dh]
    assert not [slots for slots in stacked if int(slots) > 40]  # no stacked cache anywhere


def test_layer_cost():
  np.testing.assert_array_equal(layer_cost([0, 1, 2], (1, 2), 4), [1 + 1, 2 + 2, 4 + 2])


def test_bad_input_fails_before_compiling():
  stack, lm_params, exit_params, prompt, valid, _, _ = _setup('opt')
  decoder = EarlyExitDecoder(stack, EXITS, max_new_tokens=N, eos_token_id=None)
  with pytest.raises(ValueError, match=r'threshold\[0\] = -0.1'):
    decoder(lm_params, exit_params, prompt, valid, -0.1)
  with pytest.raises(ValueError, match='one per exit'):
    decoder(lm_params, exit_params, prompt, valid, [0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match='exit_params hold 3 exits'):
    decoder(lm_params, exits_lib.init_exit_params(stack, lm_params, (1, 2, 3)), prompt, valid, 0.5)
  with pytest.raises(ValueError, match='empty prompt'):
    decoder(lm_params, exit_params, prompt[:, :0], valid[:, :0], 0.5)
  with pytest.raises(ValueError, match=r'empty prompt: rows \[1\]'):
    decoder(lm_params, exit_params, prompt, np.array([[True] * 5, [False] * 5, [True] * 5]), 0.5)
  with pytest.raises(ValueError, match='max_position_embeddings=16'):
    EarlyExitDecoder(stack, EXITS, max_new_tokens=12, eos_token_id=None)(lm_params, exit_params, prompt, valid)
  with pytest.raises(ValueError, match=r'exit layer must be in \[1, 3\]'):
    EarlyExitDecoder(stack, (2, 4), max_new_tokens=N, eos_token_id=None)
  with pytest.raises(ValueError, match='max_new_tokens=0'):
    EarlyExitDecoder(stack, EXITS, max_new_tokens=0, eos_token_id=None)
  with pytest.raises(ValueError, match='Unknown confidence measure'):
    EarlyExitDecoder(stack, EXITS, max_new_tokens=N, eos_token_id=None, confidence='margin')
  with pytest.raises(ValueError, match=r'empty batch: prompt_valid has shape \(0, 5\)'):
    decoder(lm_params, exit_params, prompt[:0], valid[:0], 0.5)
  with pytest.raises(ValueError, match=r'prompt has shape \(3, 5\) but prompt_valid \(3, 4\)'):
    decoder(lm_params, exit_params, prompt, valid[:, :4], 0.5)
  with pytest.raises(ValueError, match=r'token id 999, outside the vocabulary \[0, '):
    decoder(lm_params, exit_params, np.where(valid, 999, 0).astype(np.int32), valid, 0.5)
  # Exit params carry the layers they were made for (`exits.Placement`), stacked and prepared alike.
  elsewhere = EarlyExitDecoder(stack, (1, 3), max_new_tokens=N, eos_token_id=None)
  for params in (exit_params, elsewhere.prepare(lm_params, exit_params)[1]):
    with pytest.raises(ValueError, match=r'exit_params are the exits after layers \(1, 2\), but this decoder exits '
                                         r'after layers \(1, 3\)'):
      elsewhere(lm_params, params, prompt, valid, 0.5)
  assert exits_lib.placement(decoder.prepare(lm_params, exit_params)[1]) == EXITS
  assert decoder.traces == 0 and elsewhere.traces == 0


@pytest.mark.parametrize('family', ['opt', 't5'])
def test_never_exit_equals_the_full_decoder_on_a_whole_blip2(family):
  # The exit-free decoder on `Blip2Model.decoder_inputs` (tests/models/test_generate.py: == transformers).
  from free_jax.models import blip2  # pylint: disable=g-import-not-at-top
  from tests import hf_fixtures  # pylint: disable=g-import-not-at-top
  overrides = {'num_hidden_layers': 4} if family == 'opt' else {'num_decoder_layers': 4}
  config = blip2.Blip2Config.from_hf(hf_fixtures.tiny_blip2_config(family, **overrides))
  model = blip2.Blip2Model(config)
  bos = 2 if family == 'opt' else None
  inputs = hf_fixtures.blip2_inputs(batch=2, prompt_lengths=(3, 5), bos_token_id=bos)
  pixels, ids, mask = inputs['pixel_values'], inputs['input_ids'], inputs['attention_mask']
  extra = {'decoder_input_ids': np.zeros((2, 1), np.int32)} if family == 't5' else {}
  params = model.init(jax.random.PRNGKey(0), pixels, ids, mask, **extra)['params']
  eos, pad = config.text.eos_token_id, config.text.pad_token_id or 0
  stack, lm_params = model.lm_stack(), params['language_model']
  exit_params = exits_lib.init_exit_params(stack, lm_params, EXITS)
  decoder = EarlyExitDecoder(stack, EXITS, max_new_tokens=N, eos_token_id=eos, pad_token_id=pad)
  prompt, valid, encoder = model.apply({'params': params}, pixels, ids, mask, method='decoder_inputs')
  valid = np.asarray(valid)
  full = EarlyExitDecoder(stack, (), max_new_tokens=N, eos_token_id=eos, pad_token_id=pad)
  expected = full(lm_params, None, prompt, valid, encoder=encoder).tokens
  out = decoder(lm_params, exit_params, prompt, valid, confidence.NEVER_EXIT, encoder=encoder)
  np.testing.assert_array_equal(out.tokens, expected)
