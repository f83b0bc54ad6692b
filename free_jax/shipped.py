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
import pathlib
import shutil
import subprocess

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from free_jax import owned_dir
from free_jax.models.hf_tensors import HF_CHECKPOINT_PATTERNS, read_json

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


LM_DTYPES = ('float32', 'bfloat16')
SHIPPED_OUTPUT = owned_dir.Output('a shipped backbone', RECORD_FILE, (*HF_CHECKPOINT_PATTERNS, CURVES_FILE))


def _stored_lm(params: dict, lm_dtype: str) -> dict:
  """The params with the language model (and its input projection) in `lm_dtype`: what the shipped file holds."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  cast = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, lm_dtype), tree)
  return dict(params, language_model=cast(params['language_model']),
              language_projection=cast(params['language_projection']))


def _test_record(evaluated_by: str, fingerprint: str) -> dict | None:
  """The test figures of a run whose exits were trained on exactly the shipped weights (None without one)."""
  from free_jax import exits_io  # pylint: disable=g-import-not-at-top
  summary_path = os.path.join(evaluated_by, 'eval', 'summary.json')
  meta_path = os.path.join(evaluated_by, 'exits')
  if not os.path.isfile(summary_path) or not os.path.isdir(meta_path):
    return None
  _, meta = exits_io.load_exits(meta_path)
  if meta.backbone_fingerprint != fingerprint:
    return None  # evaluated on other weights (e.g. float32 before a bfloat16 ship): not this backbone's figures
  summary = read_json(summary_path)
  return {'quality_full': summary['quality_full'], 'per_type': summary.get('per_type', {}),
          'per_layer_quality_naive': summary['per_layer_quality_naive'], 'num_test': summary['num_test'],
          'test_seed': summary['test_seed'], 'evaluated_by': os.path.basename(os.path.abspath(evaluated_by))}


def ship(workdir: str, out_dir: str, command: str, overwrite: bool = False, lm_dtype: str = 'float32',
         evaluated_by: str | None = None) -> dict:
  """Writes a finished embedded run's backbone into `out_dir` with its record (module docstring).

  Args:
    workdir: a run of experiments/train.py with ``model.source='embedded'`` (its backbone is finished).
    out_dir: where the shipped directory goes (e.g. `configs.SHIPPED_BACKBONE`).
    command: the exact command that trained the run (recorded).
    overwrite: replace an existing `out_dir`; without it an existing one is refused (nothing is lost).
    lm_dtype: the stored dtype of the language model's weights ('bfloat16' halves the file; the vision
      encoder and Q-Former stay float32). Runs on the shipped backbone compute with the stored values.
    evaluated_by: a finished train.py run whose ``eval/summary.json`` gives the record's test figures; used
      only if its exits were trained on exactly the shipped weights (default `workdir`, which qualifies when
      nothing is cast). A bfloat16 ship is evaluated by a run on the shipped directory, then shipped again.
  """
  from free_jax import exits_io, export, weights  # pylint: disable=g-import-not-at-top  (lazy: transformers)
  from free_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from free_jax.training import logging as metrics_logging  # pylint: disable=g-import-not-at-top

  source = os.path.join(workdir, 'backbone', 'hf')
  if not os.path.isfile(os.path.join(source, 'config.json')):
    raise ValueError(f'{source} holds no exported backbone: the embedded backbone of {workdir} is not finished')
  if os.path.exists(out_dir) and not overwrite:
    raise ValueError(f'{out_dir} exists: pass overwrite=True (--overwrite) to replace the shipped backbone')
  if lm_dtype not in LM_DTYPES:
    raise ValueError(f'lm_dtype={lm_dtype!r}; expected one of {LM_DTYPES}')
  config = read_json(os.path.join(workdir, 'config.json'))
  if config['model']['source'] != 'embedded':
    raise ValueError(f"{workdir} did not train its backbone (model.source={config['model']['source']!r})")
  model, params = weights.load_pretrained(source)
  if lm_dtype != 'float32':
    params = _stored_lm(params, lm_dtype)
  fingerprint = exits_io.fingerprint(params)  # float32 bytes: equal to the stored weights read back
  record = {'command': command, 'commit': commit(), 'fingerprint': fingerprint, 'lm_dtype': lm_dtype,
            'model': config['model']['embedded'], 'backbone_train': config['backbone_train'],
            'data': {k: config['data'][k] for k in ('source', 'task', 'seed', 'max_text_length')},
            'seed': config['seed']}
  test = _test_record(evaluated_by or workdir, fingerprint)
  if test is not None:
    record['test'] = test
  def write(staging: pathlib.Path) -> None:
    if lm_dtype == 'float32':
      for name in os.listdir(source):
        shutil.copy2(os.path.join(source, name), staging)
    else:
      exported = export.save_pretrained(model, params, staging / 'export', tokenizer_lib.load_tokenizer(source))
      for name in os.listdir(exported):
        os.replace(exported / name, staging / name)
      os.rmdir(exported)
    record['files'] = file_hashes(str(staging))
    plot_curves(metrics_logging.read_metrics(os.path.join(workdir, 'backbone')), str(staging / CURVES_FILE),
                config['backbone_train']['caption_every'])
    (staging / RECORD_FILE).write_text(json.dumps(record, indent=1, sort_keys=True))

  owned_dir.write_directory(out_dir, SHIPPED_OUTPUT, write, overwrite)
  return record
