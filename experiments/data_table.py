r"""Regenerates docs/data.md's figures of the embedded generator: the answer-balance table and the rendered examples.

  python experiments/data_table.py                                # make_split('train', 20000, seed=0): the table
  python experiments/data_table.py --examples_dir=docs/examples   # + one PNG per question type and its table row
"""

import collections
import os

from absl import app, flags
import numpy as np
from PIL import Image

from free_jax.data import sort_of_clevr

_NUM = flags.DEFINE_integer('num_examples', 20000, 'Examples drawn for the balance table.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the train split.')
_EXAMPLES_DIR = flags.DEFINE_string('examples_dir', '', "Writes the first example of each type of "
                                    "make_split('test', 64, seed=0) here as <type>.png, 4x upscaled ('' = none).")


def balance_table(num_examples: int, seed: int) -> list[str]:
  data = sort_of_clevr.make_split('train', num_examples, seed)
  counts = collections.defaultdict(collections.Counter)
  for kind, answer in zip(data['question_type'], data['answer']):
    counts[kind][answer] += 1
  lines = ['| type | n | answer shares | max / uniform |', '|---|---|---|---|']
  for kind in sort_of_clevr.DEFAULT_QUESTION_TYPES:
    c, answers = counts[kind], sort_of_clevr.answers(kind)
    n = sum(c.values())
    shares = ', '.join(f'{a} {100 * c[a] / n:.1f}%' for a in answers)
    lines.append(f'| {kind} | {n} | {shares} | {max(c.values()) * len(answers) / n:.2f} |')
  return lines


def example_table(directory: str) -> list[str]:
  data = sort_of_clevr.make_split('test', 64, seed=0)
  os.makedirs(directory, exist_ok=True)
  link = os.path.basename(os.path.normpath(directory))
  lines = ['| type | image | question | answer | caption |', '|---|---|---|---|---|']
  for kind in sort_of_clevr.DEFAULT_QUESTION_TYPES:
    i = data['question_type'].index(kind)
    Image.fromarray(np.kron(data['image'][i], np.ones((4, 4, 1), np.uint8))).save(os.path.join(directory, f'{kind}.png'))
    lines.append(f"| `{kind}` | ![{kind}]({link}/{kind}.png) | {data['question'][i]} | {data['answer'][i]} | "
                 f"{data['caption'][i]} |")
  return lines


def main(argv):
  del argv
  print('\n'.join(balance_table(_NUM.value, _SEED.value)))
  if _EXAMPLES_DIR.value:
    print('\n' + '\n'.join(example_table(_EXAMPLES_DIR.value)))


if __name__ == '__main__':
  app.run(main)
