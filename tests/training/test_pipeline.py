"""The whole run: `:smoke` through the CLI and the library, exact resume, finished workdirs, NaN stop, bad configs."""

import hashlib
import json
import os
import pathlib
import shutil
import time

import jax
import numpy as np
import pytest

from tests.conftest import run_train_cli
from experiments.configs import vqa
from free_jax import workdir_lock
from free_jax.training import checkpoint, free_step, logging as metrics_logging, parallel, pipeline



def _cli(workdir, *overrides):
  return run_train_cli(workdir, *overrides)


def _snapshot(workdir):
  return {str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(pathlib.Path(workdir).rglob('*'))
          if p.is_file() and p.name != workdir_lock.LOCK_FILE}  # the lock names its latest holder: not a result


def _final_state(workdir, config, backbone):
  target = jax.tree.map(np.asarray, pipeline.init_free_state(config, backbone))
  with checkpoint.Checkpointer(os.path.join(workdir, pipeline.CHECKPOINT_DIR)) as ckpt:
    return ckpt.restore_latest(target)


@pytest.fixture(scope='module')
def finished(smoke_run):
  return smoke_run


def test_cli_smoke_run_writes_everything(finished):
  workdir, out = finished
  records = metrics_logging.read_metrics(workdir)
  assert [r['step'] for r in records] == [5, 10]
  assert {'d_loss', 'g_loss', 'exit1/adv', 'exit2/ce', 'exit1/d_real_acc', 'exit2/agreement'} <= set(records[0])
  summary = json.loads((workdir / pipeline.EVAL_FILE).read_text())
  assert set(summary['accuracy']) == {'exit1', 'exit2', 'backbone'}
  assert 'backbone' in out.stdout and 'exit2' in out.stdout  # the table
  # The last screen: the evaluation's own figures, where the files are, what to run next; no library notices.
  ev = json.loads((workdir / 'eval' / 'summary.json').read_text())
  screen = out.stdout[out.stdout.index('Early exit on'):]
  for figure in (f"{ev['quality_full']:.3f}", f"{ev['quality_early_exit']:.3f}",
                 f"{ev['speedup_decode_wallclock']:.2f}x", f"threshold {ev['threshold']:.4g}",
                 str(workdir / 'eval' / 'summary.json'), f"EarlyExitVLM.load('{workdir}')"):
    assert figure in screen, figure
  assert 'PyTorch was not found' not in out.stdout + out.stderr
  with checkpoint.Checkpointer(workdir / pipeline.CHECKPOINT_DIR) as ckpt:
    assert ckpt.is_finished() and ckpt.latest_step() == 10
  with checkpoint.Checkpointer(workdir / pipeline.BACKBONE_DIR / pipeline.CHECKPOINT_DIR) as ckpt:
    assert ckpt.is_finished()


def test_rerun_on_a_finished_workdir_changes_nothing(finished, tmp_path):
  workdir = tmp_path / 'copy'
  shutil.copytree(finished[0], workdir)
  before = _snapshot(workdir)
  out, _ = _cli(workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  assert _snapshot(workdir) == before
  assert 'backbone' in out.stdout  # the stored table is printed again


def test_resume_after_a_corrupt_latest_checkpoint_equals_the_uninterrupted_run(finished, tmp_path):
  """Step 10 unreadable -> fall back to step 5, train 5 -> 10 again via the library: identical exits."""
  workdir = tmp_path / 'resume'
  shutil.copytree(finished[0], workdir)
  (workdir / pipeline.EVAL_FILE).unlink()
  for f in (workdir / pipeline.CHECKPOINT_DIR / '10').rglob('*'):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(b'garbage')
  config = vqa.get_config('smoke')
  summary = pipeline.train_and_evaluate(config, str(workdir))
  backbone = pipeline.load_backbone(config, str(workdir))
  resumed, original = _final_state(workdir, config, backbone), _final_state(finished[0], config, backbone)
  assert resumed.step == original.step == 10
  jax.tree.map(np.testing.assert_array_equal, resumed.state, original.state)
  assert summary == json.loads((finished[0] / pipeline.EVAL_FILE).read_text())
  assert metrics_logging.read_metrics(workdir) == metrics_logging.read_metrics(finished[0])


def test_a_damaged_final_checkpoint_is_never_passed_off_as_the_finished_run(finished, tmp_path):
  """Step 10's arrays truncated but its metadata intact (it still says final): the run trains 5 -> 10 again
  instead of reporting step 5 as final; the exits, and the evaluation tied to them, equal the original."""
  workdir = tmp_path / 'damaged'
  shutil.copytree(finished[0], workdir)
  data = [f for f in (workdir / pipeline.CHECKPOINT_DIR / '10' / 'state').rglob('*')
          if f.is_file() and f.parent.name == 'd' and f.stat().st_size > 0]
  assert data
  for f in data:
    f.write_bytes(f.read_bytes()[:8])
  config = vqa.get_config('smoke')
  pipeline.train_and_evaluate(config, str(workdir))
  backbone = pipeline.load_backbone(config, str(workdir))
  resumed, original = _final_state(workdir, config, backbone), _final_state(finished[0], config, backbone)
  assert resumed.step == 10 and resumed.meta['final']
  jax.tree.map(np.testing.assert_array_equal, resumed.state, original.state)
  for name in ('exits.safetensors', 'exits.json'):
    assert (workdir / 'exits' / name).read_bytes() == (finished[0] / 'exits' / name).read_bytes()
  assert json.loads((workdir / pipeline.EVAL_FILE).read_text()) == json.loads(
      (finished[0] / pipeline.EVAL_FILE).read_text())  # same exits, same settings: reused as is


def test_a_damaged_backbone_checkpoint_is_one_line_naming_it_and_nothing_is_lost(finished, tmp_path):
  """The backbone stage keeps one checkpoint: truncated, the run stops at once with one line naming the directory
  and the read error, and leaves the damaged files where they are."""
  workdir = tmp_path / 'damaged_backbone'
  shutil.copytree(finished[0], workdir)
  directory = workdir / pipeline.BACKBONE_DIR / pipeline.CHECKPOINT_DIR
  data = max((f for f in directory.rglob('*') if f.is_file() and f.parent.name == 'd'), key=lambda f: f.stat().st_size)
  data.write_bytes(data.read_bytes()[:100])
  before = _snapshot(workdir)
  out, _ = _cli(workdir)
  assert out.returncode == 1
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith(f'error: no readable checkpoint in {directory} (step ') and 'move the directory aside' in last
  # No traceback of ours (orbax's asyncio thread may print its own "Event loop is closed" one before the line).
  assert f'{os.sep}free_jax{os.sep}' not in ''.join(l for l in out.stderr.splitlines(True) if l.lstrip().startswith('File '))
  assert _snapshot(workdir) == before


def test_eval_overrides_on_a_finished_workdir_evaluate_again_and_keep_the_training(finished, tmp_path):
  workdir = tmp_path / 'override'
  shutil.copytree(finished[0], workdir)
  trained = {k: v for k, v in _snapshot(workdir).items() if k.startswith(('checkpoints', 'backbone', 'exits'))}
  out, _ = _cli(workdir, '--config.eval.max_new_tokens=3')
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads((workdir / pipeline.EVAL_FILE).read_text())
  assert summary['made_from']['eval']['max_new_tokens'] == 3
  assert json.loads((workdir / 'eval' / 'summary.json').read_text())['timing']['max_new_tokens'] == 3
  assert {k: v for k, v in _snapshot(workdir).items() if k.startswith(('checkpoints', 'backbone', 'exits'))} == trained


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(finished, tmp_path):
  config = vqa.get_config('smoke')
  backbone = pipeline.load_backbone(config, str(finished[0]))
  with config.unlocked():
    config.train.checkpoint_every = 1
  mesh = parallel.make_mesh()
  real_batches = pipeline.train_batches(pipeline.load_examples(config, 'train', 64, backbone.fmt.image_size),
                                        backbone, 'vqa', 16, 0, 0)

  def batches(start):
    for step, batch in enumerate(real_batches, start + 1):
      if step == 3:
        batch['image'][:] = np.nan  # a broken input at step 3
      yield batch

  disc = free_step.make_discriminators(2, config.discriminator)
  step_fn = free_step.make_free_step(backbone.model, config.exits.layers, config.free, disc,
                                     *pipeline.gan_optimizers(config), mesh)
  params = parallel.replicate(backbone.params, mesh)
  with checkpoint.Checkpointer(tmp_path / 'ckpt', async_save=False) as ckpt:
    with pytest.raises(FloatingPointError, match='not finite .* at step 3; stopping'):
      pipeline.train_loop(pipeline.init_free_state(config, backbone), lambda s, b: step_fn(s, params, b), ckpt,
                          str(tmp_path), mesh, total_steps=10, batches=batches, log_every=1, checkpoint_every=1,
                          progress_keys=('g_loss',), desc='nan')
    assert ckpt.all_steps() == [1, 2] and not ckpt.is_finished()
    restored = ckpt.restore_latest(jax.tree.map(np.asarray, pipeline.init_free_state(config, backbone)))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored.state.exits))


@pytest.mark.parametrize('field, value, message', [
    ('exits.layers', (1, 4), r'exits.layers=\(1, 4\).*\[1, 3\] for a backbone with 4 LM layers'),
    ('free.mode', 'gan', "free.mode='gan'"),
    ('train.batch_size', 0, 'train.batch_size=0 must be a positive multiple'),
    ('data.label_fraction', 0.0, "free.mode='semi_supervised' needs labelled examples"),
    ('data.max_text_length', 8, 'data.max_text_length=8 is too short'),
    ('exits.init', 'copy', "exits.init='copy'"),
    ('eval.confidence', 'margin', "eval.confidence='margin'"),
    ('eval.threshold', float('nan'), 'eval.threshold=nan must be a finite number'),
    ('eval.calibration_reference', 'human', "eval.calibration_reference='human'"),
    ('eval.prefill', 'lazy', "eval.prefill='lazy'"),
    ('eval.max_new_tokens', 0, 'eval.max_new_tokens=0 must be an integer >= 1'),
])
def test_config_errors_are_one_line_and_raised_before_compiling(field, value, message, tmp_path):
  config = vqa.get_config('smoke')
  section, name = field.split('.')
  with config.unlocked():
    config[section][name] = value
  start = time.time()
  with pytest.raises(ValueError, match=message) as error:
    pipeline.train_and_evaluate(config, str(tmp_path / 'run'))
  assert time.time() - start < 10 and '\n' not in str(error.value)
  assert not (tmp_path / 'run').exists()


def test_cli_config_error_is_one_line(tmp_path):
  out, _ = _cli(tmp_path / 'run', '--config.exits.layers=(2,9)')
  assert out.returncode != 0
  assert out.stderr.strip().splitlines()[-1].startswith('config error: exits.layers=(2, 9)')
  assert 'Traceback' not in out.stderr and not (tmp_path / 'run').exists()
  out, _ = _cli(tmp_path / 'run', '--config.train.stpes=5')  # a typo'd field: one line with the closest name
  assert out.returncode != 0 and 'Traceback' not in out.stderr
  assert out.stderr.strip().splitlines()[-1] == (
      'config error: --config.train.stpes: no such config field (Did you mean "steps" instead of "stpes"?) '
      '(overrides: --config.train.stpes)')
  out, _ = _cli(tmp_path / 'run', '--config.nonexistent=1')
  assert out.stderr.strip().splitlines()[-1] == (
      'config error: --config.nonexistent: no such config field (overrides: --config.nonexistent)')
  out, _ = _cli(tmp_path / 'run', '--config.train.steps=-5')  # the field itself, not the warmup it breaks
  assert out.stderr.strip().splitlines()[-1] == 'config error: train.steps=-5 must be >= 1'
  assert not (tmp_path / 'run').exists()
