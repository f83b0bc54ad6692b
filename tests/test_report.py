"""`make report` on the smoke configs: every section written with its commit; the same command twice gives the
same train_eval.json."""

import os
import shutil
import subprocess
import sys

from free_jax import report, shipped
from free_jax.training import pipeline
from tests.conftest import ROOT

SMOKE = ('--config=experiments/configs/vqa.py:smoke', '--caption_config=experiments/configs/caption.py:smoke',
         '--study_config=experiments/configs/vqa.py:smoke', '--grid=smoke')


def test_report_regenerates_docs_readme_and_is_deterministic(smoke_run, smoke_study, tmp_path):
  workdir = tmp_path / 'runs'
  # The study rows of the same smoke grid are reused (`reproduce.run_study` keeps finished rows); the two
  # runs are trained from scratch.
  shutil.copytree(smoke_study / 'reproduce', workdir / 'study' / 'reproduce')
  readme = tmp_path / 'README.md'
  readme.write_text(f'# title\n\nbefore\n{report.BEGIN}\nstale figures\n{report.END}\nafter\n')
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT))
  out = subprocess.run([sys.executable, 'experiments/report.py', *SMOKE, '--seeds=0', f'--workdir={workdir}',
                        f'--docs={tmp_path / "docs"}', f'--results={tmp_path / "results"}', f'--readme={readme}'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
  assert out.returncode == 0, out.stderr[-3000:]

  # The same command as the smoke_run fixture's, run again from scratch: the same file, byte for byte.
  assert ((workdir / 'vqa' / pipeline.EVAL_FILE).read_bytes()
          == (smoke_run[0] / pipeline.EVAL_FILE).read_bytes())
  text = readme.read_text()
  assert text.startswith('# title\n\nbefore\n') and text.endswith('after\n') and 'stale' not in text
  assert f'at commit {shipped.commit()}' in text and '| default VQA (exact match) |' in text
  results = (tmp_path / 'docs' / report.RESULTS_FILE).read_text()
  for section in ('## Default VQA run', '## Caption run', '## Reproduction study', '| question type |'):
    assert section in results, section
  for png in ('vqa_per_type_per_layer.png', 'vqa_quality_vs_speedup.png', 'caption_modes.png'):
    assert (tmp_path / 'docs' / report.FIGURES_DIR / png).stat().st_size > 0
  assert (tmp_path / 'results' / 'reproduction.md').exists()


def test_a_readme_without_the_section_is_refused_before_any_run(tmp_path):
  readme = tmp_path / 'README.md'
  readme.write_text('# no markers\n')
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT))
  out = subprocess.run([sys.executable, 'experiments/report.py', *SMOKE, f'--workdir={tmp_path / "w"}',
                        f'--readme={readme}'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1 and out.stderr.strip().splitlines()[-1] == (
      f'error: {readme} has no {report.BEGIN} ... {report.END} section to regenerate')
  assert not (tmp_path / 'w').exists()


def test_distinct_thresholds_stay_distinct_in_the_tables():
  texts = report.format_distinct([1.0, 0.999, 0.998, 0.995, 0.9, 0.5])
  assert texts == ['1.000', '0.999', '0.998', '0.995', '0.900', '0.500']
  assert report.format_distinct([0.5, 0.25]) == ['0.50', '0.25']
  assert report.format_distinct([0.5, 0.5]) == ['0.50', '0.50']  # equal values may print alike
