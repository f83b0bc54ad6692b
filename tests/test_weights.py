"""`free_jax.load_pretrained` on real `save_pretrained` output: layouts, dtypes and clear errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import tokenizers
import torch
import transformers

import free_jax
from experiments.configs import vqa
from free_jax import backbone
from free_jax.data import tokenizer as tokenizer_lib
from free_jax.models import blip2
from free_jax.models.hf_tensors import WeightsError
from tests.hf_fixtures import IMAGE_SIZE, save_tiny_blip2, tiny_blip2, tiny_blip2_config


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  return save_tiny_blip2(tmp_path_factory.mktemp('opt'), 'opt')


@pytest.fixture
def edited(checkpoint, tmp_path):
  """A copy of the checkpoint whose tensors a test rewrites: edited(fn) applies fn to the dict."""
  path = tmp_path / 'edited'
  shutil.copytree(checkpoint, path)

  def edit(fn):
    tensors = safetensors.numpy.load_file(path / 'model.safetensors')
    fn(tensors)
    safetensors.numpy.save_file(tensors, path / 'model.safetensors', metadata={'format': 'pt'})
    return path

  return edit


def test_loads_tied_head_absent_from_file(checkpoint):
  tensors = safetensors.numpy.load_file(checkpoint / 'model.safetensors')
  assert 'language_model.lm_head.weight' not in tensors  # save_pretrained dropped the tied copy
  model, params = free_jax.load_pretrained(checkpoint)
  assert set(params) == {'vision_model', 'query_tokens', 'qformer', 'language_projection',
                         'language_model'}
  np.testing.assert_array_equal(params['language_model']['embed_tokens']['embedding'],
                                tensors['language_model.model.decoder.embed_tokens.weight'])
  assert model.lm_stack().num_layers == 2


def test_accepts_a_tied_head_present_in_the_file(checkpoint, edited):
  def add_head(t):
    t['language_model.lm_head.weight'] = t['language_model.model.decoder.embed_tokens.weight']
  _, params = free_jax.load_pretrained(edited(add_head))
  _, reference = free_jax.load_pretrained(checkpoint)
  jax.tree.map(np.testing.assert_array_equal, params, reference)


def test_sharded_checkpoint_loads_the_same_params(checkpoint, tmp_path):
  tiny_blip2('opt').save_pretrained(tmp_path, max_shard_size='20KB')
  shards = sorted(p.name for p in tmp_path.glob('model-*.safetensors'))
  assert len(shards) > 1 and (tmp_path / 'model.safetensors.index.json').is_file()
  _, sharded = free_jax.load_pretrained(tmp_path)
  _, single = free_jax.load_pretrained(checkpoint)
  jax.tree.map(np.testing.assert_array_equal, sharded, single)


def test_bfloat16_checkpoint_and_dtype(tmp_path):
  tiny_blip2('opt').to(torch.bfloat16).save_pretrained(tmp_path)
  _, params = free_jax.load_pretrained(tmp_path, jnp.bfloat16)
  dtypes = {k: {x.dtype for x in jax.tree.leaves(v)} for k, v in params.items()}
  assert dtypes['language_model'] == dtypes['vision_model'] == {jnp.dtype(jnp.bfloat16)}
  assert dtypes['qformer'] == dtypes['query_tokens'] == {jnp.dtype(jnp.float32)}


def test_missing_tensor_is_named(edited):
  key = 'language_model.model.decoder.layers.1.fc2.bias'
  path = edited(lambda t: t.pop(key))
  with pytest.raises(WeightsError, match=f"missing tensor '{key}'"):
    free_jax.load_pretrained(path)


def test_unexpected_tensor_is_named(edited):
  key = 'language_model.model.decoder.layers.2.fc1.weight'
  path = edited(lambda t: t.update({key: np.zeros((4, 4), np.float32)}))
  with pytest.raises(WeightsError, match=f"unexpected tensor '{key}'"):
    free_jax.load_pretrained(path)


def test_wrong_shape_is_named(edited):
  key = 'language_model.model.decoder.layers.0.self_attn.q_proj.weight'
  path = edited(lambda t: t.update({key: np.zeros((32, 16), np.float32)}))
  with pytest.raises(WeightsError, match=rf"'{key}' has shape \(32, 16\), the config expects \(32, 32\)"):
    free_jax.load_pretrained(path)


def test_pickle_checkpoint_is_refused_not_unpickled(checkpoint, tmp_path):
  shutil.copy(checkpoint / 'config.json', tmp_path / 'config.json')
  (tmp_path / 'pytorch_model.bin').write_bytes(b'not a pickle: loading it would fail differently')
  with pytest.raises(WeightsError, match='does not unpickle.*save_pretrained'):
    free_jax.load_pretrained(tmp_path)


def test_damaged_files_and_tensors_name_the_cause(checkpoint, edited, tmp_path):
  damaged = tmp_path / 'damaged'
  shutil.copytree(checkpoint, damaged)
  weights_file = damaged / 'model.safetensors'
  weights_file.write_bytes(weights_file.read_bytes()[:1000])
  with pytest.raises(WeightsError, match='model.safetensors: not a readable safetensors file'):
    free_jax.load_pretrained(damaged)
  (damaged / 'config.json').write_text('{"model_type": "blip-2", ')
  with pytest.raises(ValueError, match='config.json: not valid JSON'):
    free_jax.load_pretrained(damaged)
  name = 'vision_model.embeddings.patch_embedding.weight'
  path = edited(lambda t: t.update({name: np.full_like(t[name], np.nan)}))
  with pytest.raises(WeightsError, match=f'tensor {name} holds NaN or inf'):
    free_jax.load_pretrained(path)
  path = edited(lambda t: t.update({name: t[name].astype(np.int32)}))
  with pytest.raises(WeightsError, match=f'tensor {name} is int32; BLIP-2 weights are floating point'):
    free_jax.load_pretrained(path)


def test_integer_pixels_are_refused(checkpoint):
  model, params = free_jax.load_pretrained(checkpoint)
  size = model.config.vision.image_size
  with pytest.raises(ValueError, match='pixel_values are uint8: pass normalised float pixels'):
    model.apply({'params': params}, np.zeros((1, size, size, 3), np.uint8), np.zeros((1, 4), np.int32))


def test_missing_directory_and_config(checkpoint, tmp_path):
  with pytest.raises(FileNotFoundError, match='no such model directory'):
    free_jax.load_pretrained(tmp_path / 'absent')
  with pytest.raises(FileNotFoundError, match='config.json'):
    free_jax.load_pretrained(tmp_path)


def test_unsupported_text_model_is_rejected(checkpoint, tmp_path):
  shutil.copytree(checkpoint, tmp_path, dirs_exist_ok=True)
  config = json.loads((tmp_path / 'config.json').read_text())
  config['text_config']['model_type'] = 'llama'
  (tmp_path / 'config.json').write_text(json.dumps(config))
  with pytest.raises(ValueError, match="text_config.model_type='llama' is not supported"):
    free_jax.load_pretrained(tmp_path)


def test_tokenizer_and_processor_load_offline(tmp_path):
  vocab = {'[UNK]': 0, '[PAD]': 1, 'a': 2, 'red': 3, 'cube': 4}
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='[UNK]'))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token='[UNK]',
                                                   pad_token='[PAD]')
  processor = transformers.Blip2Processor(transformers.BlipImageProcessor(size={'height': 16, 'width': 16}),
                                          tokenizer, num_query_tokens=4)
  processor.save_pretrained(tmp_path)
  assert free_jax.load_tokenizer(tmp_path)('a red cube')['input_ids'] == [2, 3, 4]
  loaded = free_jax.load_processor(tmp_path)
  assert isinstance(loaded, transformers.Blip2Processor)
  assert loaded.num_query_tokens == 4


def test_a_vision_config_the_scene_generator_cannot_draw_for_names_the_vision_config():
  model_config = blip2.Blip2Config.from_hf(tiny_blip2_config('opt'))
  with pytest.raises(ValueError, match=(r"data.source='sort_of_clevr' cannot draw scenes for the model's vision "
                                        rf'config \(image_size={IMAGE_SIZE}\): image_size={IMAGE_SIZE} must be')):
    backbone.make_input_format(vqa.get_config('smoke'), model_config, tokenizer_lib.embedded_tokenizer('opt'))
