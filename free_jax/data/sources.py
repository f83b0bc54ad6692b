"""`load_examples`: the first examples of a split of any `configs.DATA_SOURCES`, as columns.

Every source becomes the same column dict (the layout of `sort_of_clevr.generate`, which
`free_jax.data.batching` consumes): ``image`` uint8[N, S, S, 3] (S = `image_size`), and lists of N
``question``, ``answer``, ``question_type``, ``caption``; VQAv2 adds ``answers`` (the ten human
answers, so evaluation uses VQA accuracy), COCO adds ``captions`` (all references, for CIDEr).

Splits are 'backbone' (stage 1 of an embedded backbone), 'train' (the exits), 'calibration' (threshold
calibration) and 'test'; real datasets map them to their own splits so that calibration and test never
share an image (N_test = data.num_test). The generator gives every split its own seed stream, so the
embedded backbone, the exits, calibration and test never share a scene:

  source          backbone / train                               calibration                   test
  sort_of_clevr   generator 'backbone' / 'train'                 generator 'val'               generator 'test'
  clevr (tfds)    'train'                                        'validation[N_test:]' images  'validation'
  coco_captions   'train', per caption                           'val' (Karpathy)              'test' (Karpathy)
  vqav2 (disk)    train2014                                      val2014 from question N_test  val2014

(A backbone for real data is loaded pretrained; training the tiny embedded one on a real source, which only
tests do, reads the same 'train' split as the exits.)

(CLEVR and VQAv2 test answers are not public, hence validation. VQAv2 questions of one image are
adjacent, so only the image at the boundary may appear in both calibration and test.)

Seeds: the generator draws split `test` from ``data.test_seed`` and the others from ``data.seed``.
A real split's subset is fixed (its first `num` examples in file order, so runs compare on the same
data); the seeds only shuffle the order of that subset.
"""

from __future__ import annotations

import itertools

import ml_collections
import numpy as np

from free_jax.data import sort_of_clevr, tfds_pipelines, vqav2

SPLITS = ('backbone', 'train', 'calibration', 'test')
REAL_SOURCES = ('clevr', 'coco_captions', 'vqav2')
SOURCE_TASKS = {'sort_of_clevr': ('vqa', 'caption'), 'clevr': ('vqa',), 'coco_captions': ('caption',),
                'vqav2': ('vqa',)}
_GENERATOR_SPLITS = {'backbone': 'backbone', 'train': 'train', 'calibration': 'val', 'test': 'test'}


def load_examples(config: ml_collections.ConfigDict, split: str, num: int, image_size: int) -> dict:
  """The first `num` examples of `split` of ``config.data.source`` as columns (module docstring).

  Args:
    config: a run config; reads ``data.{source, task, data_dir, seed, test_seed, num_test}``.
    split: one of `SPLITS`.
    num: how many examples; a real split holding fewer is an error.
    image_size: images are resized (bicubic) to image_size x image_size.

  Returns:
    dict of columns with N = `num` rows.
  """
  d = config.data
  if split not in SPLITS:
    raise ValueError(f'split={split!r}; expected one of {SPLITS}')
  if d.source not in SOURCE_TASKS:
    raise ValueError(f'data.source={d.source!r}; expected one of {tuple(SOURCE_TASKS)}')
  if d.task not in SOURCE_TASKS[d.source]:
    raise ValueError(f'data.task={d.task!r} is not available from data.source={d.source!r} '
                     f'(it has {SOURCE_TASKS[d.source]})')
  seed = d.test_seed if split == 'test' else d.seed
  if d.source == 'sort_of_clevr':
    return sort_of_clevr.make_split(_GENERATOR_SPLITS[split], num, seed, task=d.task, image_size=image_size)
  common = dict(image_size=image_size, shuffle_seed=seed)
  if d.source == 'clevr':
    tfds_split = {'backbone': 'train', 'train': 'train', 'calibration': f'validation[{d.num_test}:]',
                  'test': 'validation'}[split]
    stream = tfds_pipelines.load_clevr_vqa(tfds_split, d.data_dir, max_examples=num, **common)
  elif d.source == 'coco_captions':
    tfds_split = {'backbone': 'train', 'train': 'train', 'calibration': 'val', 'test': 'test'}[split]
    stream = tfds_pipelines.load_coco_captions(tfds_split, d.data_dir, per_caption=split in ('backbone', 'train'),
                                               max_examples=num, **common)
  else:
    files = vqav2.VQAv2Files.standard(d.data_dir, 'train' if split in ('backbone', 'train') else 'val')
    stream = vqav2.load_vqav2(files, max_examples=num, offset=d.num_test if split == 'calibration' else 0,
                              **common)
  examples = list(itertools.islice(stream, num))
  if len(examples) < num:
    raise ValueError(f'data.source={d.source!r} split {split!r} in data.data_dir={d.data_dir!r} has only '
                     f'{len(examples)} examples, {num} requested')
  return _columns(examples, d.source)


def _columns(examples: list[dict], source: str) -> dict:
  """Schema examples (`tfds_pipelines.EXAMPLE_KEYS`) -> the column dict of the module docstring."""
  keys = ['question', 'answer', 'question_type', 'caption']
  if source == 'vqav2':
    keys.append('answers')
  if source == 'coco_captions':
    keys.append('captions')
  columns = {k: [ex[k] for ex in examples] for k in keys}
  columns['image'] = np.stack([ex['image'] for ex in examples])
  return columns
