"""`free_jax.EarlyExitVLM` on a finished `:smoke` run: load, generate in three modes, share the exits."""

import json
import shutil
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import free_jax
from experiments.configs import vqa
from free_jax import exits_io
from free_jax.eval import evaluator

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUESTIONS = ['what color is the square?', 'how many circles are there?', 'is there a red shape?']


@pytest.fixture(scope='module')
def vlm(smoke_run):
  return free_jax.EarlyExitVLM.load(smoke_run[0])


def _images(n=3, seed=0):
  # Odd sizes: the object resizes and normalises as the backbone's image processor does.
  return np.random.default_rng(seed).integers(0, 256, (n, 50, 70, 3), dtype=np.uint8)


def test_load_needs_only_the_workdir_and_takes_the_calibrated_threshold(smoke_run, vlm):
  summary = json.loads((smoke_run[0] / 'eval' / 'summary.json').read_text())
  assert vlm.threshold == summary['threshold']
  assert vlm.exit_layers == tuple(vqa.get_config('smoke').exits.layers)


def test_speculative_and_unreachable_threshold_equal_full_greedy(vlm):
  images = _images()
  full = vlm.generate(images, QUESTIONS, mode='full')
  for out in (vlm.generate(images, QUESTIONS, mode='speculative', threshold=0.0),
              vlm.generate(images, QUESTIONS, mode='early_exit', threshold=2.0)):
    np.testing.assert_array_equal(out.tokens, full.tokens)
    assert out.texts == full.texts
  num_layers = vlm.stack.num_layers
  assert set(full.exit_layers[full.tokens != vlm.backbone.tokenizer.pad_token_id].ravel()) <= {num_layers}
  assert set(full.seconds) == {'prepare', 'decode', 'total'}


def test_early_exit_reports_the_layer_each_token_left_at(vlm):
  out = vlm.generate(_images(), QUESTIONS, mode='early_exit', threshold=0.0)
  assert out.tokens.shape == out.exit_layers.shape == (3, vlm.max_new_tokens)
  assert out.mode == 'early_exit' and out.threshold == 0.0
  assert set(out.exit_layers.ravel()) <= {0, *vlm.exit_layers, vlm.stack.num_layers}
  assert out.exit_layers[:, 0].min() > 0  # every row generated a first token
  assert all(isinstance(t, str) for t in out.texts)


def test_captions_image_files_and_one_image(vlm, tmp_path):
  paths = []
  for i, image in enumerate(_images(2)):
    paths.append(tmp_path / f'{i}.png')
    Image.fromarray(image).save(paths[-1])
  from_files = vlm.generate(paths, mode='full', max_new_tokens=6)
  from_arrays = vlm.generate(_images(2), mode='full', max_new_tokens=6)
  np.testing.assert_array_equal(from_files.tokens, from_arrays.tokens)
  one = vlm.generate(_images(1)[0], QUESTIONS[:1], mode='full')
  assert len(one.texts) == 1
  # One path (not a sequence of characters) and one grayscale image are batches of one.
  np.testing.assert_array_equal(vlm.generate(str(paths[0]), QUESTIONS[:1], mode='full').tokens,
                                vlm.generate(paths[:1], QUESTIONS[:1], mode='full').tokens)
  gray = _images(1)[0, :, :, 0]
  np.testing.assert_array_equal(vlm.generate(gray, QUESTIONS[:1], mode='full').tokens,
                                vlm.generate(np.repeat(gray[..., None], 3, -1), QUESTIONS[:1], mode='full').tokens)


def test_thresholds_per_exit_and_lengths_are_checked_before_decoding(vlm):
  n = len(vlm.exit_layers)
  out = vlm.generate(_images(), QUESTIONS, threshold=[2.0] * n)
  assert out.threshold == (2.0,) * n
  np.testing.assert_array_equal(out.tokens, vlm.generate(_images(), QUESTIONS, mode='full').tokens)
  assert vlm.generate(_images(), QUESTIONS, max_new_tokens=1).tokens.shape == (3, 1)
  limit = vlm.stack.max_positions
  for kwargs, message in ((dict(threshold=[0.5] * (n + 1)), rf'one value or one per exit \({n}\), got {n + 1}'),
                          (dict(threshold='high'),
                           r"thresholds must be numbers in \[0, 1\], one or one per exit \(2\); got 'high'"),
                          (dict(max_new_tokens=0), 'max_new_tokens=0 must be a positive integer'),
                          (dict(max_new_tokens=limit), f'max_new_tokens={limit} does not fit: the LM has {limit} '
                                                       'positions')):
    with pytest.raises(ValueError, match=message) as error:
      vlm.generate(_images(), QUESTIONS, **kwargs)
    assert '\n' not in str(error.value)


def test_exits_are_used_only_for_the_task_they_were_calibrated_for(vlm):
  assert vlm.meta.task == 'vqa'
  with pytest.raises(ValueError, match=r"calibrated for 'vqa', not 'caption': load a caption run \(python "
                                       r'experiments/train.py --config=experiments/configs/caption.py'):
    vlm.generate(_images())
  with pytest.raises(ValueError, match=r"max_new_tokens defaults to the 'vqa' run's 4"):
    vlm.generate(_images(), mode='full')
  assert vlm.generate(_images(), mode='full', max_new_tokens=12).tokens.shape == (3, 12)


def test_bad_inputs_are_refused_in_one_line(vlm, tmp_path):
  cases = [(dict(images=_images(), questions=QUESTIONS[:2]), '2 questions for 3 images'),
           (dict(images=_images(), questions=QUESTIONS, mode='fast'), "mode='fast'"),
           (dict(images=np.zeros((1, 8, 8, 3), np.float32), questions=QUESTIONS[:1]), r'images\[0\] is float32'),
           (dict(images=[tmp_path / 'missing.png'], questions=QUESTIONS[:1]), 'cannot read'),
           (dict(images=_images(1), questions=['what colour is the only triangle?']),
            r"questions\[0\]: 'colour' is not in the tokenizer's vocabulary \(did you mean 'color'\?\)"),
           (dict(images=_images(1), questions=['What is there?']), r"'What' .* \(did you mean 'what'\?\)"),
           (dict(images=_images(1), questions=[123]), r'questions\[0\] is int 123, expected a string'),
           (dict(images=_images(2), questions=['is there a red shape?', '  ']), r'questions\[1\] is empty')]
  for kwargs, message in cases:
    with pytest.raises(ValueError, match=message) as error:
      vlm.generate(**kwargs)
    assert '\n' not in str(error.value)


def test_exits_round_trip_through_save_and_from_pretrained(smoke_run, vlm, tmp_path):
  vlm.save_exits(tmp_path / 'exits')
  with pytest.raises(FileExistsError, match='already holds exits'):
    vlm.save_exits(tmp_path / 'exits')
  shared = free_jax.EarlyExitVLM.from_pretrained(smoke_run[0] / 'backbone' / 'hf', exits=tmp_path / 'exits')
  assert shared.threshold == vlm.threshold and shared.exit_layers == vlm.exit_layers
  for mode in ('early_exit', 'speculative'):
    np.testing.assert_array_equal(shared.generate(_images(), QUESTIONS, mode=mode, threshold=0.3).tokens,
                                  vlm.generate(_images(), QUESTIONS, mode=mode, threshold=0.3).tokens)
  exit_params, _ = exits_io.load_exits(tmp_path / 'exits')
  for a, b in zip(*(sorted(exits_io._flatten(t).items()) for t in (exit_params, vlm.exit_params))):
    np.testing.assert_array_equal(a[1], b[1])


def test_save_exits_never_replaces_what_it_did_not_write(smoke_run, vlm, tmp_path, monkeypatch):
  workdir = tmp_path / 'workdir_copy'
  shutil.copytree(smoke_run[0], workdir)
  notes = tmp_path / 'notes'
  (notes / 'sub').mkdir(parents=True)
  (notes / 'notes.txt').write_text('mine')
  here = tmp_path / 'here'
  here.mkdir()
  (here / 'data.csv').write_text('1,2')
  monkeypatch.chdir(here)
  for target, message in ((workdir, r"holds '.+' and \d+ more entries: it is not exits written here"),
                          (notes, "holds 'notes.txt' and 1 more entries: it is not exits written here"),
                          ('.', 'is the current directory')):
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob('*'))
    for overwrite in (False, True):
      with pytest.raises(FileExistsError, match=message) as error:
        vlm.save_exits(target, overwrite=overwrite)
      assert '\n' not in str(error.value)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob('*')) == before
  vlm.save_exits(tmp_path / 'exits')
  vlm.save_exits(tmp_path / 'exits', overwrite=True)  # a previous output of save_exits may be replaced
  modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / 'exits').iterdir()}
  assert len(set(modes.values())) == 1, modes  # tensors as readable as the JSON beside them


def test_exits_of_another_backbone_are_refused(smoke_run, vlm, tmp_path):
  exits_dir = tmp_path / 'exits'
  vlm.save_exits(exits_dir)
  meta = json.loads((exits_dir / exits_io.META_FILE).read_text())
  for field, value, message in (('backbone_fingerprint', '0' * 16, 'trained on backbone 0000000000000000, this '
                                 'backbone is'), ('num_layers', 12, 'exits for a 12-layer opt LM, the backbone is a 4-layer')):
    (exits_dir / exits_io.META_FILE).write_text(json.dumps({**meta, field: value}))
    with pytest.raises(exits_io.ExitsMismatchError, match=message) as error:
      free_jax.EarlyExitVLM.from_pretrained(smoke_run[0] / 'backbone' / 'hf', exits=exits_dir)
    assert '\n' not in str(error.value)


def test_exits_moved_to_other_layers_are_refused(smoke_run, vlm, tmp_path):
  exits_dir = tmp_path / 'exits'
  vlm.save_exits(exits_dir)
  meta = json.loads((exits_dir / exits_io.META_FILE).read_text())
  meta['exit_layers'] = [layer + 1 for layer in meta['exit_layers']]
  (exits_dir / exits_io.META_FILE).write_text(json.dumps(meta))
  with pytest.raises(ValueError, match=r'exits.json: digest .* does not match exits.safetensors placed after layers '
                                       r'\[2, 3\] .* changed after saving') as error:
    free_jax.EarlyExitVLM.from_pretrained(smoke_run[0] / 'backbone' / 'hf', exits=exits_dir)
  assert '\n' not in str(error.value)


def test_damaged_exits_name_the_file(vlm, tmp_path):
  exits_dir = tmp_path / 'exits'
  vlm.save_exits(exits_dir)
  tensors = exits_dir / exits_io.TENSORS_FILE
  tensors.write_bytes(tensors.read_bytes()[:100])
  with pytest.raises(ValueError, match='exits.safetensors is not a readable safetensors file'):
    exits_io.load_exits(exits_dir)
  with pytest.raises(FileNotFoundError, match='not an exits directory'):
    exits_io.load_exits(tmp_path)


def test_evaluation_refuses_exits_trained_after_other_layers(smoke_run):
  config = vqa.get_config('smoke')
  with config.unlocked():
    config.exits.layers = (1, 3)
  with pytest.raises(exits_io.ExitsMismatchError, match=r'exits.layers=\(1, 3\), but the exits .* after layers \(1, 2\)'):
    evaluator.load_run(config, str(smoke_run[0]))


def test_a_fresh_process_loads_and_generates(smoke_run):
  code = ('import numpy as np, free_jax; vlm = free_jax.EarlyExitVLM.load(%r); '
          'out = vlm.generate(np.zeros((2, 40, 40, 3), np.uint8), ["what color is the square?"] * 2); '
          'print(len(out.texts), out.exit_layers.shape)' % str(smoke_run[0]))
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT))
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().endswith('2 (2, %d)' % vqa.get_config('smoke').eval.max_new_tokens)


def test_evaluation_and_inference_import_no_training():
  code = ('import sys, free_jax.eval.evaluator, free_jax.eval.benchmark, free_jax.vlm; '
          'import free_jax.inference.early_exit, free_jax.inference.speculative; '
          'print(sorted(m for m in sys.modules if m.startswith("free_jax.training")))')
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT)))
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == '[]'


def test_the_run_writes_what_load_needs(smoke_run):
  workdir = smoke_run[0]
  config = json.loads((workdir / 'config.json').read_text())
  assert config['exits']['layers'] == list(vqa.get_config('smoke').exits.layers)
  _, meta = exits_io.load_exits(workdir / 'exits')
  assert meta.training['free']['mode'] == config['free']['mode'] and 'eval' not in meta.training
  _, params = free_jax.load_pretrained(workdir / 'backbone' / 'hf')
  assert meta.backbone_fingerprint == exits_io.fingerprint(params)


def test_the_readme_quick_start_runs_as_written(smoke_run, tmp_path, monkeypatch):
  """The README's quick-start block, on the smoke run (its workdir and backbone in place of the default's)."""
  readme = (ROOT / 'README.md').read_text()
  start = readme.index('## Quick start')
  code = readme[readme.index('```python\n', start) + len('```python\n'):readme.index('```', readme.index('```python', start) + 9)]
  code = code.replace("'workdir/vqa'", repr(str(smoke_run[0]))).replace(
      "'assets/sort_of_clevr_blip2'", repr(str(smoke_run[0] / 'backbone' / 'hf')))
  monkeypatch.chdir(tmp_path)
  scope = {}
  exec(compile(code, 'README.md', 'exec'), scope)  # pylint: disable=exec-used
  assert len(scope['out'].texts) == 2 and scope['vlm2'].exit_layers == scope['vlm'].exit_layers
  assert (tmp_path / 'my_exits' / exits_io.META_FILE).is_file()
