"""The Colab TPU notebook runs top to bottom on CPU in smoke mode, with this venv's Python as its kernel."""

import json
import pathlib
import sys
import time

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / 'experiments' / 'notebooks' / 'free_jax_colab_tpu.ipynb'
KERNEL = 'free-jax-test'


def _texts(cell) -> str:
  parts = []
  for out in cell.get('outputs', []):
    parts.append(out.get('text', ''))
    data = out.get('data', {})
    parts.append(data.get('text/markdown', '') + data.get('text/plain', ''))
  return ''.join(parts)


def test_notebook_runs_in_smoke_mode(tmp_path, monkeypatch):
  # A private kernelspec pointing at this interpreter; global kernelspecs and ~/.jupyter are left alone.
  spec = tmp_path / 'jupyter' / 'kernels' / KERNEL
  spec.mkdir(parents=True)
  (spec / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
      'display_name': 'free_jax test', 'language': 'python'}))
  for name, value in (('JUPYTER_PATH', tmp_path / 'jupyter'), ('JUPYTER_RUNTIME_DIR', tmp_path / 'runtime'),
                      ('IPYTHONDIR', tmp_path / 'ipython'), ('FREE_JAX_NOTEBOOK_SMOKE', '1'),
                      ('JAX_PLATFORMS', 'cpu'), ('MPLBACKEND', 'Agg')):
    monkeypatch.setenv(name, str(value))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  start = time.time()
  NotebookClient(nb, kernel_name=KERNEL, timeout=600, resources={'metadata': {'path': str(ROOT)}}).execute()
  print(f'\nnotebook (smoke) ran in {time.time() - start:.1f} s')

  code = [c for c in nb.cells if c.cell_type == 'code']
  outputs = '\n'.join(_texts(c) for c in code)
  assert 'smoke True' in outputs
  assert 'CpuDevice' in outputs and "mesh: {'data': 1}" in outputs
  assert 'early exit' in outputs and 'measured decode' in outputs
  assert 'speculative == full greedy: True' in outputs
  table = next(_texts(c) for c in code if '| # | prompt |' in _texts(c))
  assert len([line for line in table.splitlines() if line.startswith('| ') and line[2].isdigit()]) == 4
  assert '(' in table.splitlines()[-1]  # every generated token shows its exit layer
  pngs = [o for c in code for o in c.get('outputs', []) if 'image/png' in o.get('data', {})]
  assert len(pngs) >= 4  # the images figure and the three evaluation plots
  assert not [o for c in code for o in c.get('outputs', []) if o.get('output_type') == 'error']
