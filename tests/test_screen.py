"""The recipe screen end to end on the smoke backbone: variants against their controls, curves, paired tests,
shared controls, resume."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from experiments.configs import vqa
from free_jax import screen
from tests.conftest import ROOT

VARIANTS = ('free', 'random_init', 'kd')


@pytest.fixture(scope='module')
def screened(smoke_run, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('screen')
  shutil.copytree(smoke_run[0] / 'backbone', workdir / 'backbone')  # the same config: the stage is skipped
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT))
  out = subprocess.run([sys.executable, 'experiments/screen.py', '--config=experiments/configs/vqa.py:smoke',
                        f'--workdir={workdir}', f'--out={workdir / "results"}', f'--variants={",".join(VARIANTS)}',
                        '--label_fractions=0.5', '--steps=4', '--validate_every=2'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir


def test_every_variant_is_paired_with_its_control_and_written(screened):
  rows = json.loads((screened / 'results' / screen.JSON_FILE).read_text())
  assert [(r['variant'], r['label_fraction']) for r in rows] == [('free', 0.5), ('random_init', 0.5), ('kd', 0.0)]
  by = {r['variant']: r for r in rows}
  assert by['kd']['mode'] == 'unsupervised_kd' and by['kd']['control_mode'] == 'kd_only'
  # A control takes the variant's change where it touches CE training (the exits' init), not the game's.
  assert by['free']['controls'] != by['random_init']['controls']
  for r in rows:
    assert r['exit_names'] == ['exit1', 'exit2'] and r['steps'] == 4
    for name in r['exit_names']:
      test = r['paired'][name]
      assert 0 <= test['p_value'] <= 1 and test['low'] <= test['diff'] <= test['high']
      assert test['diff'] == pytest.approx(r['answer_acc'][name] - r['control_answer_acc'][name])
  md = (screened / 'results' / screen.MARKDOWN_FILE).read_text()
  assert '## 50% labels' in md and '## no labels' in md and '| random_init: ' in md
  for name in ('curves_labels50.png', 'curves_labels0.png'):
    assert (screened / 'results' / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_a_run_logs_its_learning_curve_and_its_test_answers(screened):
  rows = json.loads((screened / 'results' / screen.JSON_FILE).read_text())
  run_dir = screened / screen.SCREEN_DIR / rows[0]['runs'][0]
  record = json.loads((run_dir / screen.RECORD_FILE).read_text())
  assert [p['step'] for p in record['curve']] == [2, 4]
  assert set(record['curve'][0]) >= {'val/exit1/answer_acc', 'val/exit2/token_acc', 'val/backbone/answer_acc'}
  with np.load(run_dir / screen.RIGHT_FILE) as f:
    right = f['right']
  assert right.shape == (3, record['num_test']) and right.dtype == bool
  assert record['test_answer_acc']['exit1'] == pytest.approx(right[0].mean())


def test_a_rerun_reuses_every_finished_run(screened):
  config = vqa.get_config('smoke')
  plan = screen.Screen(variants=VARIANTS, label_fractions=(0.5,), steps=4, validate_every=2)
  records = {p: p.stat().st_mtime_ns for p in (screened / screen.SCREEN_DIR).rglob(screen.RECORD_FILE)}
  assert len(records) == 6  # three variants and three controls
  rows = screen.run_screen(config, str(screened), plan)
  assert {p: p.stat().st_mtime_ns for p in (screened / screen.SCREEN_DIR).rglob(screen.RECORD_FILE)} == records
  assert [r['variant'] for r in rows] == list(VARIANTS)


def test_bad_screens_are_refused_before_any_training():
  config = vqa.get_config('smoke')
  with pytest.raises(ValueError, match="unknown variant 'adv9'"):
    screen.validate(config, screen.Screen(variants=('adv9',)))
  with pytest.raises(ValueError, match=r'label_fractions=\(0.0,\)'):
    screen.validate(config, screen.Screen(variants=('free',), label_fractions=(0.0,)))
