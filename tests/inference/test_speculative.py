"""Tests for mode='speculative' (free_jax.inference.speculative): tokens identical to full greedy, always."""

import jax
import numpy as np
import pytest

from free_jax import exits as exits_lib
from free_jax.eval import benchmark
from free_jax.inference import confidence
from free_jax.inference.early_exit import EarlyExitDecoder
from free_jax.models.opt import OPTConfig, OPTStack
from tests.inference.test_early_exit import EXITS, N, _setup


def _full_greedy(stack, lm_params, prompt, valid, encoder, eos=None, n=N):
  return np.asarray(EarlyExitDecoder(stack, (), max_new_tokens=n, eos_token_id=eos)(
      lm_params, None, prompt, valid, encoder=encoder).tokens)


@pytest.mark.parametrize('family', ['opt', 't5'])
@pytest.mark.parametrize('draft_exit', [0, 1])
def test_tokens_equal_full_greedy_for_any_draft_length_and_threshold(family, draft_exit):
  stack, lm_params, exit_params, prompt, valid, encoder, _ = _setup(family)
  expected = _full_greedy(stack, lm_params, prompt, valid, encoder)
  for k in (1, 2, N - 1):  # one token a round; rounds that leave a remainder; every token in one round
    decoder = EarlyExitDecoder(stack, EXITS, max_new_tokens=N, eos_token_id=None, mode='speculative',
                               draft_exit=draft_exit, max_draft=k)
    for threshold in (0.0, 0.3, confidence.NEVER_EXIT):
      out = decoder(lm_params, exit_params, prompt, valid, threshold, encoder=encoder)
      np.testing.assert_array_equal(out.tokens, expected, err_msg=f'k={k} threshold={threshold}')
      if threshold > 1:  # never confident: nothing drafted, one full-model token per round
        np.testing.assert_array_equal(out.drafted, 0)
        assert int(out.rounds) == N - 1
    assert decoder.traces == 1  # thresholds are traced


def test_perfect_drafter_is_always_accepted():
  stack, lm_params, exit_params, prompt, valid, _, _ = _setup('opt')
  prepared, _ = EarlyExitDecoder(stack, EXITS, N, None).prepare(lm_params, exit_params)
  lm_params, exit_params = benchmark.identity_after(prepared, exits_lib.unstack_exits(exit_params), EXITS[0], 0)
  expected = _full_greedy(stack, lm_params, prompt, valid, None)
  for k in (1, 2, 5):
    decoder = EarlyExitDecoder(stack, EXITS, max_new_tokens=N, eos_token_id=None, mode='speculative', max_draft=k)
    out = decoder(lm_params, exit_params, prompt, valid, 0.0)
    np.testing.assert_array_equal(out.tokens, expected)
    np.testing.assert_array_equal(out.accepted, out.drafted)  # 100% acceptance
    # N - 1 tokens after the prefill, k + 1 per round.
    assert int(out.rounds) == -(-(N - 1) // (k + 1))
    np.testing.assert_array_equal(out.exit_index[:, 1:k + 1], 0)  # accepted drafts leave at the draft exit
    if k + 1 < N:
      np.testing.assert_array_equal(out.exit_index[:, k + 1], len(EXITS))  # then the full model's own token


def test_batch_with_left_padding_and_eos_at_different_steps():
  stack = OPTStack(OPTConfig(vocab_size=12, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                             ffn_dim=64, max_position_embeddings=40, word_embed_proj_dim=32))
  lm_params = stack.init(jax.random.PRNGKey(3))
  exit_params = exits_lib.init_exit_params(stack, lm_params, EXITS)
  rng = np.random.default_rng(0)
  prompt = rng.integers(3, 12, (4, 6)).astype(np.int32)
  valid = np.ones((4, 6), bool)
  valid[1, :2] = valid[2, :5] = valid[3, :3] = False
  n = 12
  free = _full_greedy(stack, lm_params, prompt, valid, None, n=n)
  eos = int(np.bincount(free[:, 1:].ravel()).argmax())  # a token the rows emit at different steps
  expected = _full_greedy(stack, lm_params, prompt, valid, None, eos=eos, n=n)
  ends = [np.flatnonzero(r == eos)[0] if (r == eos).any() else n for r in expected]
  assert len(set(ends)) > 1
  for k in (1, 3, 5):
    decoder = EarlyExitDecoder(stack, EXITS, max_new_tokens=n, eos_token_id=eos, pad_token_id=0,
                               mode='speculative', draft_exit=1, max_draft=k)
    for threshold in (0.0, 0.5):
      out = decoder(lm_params, exit_params, prompt, valid, threshold)
      np.testing.assert_array_equal(out.tokens, expected, err_msg=f'k={k} threshold={threshold}')


def test_acceptance_statistics_on_a_hand_built_case():
  # Drafter exact for the first tokens, then wrong: with k = 2, round 1 drafts 2 and accepts 2.
  stack, lm_params, exit_params, prompt, valid, _, _ = _setup('opt')
  prepared = EarlyExitDecoder(stack, EXITS, N, None).prepare(lm_params, exit_params)
  perfect_lm, perfect_exits = benchmark.identity_after(prepared[0], prepared[1], EXITS[0], 0)
  decoder = EarlyExitDecoder(stack, EXITS, max_new_tokens=4, eos_token_id=None, mode='speculative', max_draft=2)
  out = decoder(perfect_lm, perfect_exits, prompt[:1], valid[:1], 0.0)
  # Prefill gives token 1; round 1 drafts 2 (accepted) and the verifier adds 1: 4 tokens, one round.
  assert int(out.rounds) == 1 and int(out.drafted[0]) == 2 and int(out.accepted[0]) == 2
  # Segment 0 (up to the draft exit): prefill + 3 draft steps; segments 1, 2: prefill + 1 verification.
  np.testing.assert_array_equal(out.segment_passes, [4, 2, 2])


def test_bad_speculative_settings():
  stack, *_ = _setup('opt')
  with pytest.raises(ValueError, match='draft_exit=2 must index one of exit_layers'):
    EarlyExitDecoder(stack, EXITS, N, None, mode='speculative', draft_exit=2)
  with pytest.raises(ValueError, match='max_draft=0'):
    EarlyExitDecoder(stack, EXITS, N, None, mode='speculative', max_draft=0)
  with pytest.raises(ValueError, match="mode='beam'"):
    EarlyExitDecoder(stack, EXITS, N, None, mode='beam')
