"""Labels the exit stage may not use stay hidden: unlabelled rows are taught on the backbone's own answers.

With ``data.label_fraction < 1`` only the labelled rows' answers (captions) may reach the exit stage. Every
loss of a step is teacher-forced on a whole sequence (prompt + target), so an unlabelled row still needs a
target: it is the frozen backbone's own greedy output for that row (what a deployed model would produce
without labels), decoded once at full depth and cached with the run. The adversarial term, KD and
pseudo-label targets of those rows then see states conditioned only on what the backbone said; the ground
truth of an unlabelled row is removed from the examples before any batch is built.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import tqdm

from free_jax.backbone import Backbone
from free_jax.data import batching
from free_jax.data import tokenizer as tokenizer_lib
from free_jax.inference.early_exit import EarlyExitDecoder
from free_jax.models import blip2

TARGETS_FILE = 'exit_targets.npz'
_LABEL_COLUMNS = {'vqa': ('answer', 'answers'), 'caption': ('caption', 'captions')}


def greedy_targets(backbone: Backbone, examples: dict, task: str, batch_size: int = 64) -> list[list[int]]:
  """The backbone's full-depth greedy target of every row: ids up to and including its first EOS.

  At most ``fmt.target_length`` ids, like a tokenised label (`batching.train_batch`): a row that reaches
  that length without an EOS ends with one in its last place, as a truncated label does.
  """
  fmt, tok = backbone.fmt, backbone.tokenizer
  stack = blip2.lm_stack(backbone.model.config, backbone.model.dtype)
  decoder = EarlyExitDecoder(stack, (), max_new_tokens=fmt.target_length, eos_token_id=fmt.eos_id,
                             pad_token_id=fmt.pad_id)
  lm_params, _ = decoder.prepare(backbone.params['language_model'], None)
  inputs = jax.jit(lambda p, image, ids, mask: backbone.model.apply({'params': p}, image, ids, mask,
                                                                   method='decoder_inputs'))
  targets = []
  chunks = batching.iterate_batches(examples, batch_size, 0, shuffle=False, num_epochs=1, drop_remainder=False)
  total = -(-batching.num_rows(examples) // batch_size)
  for chunk in tqdm.tqdm(chunks, total=total, desc='backbone targets of unlabelled rows', unit='batch',
                         dynamic_ncols=True):
    batch = batching.generation_batch(chunk, tok, fmt, task)
    prompt, valid, encoder = inputs(backbone.params, batch['image'], batch['input_ids'], batch['attention_mask'])
    tokens = np.asarray(decoder(lm_params, None, prompt, np.asarray(valid), encoder=encoder).tokens)
    for row in tokens[batch['valid']].tolist():
      row = row[:row.index(fmt.eos_id)] if fmt.eos_id in row else row
      targets.append(row[:fmt.target_length - 1] + [fmt.eos_id])
  return targets


def hide_labels(examples: dict, labelled: np.ndarray, backbone_targets: dict[int, list[int]], task: str,
                tokenizer) -> dict:
  """The examples as the exit stage may see them.

  Args:
    examples: columns (`free_jax.data.sources`), N rows.
    labelled: bool[N], the rows whose labels the run may use (`batching.label_subset`).
    backbone_targets: row -> the backbone's target ids (`greedy_targets`), for every unlabelled row.
    task: 'vqa' or 'caption'.
    tokenizer: decodes those ids into the text columns.

  Returns:
    A copy with 'labelled', 'target_ids' (the backbone's ids for unlabelled rows, None for labelled ones:
    `batching.train_batch` tokenises their text) and, in unlabelled rows, every label column (answer(s),
    caption(s)) replaced by the text of the backbone's output: no ground truth of those rows is left.
  """
  n = batching.num_rows(examples)
  labelled = np.asarray(labelled, bool)
  if labelled.shape != (n,):
    raise ValueError(f'labelled must be bool[{n}], got shape {labelled.shape}')
  hidden = np.flatnonzero(~labelled)
  missing = sorted(set(hidden.tolist()) - set(backbone_targets))
  if missing:
    raise ValueError(f'no backbone target for {len(missing)} unlabelled rows (first: {missing[0]})')
  out = dict(examples, labelled=labelled, target_ids=[None] * n)
  texts = tokenizer_lib.decode(tokenizer, [backbone_targets[int(i)] for i in hidden]) if hidden.size else []
  for column in _LABEL_COLUMNS[task]:
    if column in out:
      out[column] = list(out[column])
  for i, text in zip(hidden, texts):
    out['target_ids'][i] = list(backbone_targets[int(i)])
    for column in _LABEL_COLUMNS[task]:
      if column in out:
        out[column][i] = text if column in ('answer', 'caption') else [text]
  return out


def exit_stage_examples(workdir: str, backbone: Backbone, examples: dict, labelled: np.ndarray, task: str,
                        made_from: dict) -> dict:
  """`hide_labels` with the backbone's targets cached in ``workdir/exit_targets.npz``.

  The cache is reused only if it was made from the same `made_from` (the data settings) and the same
  backbone weights; otherwise the targets are decoded again and the file replaced atomically.
  """
  path = os.path.join(workdir, TARGETS_FILE)
  hidden = np.flatnonzero(~np.asarray(labelled, bool))
  key = json.dumps(dict(made_from, backbone=backbone.fingerprint,
                        target_length=backbone.fmt.target_length), sort_keys=True)
  targets = None
  if os.path.exists(path):
    with np.load(path) as cached:
      if str(cached['made_from']) == key and np.array_equal(cached['rows'], hidden):
        targets = {int(r): ids[:n].tolist() for r, ids, n in zip(cached['rows'], cached['ids'], cached['lengths'])}
  if targets is None:
    decoded = greedy_targets(backbone, batching.take(examples, hidden), task) if hidden.size else []
    targets = dict(zip(hidden.tolist(), decoded))
    if jax.process_index() == 0:
      os.makedirs(workdir, exist_ok=True)
      ids = np.zeros((hidden.size, backbone.fmt.target_length), np.int32)
      for k, row in enumerate(decoded):
        ids[k, :len(row)] = row
      tmp = path + '.tmp.npz'
      np.savez(tmp, made_from=np.asarray(key), rows=hidden, ids=ids,
               lengths=np.asarray([len(r) for r in decoded], np.int32))
      os.replace(tmp, path)
  return hide_labels(examples, labelled, targets, task, backbone.tokenizer)
