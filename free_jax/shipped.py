"""The embedded backbone shipped with the project: recorded when it is made, checked whenever it is used.

The default configs read the BLIP-2 in ``assets/sort_of_clevr_blip2`` (`configs.SHIPPED_BACKBONE`): an
HF-format directory (config.json, model.safetensors, tokenizer and image-processor files) written by
`ship` from a finished embedded run (``workdir/backbone/hf``, `free_jax.export`). `ship` also writes

  made_by.json          the command and commit that trained it, its training settings, the sha256 of every
                        file, the params' fingerprint (`exits_io.fingerprint`: what exits are tied to) and
                        the run's per-type test accuracy of every layer, when the run was evaluated;
  training_curves.png   answer/caption loss and the grounding loss over the backbone's steps.

`verify` recomputes the hashes: a shipped file that was changed by hand (or damaged) is refused by name
before anything is trained on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from free_jax.models.hf_tensors import read_json

RECORD_FILE = 'made_by.json'
CURVES_FILE = 'training_curves.png'
_NOT_HASHED = (RECORD_FILE, CURVES_FILE)


def file_hashes(directory: str) -> dict[str, str]:
  """sha256 of every file of the shipped directory (the record and the plot excluded)."""
  hashes = {}
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if name in _NOT_HASHED or not os.path.isfile(path):
      continue
    with open(path, 'rb') as f:
      hashes[name] = hashlib.sha256(f.read()).hexdigest()
  return hashes


def verify(directory: str) -> dict:
  """The record of a shipped backbone whose files are exactly the ones recorded; else a one-line ValueError."""
  record_path = os.path.join(directory, RECORD_FILE)
  if not os.path.isfile(record_path):
    raise ValueError(f'{record_path} is missing: {directory} is not a shipped backbone (experiments/ship_backbone.py)')
  record = read_json(record_path)
  actual = file_hashes(directory)
  for name, digest in record['files'].items():
    if name not in actual:
      raise ValueError(f'{os.path.join(directory, name)} is missing from the shipped backbone')
    if actual[name] != digest:
      raise ValueError(f'{os.path.join(directory, name)} differs from the shipped file (sha256 {actual[name][:12]}, '
                       f'recorded {digest[:12]}): restore it with git checkout')
  extra = sorted(set(actual) - set(record['files']))
  if extra:
    raise ValueError(f'{os.path.join(directory, extra[0])} is not part of the shipped backbone')
  return record


def commit() -> str:
  """The checkout's commit (with '+' if the tree has uncommitted changes to tracked files), or 'unknown'."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True, check=True,
                          cwd=root).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], capture_output=True, text=True,
                           check=True, cwd=root).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'
  return head + ('+' if dirty else '')


def plot_curves(records: list[dict], path: str, caption_every: int) -> str:
  """The backbone's losses over its steps (task and caption steps apart: they alternate)."""
  fig = Figure(figsize=(6.5, 4))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  caption = [r for r in records if caption_every and r['step'] % caption_every == 0]
  task = [r for r in records if r not in caption]
  for rows, key, label in ((task, 'loss', 'answer CE (task steps)'), (caption, 'loss', 'caption CE (caption steps)'),
                           (records, 'grounding', 'grounding loss')):
    rows = [r for r in rows if key in r]
    if rows:
      ax.plot([r['step'] for r in rows], [r[key] for r in rows], label=label, linewidth=1)
  ax.set_yscale('log')
  ax.set_xlabel('backbone step')
  ax.set_ylabel('loss')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


def ship(workdir: str, out_dir: str, command: str, overwrite: bool = False) -> dict:
  """Copies a finished embedded run's backbone into `out_dir` with its record (module docstring).

  Args:
    workdir: a run of experiments/train.py with ``model.source='embedded'`` (its backbone is finished).
    out_dir: where the shipped directory goes (e.g. `configs.SHIPPED_BACKBONE`).
    command: the exact command that trained the run (recorded).
    overwrite: replace an existing `out_dir`; without it an existing one is refused (nothing is lost).
  """
  from free_jax import exits_io, weights  # pylint: disable=g-import-not-at-top  (lazy: transformers)
  from free_jax.training import logging as metrics_logging  # pylint: disable=g-import-not-at-top

  source = os.path.join(workdir, 'backbone', 'hf')
  if not os.path.isfile(os.path.join(source, 'config.json')):
    raise ValueError(f'{source} holds no exported backbone: the embedded backbone of {workdir} is not finished')
  if os.path.exists(out_dir) and not overwrite:
    raise ValueError(f'{out_dir} exists: pass overwrite=True (--overwrite) to replace the shipped backbone')
  config = read_json(os.path.join(workdir, 'config.json'))
  if config['model']['source'] != 'embedded':
    raise ValueError(f"{workdir} did not train its backbone (model.source={config['model']['source']!r})")
  _, params = weights.load_pretrained(source)
  record = {'command': command, 'commit': commit(), 'fingerprint': exits_io.fingerprint(params),
            'model': config['model']['embedded'], 'backbone_train': config['backbone_train'],
            'data': {k: config['data'][k] for k in ('source', 'task', 'seed', 'max_text_length')},
            'seed': config['seed']}
  summary_path = os.path.join(workdir, 'eval', 'summary.json')
  if os.path.isfile(summary_path):
    summary = read_json(summary_path)
    record['test'] = {'quality_full': summary['quality_full'], 'per_type': summary.get('per_type', {}),
                      'per_layer_quality_naive': summary['per_layer_quality_naive'],
                      'num_test': summary['num_test'], 'test_seed': summary['test_seed']}
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(dir=parent, prefix='.shipping-')
  try:
    for name in os.listdir(source):
      shutil.copy2(os.path.join(source, name), staging)
    record['files'] = file_hashes(staging)
    plot_curves(metrics_logging.read_metrics(os.path.join(workdir, 'backbone')), os.path.join(staging, CURVES_FILE),
                config['backbone_train']['caption_every'])
    with open(os.path.join(staging, RECORD_FILE), 'w') as f:
      json.dump(record, f, indent=1, sort_keys=True)
    os.chmod(staging, 0o755)  # mkdtemp makes it private; the shipped files are for everyone to read
    for name in os.listdir(staging):
      os.chmod(os.path.join(staging, name), 0o644)
    if os.path.exists(out_dir):
      old = tempfile.mkdtemp(dir=parent, prefix='.replaced-')
      os.replace(out_dir, os.path.join(old, 'backbone'))
      os.replace(staging, out_dir)
      shutil.rmtree(old)
    else:
      os.replace(staging, out_dir)
  finally:
    if os.path.exists(staging):
      shutil.rmtree(staging)
  return record
