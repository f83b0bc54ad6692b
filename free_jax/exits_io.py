"""Trained exits on disk: safetensors + a small JSON, an adapter to share on top of a BLIP-2 checkpoint.

A directory written by `save_exits` holds

* ``exits.safetensors``: the exit params (`free_jax.exits`), one tensor per leaf, named by its tree path
  (``layers/self_attn/q_proj/kernel``, leading axis = exit), float32;
* ``exits.json``: `ExitsMeta` (exit layers, the backbone's fingerprint, its LM family and depth, the
  calibrated threshold and confidence, the chosen speculative setting, the training config).

`load_exits` refuses a directory whose files disagree with each other, and `check_backbone` refuses
exits made for another backbone, each with a one-line error naming both sides. Writes go to a
temporary sibling that is renamed into place, so a failed save never leaves exits that load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any

import jax
import numpy as np
import safetensors.numpy

from free_jax import exits as exits_lib
from free_jax import owned_dir
from free_jax.models.hf_tensors import read_json

PyTree = Any
FORMAT = 'free_jax.exits/1'
TENSORS_FILE = 'exits.safetensors'
META_FILE = 'exits.json'


class ExitsMismatchError(ValueError):
  """Exits that do not belong to the backbone (or decoder) they are used with."""


@dataclasses.dataclass(frozen=True)
class ExitsMeta:
  """What travels with the exit params.

  Attributes:
    exit_layers: exit e reads the hidden state after this many LM layers.
    num_layers: the backbone LM's depth L.
    family: 'opt' or 't5'.
    backbone_fingerprint: `fingerprint` of the backbone params the exits were trained on.
    threshold: the calibrated confidence threshold (None before calibration).
    confidence: the confidence measure the threshold is for (`free_jax.inference.confidence`).
    speculative: {'draft_exit', 'max_draft'} chosen by the evaluation, or None.
    decoding: `free_jax.EarlyExitVLM` settings the threshold was calibrated with ({'prefill',
      'propagation', 'max_new_tokens'}); empty = the defaults.
    training: the run's resolved config without ``eval`` (how the exits were trained).
    digest: `fingerprint` of the exit params themselves and their placement (ties derived files to them;
      `load_exits` checks it, so an edited ``exit_layers`` is refused).
    task: 'vqa' or 'caption', what the exits were trained and calibrated for (None: not recorded).
  """

  exit_layers: tuple[int, ...]
  num_layers: int
  family: str
  backbone_fingerprint: str
  threshold: float | None = None
  confidence: str = 'max_prob'
  speculative: dict | None = None
  decoding: dict = dataclasses.field(default_factory=dict)
  training: dict = dataclasses.field(default_factory=dict)
  digest: str = ''
  task: str | None = None

  def to_json(self) -> dict:
    return {'format': FORMAT, **dataclasses.asdict(self), 'exit_layers': list(self.exit_layers)}

  @classmethod
  def from_json(cls, raw: dict, where: str) -> 'ExitsMeta':
    if raw.get('format') != FORMAT:
      raise ValueError(f'{where}: format={raw.get("format")!r}, expected {FORMAT!r}')
    fields = {f.name for f in dataclasses.fields(cls)}
    missing = sorted(f for f in ('exit_layers', 'num_layers', 'family', 'backbone_fingerprint') if f not in raw)
    if missing:
      raise ValueError(f'{where}: missing field {missing[0]!r}')
    meta = cls(**{k: v for k, v in raw.items() if k in fields})
    return dataclasses.replace(meta, exit_layers=tuple(int(l) for l in meta.exit_layers))


def fingerprint(params: PyTree) -> str:
  """16 hex digits of sha256 over every leaf (path, shape, float32 bytes) of a backbone's params, and over the
  layers exit params are placed after (`exits.with_placement`) when they record them.

  Independent of how the params are sharded or stored; params cast to another dtype are other weights.
  """
  digest = hashlib.sha256()
  layers = exits_lib.placement(params) if isinstance(params, dict) else None
  if layers is not None:
    digest.update(f'placement{list(layers)}'.encode())
  for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params), key=lambda p: jax.tree_util.keystr(p[0])):
    value = np.ascontiguousarray(np.asarray(jax.device_get(leaf), np.float32))
    digest.update(f'{jax.tree_util.keystr(path)}{value.shape}'.encode())
    digest.update(value.tobytes())
  return digest.hexdigest()[:16]


def saved_digest(directory) -> str | None:
  """The digest recorded in a `save_exits` directory (None if it holds no readable exits.json)."""
  try:
    return json.loads((pathlib.Path(directory) / META_FILE).read_text()).get('digest')
  except (OSError, ValueError):
    return None


def _flatten(tree: PyTree, prefix: str = '') -> dict[str, np.ndarray]:
  if isinstance(tree, exits_lib.Placement):  # recorded in exits.json (exit_layers)
    return {}
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f'{prefix}{key}/'))
    return out
  return {prefix[:-1]: np.asarray(jax.device_get(tree), np.float32)}


def _unflatten(flat: dict[str, np.ndarray]) -> PyTree:
  tree: dict = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split('/')
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


EXITS_OUTPUT = owned_dir.Output('exits', META_FILE, (META_FILE, TENSORS_FILE))


def save_exits(directory, exit_params: PyTree, meta: ExitsMeta, overwrite: bool = False) -> pathlib.Path:
  """Writes exit params (stacked form, `exits.init_exit_params`) and `meta` to `directory` atomically.

  Raises FileExistsError (one line) when `directory` already holds exits and not `overwrite`, and always when it
  holds anything else (`owned_dir`: a workdir, a folder of other files, the current directory).
  """
  num = jax.tree.leaves(exit_params['layers'])[0].shape[0]
  if num != len(meta.exit_layers):
    raise ValueError(f'exit_params hold {num} exits but meta.exit_layers={meta.exit_layers}')

  def write(tmp: pathlib.Path) -> None:
    safetensors.numpy.save_file(_flatten(exit_params), str(tmp / TENSORS_FILE), metadata={'format': FORMAT})
    (tmp / META_FILE).write_text(json.dumps(meta.to_json(), indent=1, sort_keys=True))

  return owned_dir.write_directory(directory, EXITS_OUTPUT, write, overwrite)


def load_exits(directory) -> tuple[PyTree, ExitsMeta]:
  """(exit_params float32 numpy tree, `ExitsMeta`) from a `save_exits` directory."""
  directory = pathlib.Path(directory)
  meta_file, tensors_file = directory / META_FILE, directory / TENSORS_FILE
  for f in (meta_file, tensors_file):
    if not f.is_file():
      raise FileNotFoundError(f'{f} not found: not an exits directory (see free_jax.exits_io)')
  meta = ExitsMeta.from_json(read_json(meta_file), str(meta_file))
  try:
    flat = safetensors.numpy.load_file(str(tensors_file))
  except Exception as e:  # safetensors raises its own error types for damaged files
    raise ValueError(f'{tensors_file} is not a readable safetensors file ({e})') from None
  params = _unflatten(flat)
  if 'layers' not in params:
    raise ValueError(f'{tensors_file}: no layers/* tensors')
  for name, value in flat.items():
    if value.shape[:1] != (len(meta.exit_layers),):
      raise ValueError(f'{tensors_file}: {name} has shape {value.shape}, expected a leading axis of '
                       f'{len(meta.exit_layers)} exits ({META_FILE}: exit_layers={list(meta.exit_layers)})')
    if not np.all(np.isfinite(value)):
      raise ValueError(f'{tensors_file}: {name} holds NaN or inf')
  params = exits_lib.with_placement(params, meta.exit_layers)
  if meta.digest and fingerprint(params) != meta.digest:
    raise ValueError(f'{meta_file}: digest {meta.digest} does not match {TENSORS_FILE} placed after layers '
                     f'{list(meta.exit_layers)} ({fingerprint(params)}): the exits or their placement were changed '
                     'after saving')
  return params, meta


def check_backbone(meta: ExitsMeta, num_layers: int, family: str, backbone_fingerprint: str, where: str) -> None:
  """Refuses exits trained for another backbone: one line naming both sides."""
  if meta.family != family or meta.num_layers != num_layers:
    raise ExitsMismatchError(f'{where}: exits for a {meta.num_layers}-layer {meta.family} LM, the backbone is a '
                             f'{num_layers}-layer {family} LM')
  if meta.backbone_fingerprint != backbone_fingerprint:
    raise ExitsMismatchError(f'{where}: exits trained on backbone {meta.backbone_fingerprint}, this backbone is '
                             f'{backbone_fingerprint}')
