"""`free_jax.save_pretrained`: HF BLIP-2 checkpoints that `load_pretrained` reads back bit-exactly and
transformers' PyTorch `Blip2ForConditionalGeneration` loads with parity (the embedded model included)."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import free_jax
from experiments.configs import vqa
from free_jax import export
from free_jax.data import tokenizer as tokenizer_lib
from free_jax.models import blip2
from free_jax.training import pipeline
from free_jax.weights import read_tensors
from tests.hf_fixtures import blip2_inputs, save_tiny_blip2, torch_inputs

# name -> (text, text-config overrides) of the tiny HF checkpoints that are loaded and re-exported.
VARIANTS = {
    'opt': ('opt', {}),
    'opt_post_ln_untied': ('opt', dict(do_layer_norm_before=False, tie_word_embeddings=False)),
    't5_gated_untied': ('t5', {}),
    't5_relu_tied': ('t5', dict(feed_forward_proj='relu', tie_word_embeddings=True, num_layers=3)),
}
PARITY_TOLERANCE = 1e-4  # max |dlogits| in float32, as in tests/models/test_blip2_parity.py


@pytest.fixture(scope='module', params=sorted(VARIANTS))
def hf_checkpoint(request, tmp_path_factory):
  text, overrides = VARIANTS[request.param]
  return save_tiny_blip2(tmp_path_factory.mktemp(request.param), text, **overrides)


@pytest.fixture(scope='module')
def opt_model(tmp_path_factory):
  return free_jax.load_pretrained(save_tiny_blip2(tmp_path_factory.mktemp('opt'), 'opt'))


def _assert_bit_identical(got, want):
  got_leaves = dict(jax.tree_util.tree_leaves_with_path(got))
  want_leaves = dict(jax.tree_util.tree_leaves_with_path(want))
  assert got_leaves.keys() == want_leaves.keys()
  for path, value in want_leaves.items():
    value, other = np.asarray(value), np.asarray(got_leaves[path])
    assert other.dtype == value.dtype, jax.tree_util.keystr(path)
    assert other.shape == value.shape and other.tobytes() == value.tobytes(), jax.tree_util.keystr(path)
    assert np.array_equal(other, value), jax.tree_util.keystr(path)


def _perturbed(params, seed=0):
  """Params that did not come from an HF file (every leaf moved), in their own dtypes."""
  rng = np.random.default_rng(seed)
  move = lambda x: (np.asarray(x, np.float32) + 0.05 * rng.standard_normal(x.shape)).astype(x.dtype)
  return jax.tree.map(move, params)


def _hf_model(path):
  model, info = transformers.Blip2ForConditionalGeneration.from_pretrained(
      path, output_loading_info=True, local_files_only=True, attn_implementation='eager')
  assert {k: list(v) for k, v in info.items() if k != 'error_msgs' and v} == {}, info
  return model.eval()


def _max_logit_diff(model, params, hf, batch):
  got = np.asarray(jax.jit(model.apply)({'params': params}, **batch).logits)
  with torch.no_grad():
    want = hf(**torch_inputs(batch)).logits.numpy()
  assert got.shape == want.shape
  valid = batch.get('decoder_attention_mask', batch['attention_mask']).astype(bool)
  return np.abs(got - want)[valid].max()


def _inputs(config: blip2.Blip2Config):
  text = config.text
  if config.is_encoder_decoder:
    batch = blip2_inputs(2, (3, 5), pad_token_id=text.pad_token_id, bos_token_id=None)
    batch['decoder_input_ids'] = np.array([[0, 5, 6, 7], [0, 8, 9, 0]], np.int32)
    batch['decoder_attention_mask'] = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], np.int32)
    return batch
  return blip2_inputs(2, (3, 5), pad_token_id=text.pad_token_id, bos_token_id=text.bos_token_id)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_round_trip_is_bit_exact(hf_checkpoint, dtype, tmp_path):
  model, params = free_jax.load_pretrained(hf_checkpoint, dtype)
  out = free_jax.save_pretrained(model, params, tmp_path / 'export')
  assert out == tmp_path / 'export' and os.listdir(tmp_path) == ['export']  # no temporary left behind
  model2, params2 = free_jax.load_pretrained(out, dtype)
  assert model2.config == model.config
  _assert_bit_identical(params2, params)
  if dtype == jnp.float32:
    # Same tensor names (tied heads omitted, untied ones written), layouts and values as HF's own save.
    ours = safetensors.numpy.load_file(out / 'model.safetensors')
    theirs = safetensors.numpy.load_file(hf_checkpoint / 'model.safetensors')
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
      np.testing.assert_array_equal(ours[key], value, err_msg=key)
    config = json.loads((out / 'config.json').read_text())
    assert config == json.loads((hf_checkpoint / 'config.json').read_text())
  else:  # saved in the params' dtypes: the Q-Former and query tokens stay float32, as in HF
    tensors = read_tensors(out)
    assert tensors['language_projection.weight'].dtype == jnp.bfloat16
    assert tensors['qformer.layernorm.weight'].dtype == tensors['query_tokens'].dtype == np.float32
    assert json.loads((out / 'config.json').read_text())['dtype'] == 'bfloat16'


def test_transformers_loads_the_export_with_parity(hf_checkpoint, tmp_path):
  model, params = free_jax.load_pretrained(hf_checkpoint)
  params = _perturbed(params)
  out = free_jax.save_pretrained(model, params, tmp_path / 'export')
  diff = _max_logit_diff(model, params, _hf_model(out), _inputs(model.config))
  print(f'{hf_checkpoint.name}: max |dlogits| {diff:.2e}')
  assert diff < PARITY_TOLERANCE


def test_sharded_export(opt_model, tmp_path):
  model, params = opt_model
  params = _perturbed(params)
  out = free_jax.save_pretrained(model, params, tmp_path / 'export', max_shard_size='40KB')
  index = json.loads((out / 'model.safetensors.index.json').read_text())
  shards = sorted(set(index['weight_map'].values()))
  assert len(shards) > 2 and shards[0] == f'model-00001-of-{len(shards):05d}.safetensors'
  files = ['config.json', 'generation_config.json', 'model.safetensors.index.json',
           'preprocessor_config.json']
  assert sorted(os.listdir(out)) == sorted(files + shards)
  assert all(os.path.getsize(out / s) < 40_000 + 20_000 for s in shards)  # + one tensor over the limit
  _assert_bit_identical(free_jax.load_pretrained(out)[1], params)
  assert _max_logit_diff(model, params, _hf_model(out), _inputs(model.config)) < PARITY_TOLERANCE


# ---------------------------------------------------------------------------------------------------
# The embedded model, built as the pipeline builds it.


@pytest.fixture(scope='module')
def embedded(tmp_path_factory):
  config = vqa.get_config('smoke')
  model_config = pipeline.validate_config(config)
  tokenizer = tokenizer_lib.embedded_tokenizer('opt')
  assert model_config == pipeline.embedded_model_config(config.model.embedded, tokenizer)
  model = blip2.Blip2Model(model_config)
  fmt = pipeline.make_input_format(config, model_config, tokenizer)
  params = _perturbed(pipeline.init_backbone_params(model, fmt, jax.random.key(0)))  # no all-ones norms
  path = free_jax.save_pretrained(model, params, tmp_path_factory.mktemp('embedded') / 'ckpt', tokenizer)
  return model, params, tokenizer, path


def test_embedded_model_round_trip_with_its_tokenizer(embedded):
  model, params, tokenizer, path = embedded
  loaded_model, loaded = free_jax.load_pretrained(path)
  assert loaded_model.config == model.config
  _assert_bit_identical(loaded, params)
  loaded_tokenizer = free_jax.load_tokenizer(path)
  texts = ['what color is the red circle ?', 'is there a blue square', 'zebra']
  assert loaded_tokenizer(texts)['input_ids'] == tokenizer(texts)['input_ids']
  assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
  for name in ('pad_token_id', 'bos_token_id', 'eos_token_id', 'unk_token_id'):
    assert getattr(loaded_tokenizer, name) == getattr(tokenizer, name), name
  assert len(tokenizer) == len(tokenizer_lib.embedded_tokenizer('opt'))  # the processor used a copy


def test_embedded_model_matches_transformers_through_the_processor(embedded):
  model, params, _, path = embedded
  config = model.config
  processor = free_jax.load_processor(path)
  assert isinstance(processor, transformers.Blip2Processor)
  size = config.vision.image_size
  images = list(np.random.default_rng(0).integers(0, 256, (2, size + 5, size - 3, 3), dtype=np.uint8))
  encoded = processor(images=images, text=['what color is the circle ?', 'is there a square'],
                      padding=True, return_tensors='np')
  ids = encoded['input_ids']
  assert (ids == config.image_token_index).sum(1).tolist() == [config.num_query_tokens] * 2
  batch = {'pixel_values': np.transpose(encoded['pixel_values'], (0, 2, 3, 1)).astype(np.float32),
           'input_ids': ids.astype(np.int32), 'attention_mask': encoded['attention_mask'].astype(np.int32)}
  assert batch['pixel_values'].shape[1:3] == (size, size)
  diff = _max_logit_diff(model, params, _hf_model(path), batch)
  assert diff < PARITY_TOLERANCE


# ---------------------------------------------------------------------------------------------------
# Refusals and failures.


def test_refuses_to_overwrite_a_checkpoint_unless_asked(opt_model, tmp_path):
  model, params = opt_model
  path = free_jax.save_pretrained(model, params, tmp_path / 'ckpt')
  before = {f: (path / f).read_bytes() for f in os.listdir(path)}
  refusal = f'^{re.escape(str(path))} already holds an HF checkpoint; pass overwrite=True to replace it$'
  with pytest.raises(FileExistsError, match=refusal):
    free_jax.save_pretrained(model, _perturbed(params), path)
  assert {f: (path / f).read_bytes() for f in os.listdir(path)} == before

  new = _perturbed(params)
  free_jax.save_pretrained(model, new, path, overwrite=True)
  _assert_bit_identical(free_jax.load_pretrained(path)[1], new)
  assert os.listdir(tmp_path) == ['ckpt']

  (tmp_path / 'notes').mkdir()
  (tmp_path / 'notes' / 'todo.txt').write_text('keep me')
  with pytest.raises(FileExistsError, match='notes is not empty and has no config.json: it is not an HF checkpoint'):
    free_jax.save_pretrained(model, params, tmp_path / 'notes', overwrite=True)
  assert os.listdir(tmp_path / 'notes') == ['todo.txt']
  (path / 'runs').mkdir()  # a checkpoint with something of the user's beside it is not only a checkpoint
  with pytest.raises(FileExistsError, match="ckpt is not empty and holds 'runs': it is not an HF checkpoint"):
    free_jax.save_pretrained(model, params, path, overwrite=True)
  assert (path / 'runs').is_dir()
  (tmp_path / 'empty').mkdir()
  free_jax.save_pretrained(model, params, tmp_path / 'empty')  # an empty directory is fine
  _assert_bit_identical(free_jax.load_pretrained(tmp_path / 'empty')[1], params)


def test_a_failed_write_leaves_nothing_behind(opt_model, tmp_path, monkeypatch):
  model, params = opt_model
  old = free_jax.save_pretrained(model, params, tmp_path / 'old')
  write = export._write_tensors

  def fail_after_writing(tensors, directory, max_shard_size):
    write(tensors, directory, max_shard_size)
    raise OSError('disk full')

  monkeypatch.setattr(export, '_write_tensors', fail_after_writing)
  with pytest.raises(OSError, match='disk full'):
    free_jax.save_pretrained(model, params, tmp_path / 'new')
  with pytest.raises(OSError, match='disk full'):  # replacing: the old checkpoint stays as it was
    free_jax.save_pretrained(model, _perturbed(params), old, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ['old']
  _assert_bit_identical(free_jax.load_pretrained(old)[1], params)


def test_rejects_params_or_tokenizer_that_do_not_match(opt_model, tmp_path):
  model, params = opt_model
  broken = {**params, 'qformer': {k: v for k, v in params['qformer'].items() if k != 'layer_1'}}
  with pytest.raises(ValueError, match=r"params\['qformer'\]\['layer_1'\] is missing"):
    free_jax.save_pretrained(model, broken, tmp_path / 'a')
  wrong_shape = {**params, 'query_tokens': params['query_tokens'][:1]}
  with pytest.raises(ValueError, match=r"params\['query_tokens'\] has shape \(1, 32\), the model expects"):
    free_jax.save_pretrained(model, wrong_shape, tmp_path / 'a')
  tokenizer = tokenizer_lib.embedded_tokenizer('opt')  # '<image>' is id 4, the model's is 99
  with pytest.raises(ValueError, match="image token '<image>' has id 4, the model config has image_token_in"):
    free_jax.save_pretrained(model, params, tmp_path / 'a', tokenizer)
  assert os.listdir(tmp_path) == []
