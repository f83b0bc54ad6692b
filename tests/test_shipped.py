"""The shipped backbone's record: written from a finished run, checked before anything trains on it."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import free_jax
from experiments.configs import vqa
from free_jax import configs, exits_io, shipped
from free_jax.training import pipeline


@pytest.fixture(scope='module')
def shipped_dir(smoke_run, tmp_path_factory):
  workdir, _ = smoke_run
  out = str(tmp_path_factory.mktemp('assets') / 'backbone')
  record = shipped.ship(str(workdir), out, 'python experiments/train.py ...')
  return workdir, out, record


def test_ship_records_what_was_shipped(shipped_dir):
  workdir, out, record = shipped_dir
  assert shipped.verify(out) == record
  assert set(record['files']) >= {'config.json', 'model.safetensors', 'tokenizer.json'}
  _, params = free_jax.load_pretrained(out)
  assert record['fingerprint'] == exits_io.fingerprint(params)
  assert record['command'] == 'python experiments/train.py ...' and record['backbone_train']['steps'] == 20
  assert os.path.getsize(os.path.join(out, shipped.CURVES_FILE)) > 0
  assert 'per_type' in record['test'] and record['test']['num_test'] == 32


def test_an_existing_shipped_backbone_is_kept_unless_overwritten(shipped_dir, tmp_path):
  workdir, out, record = shipped_dir
  target = tmp_path / 'b'
  shipped.ship(str(workdir), str(target), 'first')
  with pytest.raises(ValueError, match='exists: pass overwrite=True'):
    shipped.ship(str(workdir), str(target), 'second')
  assert shipped.verify(str(target))['command'] == 'first'
  shipped.ship(str(workdir), str(target), 'second', overwrite=True)
  assert shipped.verify(str(target))['command'] == 'second'
  assert sorted(os.listdir(tmp_path)) == ['b']  # no staging or replaced copies left behind


def test_a_changed_shipped_file_is_refused_before_any_work(shipped_dir, tmp_path):
  workdir, out, _ = shipped_dir
  target = tmp_path / 'b'
  shipped.ship(str(workdir), str(target), 'cmd')
  config = vqa.get_config('smoke')
  with config.unlocked():
    config.model.source, config.model.pretrained_path = 'pretrained', str(target)
  pipeline.validate_config(config)
  with open(target / 'config.json') as f:
    hf_config = json.load(f)
  hf_config['text_config']['dropout'] = 0.5
  with open(target / 'config.json', 'w') as f:
    json.dump(hf_config, f)
  with pytest.raises(ValueError, match=r'config.json differs from the shipped file .*git checkout'):
    pipeline.validate_config(config)
  os.remove(target / 'config.json')
  with pytest.raises(ValueError, match=r'config.json is missing from the shipped backbone'):
    shipped.verify(str(target))


def test_a_bfloat16_ship_stores_the_lm_in_bfloat16_and_records_only_its_own_evaluation(shipped_dir, tmp_path):
  workdir, out, float32_record = shipped_dir
  target = tmp_path / 'bf16'
  record = shipped.ship(str(workdir), str(target), 'cmd', lm_dtype='bfloat16')
  assert shipped.verify(str(target)) == record and record['lm_dtype'] == 'bfloat16'
  with open(target / 'model.safetensors', 'rb') as f:  # the safetensors header: a length, then JSON
    header = json.loads(f.read(int.from_bytes(f.read(8), 'little')))
  dtypes = {name.split('.')[0]: info['dtype'] for name, info in header.items() if name != '__metadata__'}
  assert dtypes == {'language_model': 'BF16', 'language_projection': 'BF16', 'vision_model': 'F32',
                    'qformer': 'F32', 'query_tokens': 'F32'}
  _, params = free_jax.load_pretrained(str(target))
  assert record['fingerprint'] == exits_io.fingerprint(params) != float32_record['fingerprint']
  lm = np.asarray(params['language_model']['layers']['mlp']['fc1']['kernel'])
  np.testing.assert_array_equal(lm, lm.astype(jnp.bfloat16).astype(np.float32))  # the stored values, read back
  # The run's evaluation was of the float32 weights: not the shipped backbone's figures.
  assert 'test' not in record


def test_ship_never_replaces_a_directory_it_did_not_write(shipped_dir, tmp_path):
  workdir, _, _ = shipped_dir
  (tmp_path / 'mine').mkdir()
  (tmp_path / 'mine' / 'config.json').write_text('{}')
  (tmp_path / 'mine' / 'plan.md').write_text('keep')
  with pytest.raises(FileExistsError, match="holds 'plan.md': it is not a shipped backbone written here"):
    shipped.ship(str(workdir), str(tmp_path / 'mine'), 'cmd', overwrite=True)
  assert sorted(os.listdir(tmp_path / 'mine')) == ['config.json', 'plan.md']


def test_only_a_finished_embedded_run_can_be_shipped(tmp_path):
  with pytest.raises(ValueError, match='holds no exported backbone'):
    shipped.ship(str(tmp_path), str(tmp_path / 'out'), 'cmd')


def test_the_shipped_backbones_are_intact_and_the_wide_one_is_the_default():
  widths = {}
  for path, arg in ((configs.SHIPPED_BACKBONE, ''), (configs.SMALL_BACKBONE, 'small')):
    record = shipped.verify(path)
    model, params = free_jax.load_pretrained(path)
    assert exits_io.fingerprint(params) == record['fingerprint']
    config = vqa.get_config(arg)
    assert (config.model.source, config.model.pretrained_path) == ('pretrained', path)
    pipeline.validate_config(config)
    widths[arg] = model.lm_stack().hidden_size
  assert widths == {'': 512, 'small': 128}
  assert vqa.get_config('smoke').model.source == 'embedded'  # :smoke trains a tiny one from scratch
