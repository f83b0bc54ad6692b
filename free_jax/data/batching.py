"""Examples -> fixed-shape BLIP-2 model batches; deterministic, resumable shuffling; device splits.

Examples are dicts of columns (numpy arrays, lists of strings, nested dicts): `image` uint8[N, H, W, 3],
`question`, `answer`, `caption`, optionally `labelled` bool[N] (see `label_subset`) and `target_ids` (per row,
ids that replace the tokenised target, or None).

Layouts (Q = num_query_tokens, P = prompt_length, A = target_length; `I` = image token). As in
transformers 5's `Blip2Processor`, `input_ids` start with Q image tokens, followed by the tokenizer's
own encoding of the prompt (OPT: `</s>` BOS first; Flan-T5: `</s>` EOS last). Pads in the middle of a
row (left-padded prompts) are harmless: OPT positions come from the attention mask, as in HF.

  OPT train       input_ids [I]*Q [BOS prompt target EOS] [pad ...]       int[B, Q + P + A], right-padded
                  labels[:, t] = input_ids[:, t + 1] where that is a target/EOS token, else pad;
                  loss_mask[:, t] = 1 there. Labels are PRE-SHIFTED: the loss is
                  CE(logits[:, t], labels[:, t]) * loss_mask[:, t] — do not shift again (unlike HF labels).
  OPT generate    input_ids [I]*Q [pad ...] [BOS prompt]                  int[B, Q + P], left-padded
  T5 train        input_ids [I]*Q [prompt EOS] [pad ...]                  int[B, Q + P]
                  labels [target EOS pad ...], decoder_input_ids = HF shift-right of labels (starts with
                  decoder_start_id), decoder_attention_mask = loss_mask = 1 on target/EOS: int[B, A].
  T5 generate     the same encoder inputs; decoding starts from decoder_start_id.

Every batch also has `image` float32[B, S, S, 3] (`preprocess.preprocess_images`), `labelled` and
`valid` bool[B] (`valid` is False on rows padding the last batch of a non-dropping pass).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

from free_jax.data import preprocess

FAMILIES = ('opt', 't5')
IMAGE_TOKEN = '<image>'  # what `Blip2Processor` adds to a tokenizer lacking one.
PROMPTS = {
    ('opt', 'vqa'): 'Question: {question} Answer:',
    ('t5', 'vqa'): 'Question: {question} Short answer:',  # BLIP-2 Flan-T5 VQA format.
    ('opt', 'caption'): 'a photo of',
    ('t5', 'caption'): 'A short image caption:',
}


@dataclasses.dataclass(frozen=True)
class InputFormat:
  """How examples become model inputs for one LM family (token ids from the tokenizer/config)."""

  family: str
  num_query_tokens: int
  image_token_id: int
  pad_id: int
  eos_id: int
  decoder_start_id: int  # T5 only; HF Flan-T5 uses the pad id.
  prompt_length: int  # P: prompt tokens including the tokenizer's special tokens.
  target_length: int  # A: target tokens including EOS.
  image_size: int
  image_kwargs: dict = dataclasses.field(default_factory=dict)  # `preprocess_images` extras.


def input_format(tokenizer: PreTrainedTokenizerBase, family: str, num_query_tokens: int,
                 prompt_length: int, target_length: int, image_size: int,
                 image_token_id: int | None = None, decoder_start_id: int | None = None,
                 **image_kwargs) -> InputFormat:
  """An `InputFormat` with special ids from `tokenizer` (image token: the model config's if given)."""
  if family not in FAMILIES:
    raise ValueError(f'family={family!r}; expected one of {FAMILIES}')
  if image_token_id is None:
    image_token_id = tokenizer.get_vocab().get(IMAGE_TOKEN)
  if image_token_id is None:
    raise ValueError(f'the tokenizer has no {IMAGE_TOKEN} token; pass image_token_id from the model config')
  for name in ('pad_token_id', 'eos_token_id'):
    if getattr(tokenizer, name) is None:
      raise ValueError(f'the tokenizer has no {name}')
  if min(prompt_length, target_length) < 2:
    raise ValueError(f'prompt_length={prompt_length} and target_length={target_length} must be >= 2')
  return InputFormat(family, num_query_tokens, int(image_token_id), tokenizer.pad_token_id,
                     tokenizer.eos_token_id,
                     tokenizer.pad_token_id if decoder_start_id is None else decoder_start_id,
                     prompt_length, target_length, image_size, dict(image_kwargs))


def prompts(family: str, task: str, questions: Sequence[str] | None = None,
            count: int | None = None) -> list[str]:
  """Prompt texts: one per question (vqa) or `count` copies of the caption prompt."""
  template = PROMPTS[family, task]
  if task == 'vqa':
    return [template.format(question=q) for q in questions]
  return [template] * count


def _prompt_texts(family: str, task: str, examples: dict) -> list[str]:
  return prompts(family, task, examples.get('question'), len(examples['image']))


def _target_texts(family: str, task: str, examples: dict) -> list[str]:
  """Answers or captions; OPT targets follow the prompt after a space, as in running text."""
  texts = examples['answer'] if task == 'vqa' else examples['caption']
  return [' ' + t for t in texts] if family == 'opt' else list(texts)


def _encode_prompts(tokenizer, fmt: InputFormat, task: str, examples: dict) -> list[list[int]]:
  """Token ids of each prompt with the tokenizer's own special tokens (truncated to P)."""
  return tokenizer(_prompt_texts(fmt.family, task, examples), truncation=True,
                   max_length=fmt.prompt_length)['input_ids']


def _encode_targets(tokenizer, fmt: InputFormat, task: str, examples: dict) -> list[list[int]]:
  """Target ids + EOS (truncated to A); a row's ``target_ids`` (ids ending in EOS, e.g. the backbone's own
  output for a row whose label is hidden: `free_jax.training.hidden_labels`) are used as they are."""
  ids = tokenizer(_target_texts(fmt.family, task, examples), add_special_tokens=False,
                  truncation=True, max_length=fmt.target_length - 1)['input_ids']
  given = examples.get('target_ids') or [None] * len(ids)
  return [row + [fmt.eos_id] if fixed is None else list(fixed) for row, fixed in zip(ids, given)]


def _pad_rows(rows: list[list[int]], length: int, pad: int,
              left: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(ids, mask) int32[B, length] of variable-length rows, padded on the right (or left)."""
  ids = np.full((len(rows), length), pad, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    span = slice(length - len(row), length) if left else slice(0, len(row))
    ids[i, span], mask[i, span] = row, 1
  return ids, mask


def _common(examples: dict, fmt: InputFormat) -> dict:
  n = len(examples['image'])
  return {
      'image': preprocess.preprocess_images(examples['image'], fmt.image_size, **fmt.image_kwargs),
      'labelled': np.asarray(examples.get('labelled', np.ones(n, bool)), bool),
      'valid': np.asarray(examples.get('valid', np.ones(n, bool)), bool),
  }


def _with_image_tokens(ids: np.ndarray, mask: np.ndarray, fmt: InputFormat) -> tuple[np.ndarray, ...]:
  b = ids.shape[0]
  image = np.full((b, fmt.num_query_tokens), fmt.image_token_id, np.int32)
  return (np.concatenate([image, ids], 1),
          np.concatenate([np.ones_like(image), mask], 1).astype(np.int32))


def train_batch(examples: dict, tokenizer: PreTrainedTokenizerBase, fmt: InputFormat,
                task: str) -> dict[str, np.ndarray]:
  """Teacher-forcing batch (layout in the module docstring); targets are answers or captions."""
  prompt = _encode_prompts(tokenizer, fmt, task, examples)
  target = _encode_targets(tokenizer, fmt, task, examples)
  batch = _common(examples, fmt)
  if fmt.family == 'opt':
    length = fmt.prompt_length + fmt.target_length
    ids, mask = _pad_rows([p + t for p, t in zip(prompt, target)], length, fmt.pad_id)
    is_target, _ = _pad_rows([[0] * len(p) + [1] * len(t) for p, t in zip(prompt, target)], length, 0)
    ids, mask = _with_image_tokens(ids, mask, fmt)
    # Position t predicts token t + 1, so labels and their mask are the ids/flags shifted left by one.
    is_target = np.pad(is_target, ((0, 0), (fmt.num_query_tokens, 0)))
    loss_mask = np.pad(is_target[:, 1:], ((0, 0), (0, 1)))
    labels = np.where(loss_mask == 1, np.pad(ids[:, 1:], ((0, 0), (0, 1))), fmt.pad_id)
    batch.update(input_ids=ids, attention_mask=mask, labels=labels.astype(np.int32),
                 loss_mask=loss_mask.astype(np.float32))
  else:
    ids, mask = _with_image_tokens(*_pad_rows(prompt, fmt.prompt_length, fmt.pad_id), fmt)
    labels, loss_mask = _pad_rows(target, fmt.target_length, fmt.pad_id)
    # HF `_shift_right`: the decoder sees decoder_start, then the labels delayed by one.
    start = np.full((len(target), 1), fmt.decoder_start_id, np.int32)
    batch.update(input_ids=ids, attention_mask=mask,
                 decoder_input_ids=np.concatenate([start, labels[:, :-1]], 1),
                 decoder_attention_mask=loss_mask, labels=labels,
                 loss_mask=loss_mask.astype(np.float32))
  return batch


def generation_batch(examples: dict, tokenizer: PreTrainedTokenizerBase, fmt: InputFormat,
                     task: str) -> dict[str, np.ndarray]:
  """Prompt-only batch for decoding: OPT prompts left-padded, T5 encoder inputs as in training."""
  prompt = _encode_prompts(tokenizer, fmt, task, examples)
  ids, mask = _pad_rows(prompt, fmt.prompt_length, fmt.pad_id, left=fmt.family == 'opt')
  ids, mask = _with_image_tokens(ids, mask, fmt)
  return {**_common(examples, fmt), 'input_ids': ids, 'attention_mask': mask}


def required_lengths(tokenizer: PreTrainedTokenizerBase, family: str, task: str,
                     examples: dict) -> tuple[int, int]:
  """(prompt_length, target_length) that fit every example untruncated (to size an InputFormat)."""
  prompt = tokenizer(_prompt_texts(family, task, examples))['input_ids']
  target = tokenizer(_target_texts(family, task, examples), add_special_tokens=False)['input_ids']
  return max(map(len, prompt)), max(map(len, target)) + 1


def label_subset(num_examples: int, label_fraction: float, seed: int) -> np.ndarray:
  """bool[N] marking round(label_fraction * N) examples, a fixed random subset for the seed."""
  if not 0.0 <= label_fraction <= 1.0:
    raise ValueError(f'label_fraction={label_fraction} must be in [0, 1]')
  chosen = np.random.default_rng(seed).permutation(num_examples)[:round(label_fraction * num_examples)]
  labelled = np.zeros(num_examples, bool)
  labelled[chosen] = True
  return labelled


def _map_columns(tree: dict, fn, path: str = '') -> dict:
  """Applies fn(column, name) to every array/list column of a (nested) example dict."""
  return {k: _map_columns(v, fn, f'{path}{k}.') if isinstance(v, dict) else fn(v, path + k)
          for k, v in tree.items()}


def num_rows(examples: dict) -> int:
  """The common number of rows of all columns; a clear error naming a column that differs."""
  n = None
  def check(column, name):
    nonlocal n
    n = len(column) if n is None else n
    if len(column) != n:
      raise ValueError(f'column {name!r} has {len(column)} rows, expected {n} like the others')
  _map_columns(examples, check)
  return n


def take(examples: dict, indices: np.ndarray) -> dict:
  """Rows `indices` of every column (arrays fancy-indexed, lists gathered)."""
  return _map_columns(examples, lambda v, _: v[indices] if isinstance(v, np.ndarray)
                      else [v[i] for i in indices])


def iterate_batches(examples: dict, batch_size: int, seed: int, start_step: int = 0,
                    shuffle: bool = True, num_epochs: int | None = None,
                    drop_remainder: bool = True) -> Iterator[dict]:
  """Example batches in a per-epoch order fixed by (seed, epoch); resumable at any step.

  Step s is batch s % steps_per_epoch of epoch s // steps_per_epoch, so starting at `start_step`
  yields exactly what an uninterrupted run yields from step `start_step` on. Without
  `drop_remainder` the last batch of an epoch is filled up with its first row and `valid`=False.
  Infinite when `num_epochs` is None.
  """
  n = num_rows(examples)
  steps_per_epoch = n // batch_size if drop_remainder else -(-n // batch_size)
  if steps_per_epoch == 0:
    raise ValueError(f'batch_size={batch_size} exceeds the {n} examples with drop_remainder=True')
  epoch, order = None, None
  step = start_step
  while num_epochs is None or step < num_epochs * steps_per_epoch:
    if step // steps_per_epoch != epoch:
      epoch = step // steps_per_epoch
      rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(epoch,)))
      order = rng.permutation(n) if shuffle else np.arange(n)
    start = (step % steps_per_epoch) * batch_size
    indices = order[start:start + batch_size]
    valid = np.arange(batch_size) < len(indices)
    indices = np.concatenate([indices, np.full(batch_size - len(indices), indices[0])])
    batch = take(examples, indices)
    batch['valid'] = valid & np.asarray(batch.get('valid', True), bool)
    yield batch
    step += 1


def _rows_divisible(value, name: str, parts: int, what: str) -> int:
  if len(value) % parts:
    raise ValueError(f'batch column {name!r} has {len(value)} rows, not divisible by {parts} {what}')
  return len(value) // parts


def reshape_for_devices(batch: dict, num_devices: int) -> dict:
  """Every array float/int[B, ...] -> [num_devices, B / num_devices, ...]."""
  def reshape(value, name):
    if not isinstance(value, np.ndarray):
      raise TypeError(f'batch column {name!r} is a {type(value).__name__}, expected a numpy array')
    per_device = _rows_divisible(value, name, num_devices, 'devices')
    return value.reshape(num_devices, per_device, *value.shape[1:])
  return _map_columns(batch, reshape)


def process_split(batch: dict, process_index: int, process_count: int) -> dict:
  """This host's contiguous share of a global batch (arrays or lists), for multi-host training."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, {process_count})')
  def split(value, name):
    per_process = _rows_divisible(value, name, process_count, 'processes')
    return value[process_index * per_process:(process_index + 1) * per_process]
  return _map_columns(batch, split)
