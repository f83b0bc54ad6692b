"""The shipped backbone's record: written from a finished run, checked before anything trains on it."""

import json
import os

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


def test_only_a_finished_embedded_run_can_be_shipped(tmp_path):
  with pytest.raises(ValueError, match='holds no exported backbone'):
    shipped.ship(str(tmp_path), str(tmp_path / 'out'), 'cmd')


def test_the_shipped_backbone_is_intact_and_is_the_default():
  record = shipped.verify(configs.SHIPPED_BACKBONE)
  _, params = free_jax.load_pretrained(configs.SHIPPED_BACKBONE)
  assert exits_io.fingerprint(params) == record['fingerprint']
  config = vqa.get_config()
  assert (config.model.source, config.model.pretrained_path) == ('pretrained', configs.SHIPPED_BACKBONE)
  pipeline.validate_config(config)
  assert vqa.get_config('smoke').model.source == 'embedded'  # :smoke trains a tiny one from scratch
