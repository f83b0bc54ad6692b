"""Embedded tokenizer, BLIP-2 input layouts (checked token by token and against transformers), batching."""

import numpy as np
import pytest
import torch
import transformers
from transformers.loss.loss_utils import ForCausalLMLoss

from free_jax.data import batching, sort_of_clevr as soc, tokenizer as tk

Q = 3  # num_query_tokens


@pytest.fixture(scope='module')
def examples():
  return soc.generate(12, seed=0)


def _fmt(tok, family, task, examples, extra=0):
  prompt_length, target_length = batching.required_lengths(tok, family, task, examples)
  return batching.input_format(tok, family, Q, prompt_length + extra, target_length + extra, 64)


def test_embedded_tokenizer_covers_generator_and_round_trips(tmp_path):
  tok = tk.embedded_tokenizer('opt')
  assert tk.embedded_vocabulary() == tk.embedded_vocabulary()
  d = soc.generate(300, seed=1)
  texts = d['question'] + d['caption'] + d['answer']
  ids = tok(texts, add_special_tokens=False)['input_ids']
  assert all(tok.unk_token_id not in row for row in ids)
  assert tok.batch_decode(tok(d['answer'], add_special_tokens=False)['input_ids']) == d['answer']
  again = tok(tok.batch_decode(ids), add_special_tokens=False)['input_ids']
  assert again == ids
  assert tok('red circle')['input_ids'][0] == tok.bos_token_id
  assert tk.embedded_tokenizer('t5')('red circle')['input_ids'][-1] == tok.eos_token_id
  assert tok.convert_tokens_to_ids('<image>') == 4 and tok('<image> red')['input_ids'][1] == 4

  tok.save_pretrained(tmp_path)
  loaded = tk.load_tokenizer(tmp_path)
  assert loaded.get_vocab() == tok.get_vocab()
  assert loaded(texts)['input_ids'] == tok(texts)['input_ids']
  assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)


def test_load_tokenizer_errors_name_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match='missing_dir'):
    tk.load_tokenizer(tmp_path / 'missing_dir')
  with pytest.raises(ValueError, match=str(tmp_path)):
    tk.load_tokenizer(tmp_path)


def test_decode_stops_at_eos():
  tok = tk.embedded_tokenizer('opt')
  ids = tok(['yes', 'a red circle'], add_special_tokens=False)['input_ids']
  rows = [[*ids[0], tok.eos_token_id, *ids[1]], [*ids[1], tok.eos_token_id, tok.pad_token_id]]
  assert tk.decode(tok, np.array(rows)) == ['yes', 'a red circle']


@pytest.mark.parametrize('task', ['vqa', 'caption'])
def test_opt_train_batch_token_by_token(examples, task):
  tok = tk.embedded_tokenizer('opt')
  fmt = _fmt(tok, 'opt', task, examples, extra=2)
  batch = batching.train_batch(examples, tok, fmt, task)
  length = Q + fmt.prompt_length + fmt.target_length
  img = tok.convert_tokens_to_ids('<image>')
  targets = examples['answer'] if task == 'vqa' else examples['caption']
  questions = examples['question']
  hf_labels = []
  for i, target in enumerate(targets):
    prompt = f'Question: {questions[i]} Answer:' if task == 'vqa' else 'a photo of'
    p = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)['input_ids']
    t = tok(target, add_special_tokens=False)['input_ids'] + [tok.eos_token_id]
    pad = length - Q - len(p) - len(t)
    np.testing.assert_array_equal(batch['input_ids'][i], [img] * Q + p + t + [0] * pad)
    np.testing.assert_array_equal(batch['attention_mask'][i], [1] * (Q + len(p) + len(t)) + [0] * pad)
    hf_labels.append([-100] * (Q + len(p)) + t + [-100] * pad)  # HF convention: unshifted.
    for pos in range(length):  # logits at `pos` must predict the token at pos + 1.
      nxt = hf_labels[i][pos + 1] if pos + 1 < length else -100
      assert batch['loss_mask'][i, pos] == (nxt != -100), (i, pos)
      if nxt != -100:
        assert batch['labels'][i, pos] == nxt
    assert tk.decode(tok, [batch['labels'][i][batch['loss_mask'][i] == 1]]) == [target]

  # The loss with our pre-shifted labels equals transformers' causal-LM loss with HF labels.
  logits = np.random.default_rng(0).normal(size=(len(targets), length, len(tok))).astype(np.float32)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ours = -(np.take_along_axis(logp, batch['labels'][..., None], -1)[..., 0] * batch['loss_mask'])
  hf = ForCausalLMLoss(torch.tensor(logits), torch.tensor(hf_labels), len(tok))
  np.testing.assert_allclose(ours.sum() / batch['loss_mask'].sum(), hf.item(), rtol=1e-5)


@pytest.mark.parametrize('task', ['vqa', 'caption'])
def test_t5_train_batch_token_by_token(examples, task):
  tok = tk.embedded_tokenizer('t5')
  fmt = _fmt(tok, 't5', task, examples, extra=1)
  batch = batching.train_batch(examples, tok, fmt, task)
  img = tok.convert_tokens_to_ids('<image>')
  targets = examples['answer'] if task == 'vqa' else examples['caption']
  hf_labels = []
  for i, target in enumerate(targets):
    prompt = f'Question: {examples["question"][i]} Short answer:' if task == 'vqa' else (
        'A short image caption:')
    p = tok(prompt, add_special_tokens=False)['input_ids'] + [tok.eos_token_id]
    pad = fmt.prompt_length - len(p)
    np.testing.assert_array_equal(batch['input_ids'][i], [img] * Q + p + [0] * pad)
    np.testing.assert_array_equal(batch['attention_mask'][i], [1] * (Q + len(p)) + [0] * pad)
    t = tok(target, add_special_tokens=False)['input_ids'] + [tok.eos_token_id]
    rest = fmt.target_length - len(t)
    np.testing.assert_array_equal(batch['labels'][i], t + [0] * rest)
    np.testing.assert_array_equal(batch['loss_mask'][i], [1] * len(t) + [0] * rest)
    np.testing.assert_array_equal(batch['decoder_input_ids'][i], ([0] + t + [0] * rest)[:-1])
    hf_labels.append(t + [-100] * rest)
  # Decoder inputs are exactly what HF T5 builds from labels.
  config = transformers.T5Config(vocab_size=len(tok), d_model=8, d_kv=4, d_ff=8, num_layers=1,
                                 num_heads=2, pad_token_id=0, decoder_start_token_id=0)
  shifted = transformers.T5ForConditionalGeneration(config)._shift_right(torch.tensor(hf_labels))
  np.testing.assert_array_equal(batch['decoder_input_ids'], shifted.numpy())


@pytest.mark.parametrize('family', ['opt', 't5'])
def test_generation_batch_matches_blip2_processor(examples, family):
  tok = tk.embedded_tokenizer(family)
  fmt = _fmt(tok, family, 'vqa', examples, extra=3)
  ours = batching.generation_batch(examples, tok, fmt, 'vqa')
  tok.padding_side = 'left' if family == 'opt' else 'right'
  processor = transformers.Blip2Processor(
      transformers.BlipImageProcessor(size={'height': 64, 'width': 64}), tok, num_query_tokens=Q)
  hf = processor(images=list(examples['image']),
                 text=batching.prompts(family, 'vqa', examples['question']),
                 padding='max_length', max_length=Q + fmt.prompt_length, return_tensors='np')
  np.testing.assert_array_equal(ours['input_ids'], hf['input_ids'])
  np.testing.assert_array_equal(ours['attention_mask'], hf['attention_mask'])
  np.testing.assert_allclose(ours['image'], hf['pixel_values'].transpose(0, 2, 3, 1), atol=1e-5)
  if family == 'opt':  # prompts end at the last column, so generation appends at one index.
    assert (ours['input_ids'][:, -1] == tok.convert_tokens_to_ids(':')).all()


def test_truncation_keeps_fixed_shapes(examples):
  tok = tk.embedded_tokenizer('opt')
  fmt = batching.input_format(tok, 'opt', Q, prompt_length=6, target_length=3, image_size=64)
  batch = batching.train_batch(examples, tok, fmt, 'caption')
  assert batch['input_ids'].shape == (12, Q + 9)
  assert (batch['loss_mask'].sum(1) == 3).all()
  assert (batch['labels'][np.arange(12), batch['loss_mask'].argmax(1) + 2] == tok.eos_token_id).all()


def test_input_format_errors():
  tok = tk.embedded_tokenizer('opt')
  with pytest.raises(ValueError, match='family'):
    batching.input_format(tok, 'gpt', Q, 8, 4, 64)
  with pytest.raises(ValueError, match='prompt_length'):
    batching.input_format(tok, 'opt', Q, 1, 4, 64)


def test_label_subset_is_exact_and_flows_into_batches(examples):
  labelled = batching.label_subset(1000, 0.1, seed=5)
  assert labelled.sum() == 100 and (labelled == batching.label_subset(1000, 0.1, seed=5)).all()
  assert (labelled != batching.label_subset(1000, 0.1, seed=6)).any()
  with pytest.raises(ValueError, match='label_fraction'):
    batching.label_subset(10, 1.5, seed=0)
  tok = tk.embedded_tokenizer('opt')
  data = {**examples, 'labelled': batching.label_subset(12, 0.25, seed=0)}
  batch = next(batching.iterate_batches(data, 12, seed=0))
  model_batch = batching.train_batch(batch, tok, _fmt(tok, 'opt', 'vqa', examples), 'vqa')
  assert model_batch['labelled'].sum() == 3


def _ids(d):
  return np.asarray(d['id']).tolist()


def test_iterate_batches_resumes_exactly_and_covers_epochs():
  data = {'id': np.arange(10), 'text': [str(i) for i in range(10)], 'meta': {'x': np.arange(10) * 2}}
  full = list(batching.iterate_batches(data, 3, seed=1, num_epochs=4))
  assert len(full) == 12  # 3 steps per epoch, remainder dropped.
  for epoch in range(4):
    seen = sum((_ids(b) for b in full[3 * epoch:3 * epoch + 3]), [])
    assert len(set(seen)) == 9
  assert _ids(full[0]) + _ids(full[1]) != _ids(full[3]) + _ids(full[4])  # reshuffled each epoch
  for b in full:
    assert b['text'] == [str(i) for i in b['id']] and (b['meta']['x'] == 2 * b['id']).all()
  for k in (1, 3, 7):
    resumed = list(batching.iterate_batches(data, 3, seed=1, start_step=k, num_epochs=4))
    assert [_ids(b) for b in resumed] == [_ids(b) for b in full[k:]]
  other = list(batching.iterate_batches(data, 3, seed=2, num_epochs=1))
  assert [_ids(b) for b in other] != [_ids(b) for b in full[:3]]


def test_iterate_batches_eval_pass_pads_last_batch():
  data = {'id': np.arange(7)}
  batches = list(batching.iterate_batches(data, 3, seed=0, shuffle=False, num_epochs=1,
                                          drop_remainder=False))
  assert [_ids(b) for b in batches] == [[0, 1, 2], [3, 4, 5], [6, 6, 6]]
  assert [b['valid'].tolist() for b in batches][-1] == [True, False, False]
  with pytest.raises(ValueError, match="'b'"):
    next(batching.iterate_batches({'a': np.arange(4), 'b': np.arange(3)}, 2, seed=0))
  with pytest.raises(ValueError, match='batch_size'):
    next(batching.iterate_batches(data, 8, seed=0))


def test_reshape_for_devices_and_process_split():
  batch = {'x': np.arange(24).reshape(8, 3), 'nested': {'y': np.arange(8)}}
  shards = batching.reshape_for_devices(batch, 4)
  assert shards['x'].shape == (4, 2, 3) and shards['nested']['y'].shape == (4, 2)
  np.testing.assert_array_equal(shards['x'][1], batch['x'][2:4])
  with pytest.raises(ValueError, match="'nested.y'.*3 devices"):
    batching.reshape_for_devices({'nested': {'y': np.arange(8)}}, 3)
  with pytest.raises(TypeError, match="'q'"):
    batching.reshape_for_devices({'q': ['a', 'b']}, 2)

  examples = {**batch, 'q': [str(i) for i in range(8)]}
  parts = [batching.process_split(examples, p, 2) for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([p['x'] for p in parts]), batch['x'])
  assert parts[0]['q'] + parts[1]['q'] == examples['q']
  with pytest.raises(ValueError, match='process_index'):
    batching.process_split(examples, 2, 2)
  with pytest.raises(ValueError, match='3 processes'):
    batching.process_split(examples, 0, 3)
