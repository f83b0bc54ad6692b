r"""Prints docs/data.md's answer-balance table of the embedded generator (a regenerable figure).

  python experiments/data_table.py            # make_split('train', 20000, seed=0)
"""

import collections

from absl import app, flags

from free_jax.data import sort_of_clevr

_NUM = flags.DEFINE_integer('num_examples', 20000, 'Examples drawn.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the train split.')


def main(argv):
  del argv
  data = sort_of_clevr.make_split('train', _NUM.value, _SEED.value)
  counts = collections.defaultdict(collections.Counter)
  for kind, answer in zip(data['question_type'], data['answer']):
    counts[kind][answer] += 1
  print('| type | n | answer shares | max / uniform |\n|---|---|---|---|')
  for kind in sort_of_clevr.DEFAULT_QUESTION_TYPES:
    c, answers = counts[kind], sort_of_clevr.answers(kind)
    n = sum(c.values())
    shares = ', '.join(f'{a} {100 * c[a] / n:.1f}%' for a in answers)
    print(f'| {kind} | {n} | {shares} | {max(c.values()) * len(answers) / n:.2f} |')


if __name__ == '__main__':
  app.run(main)
