r"""The reproduction study (free_jax.reproduce): FREE vs baselines over label fractions, one shared backbone.

  python experiments/reproduce.py --workdir=workdir/study                    # full grid, <= 60 min on 2 CPUs
  python experiments/reproduce.py --workdir=/tmp/repro --grid=smoke --out=/tmp/repro/results
  python experiments/reproduce.py --workdir=workdir/study --seeds=0,1,2       # more replicates

It runs on the small shipped backbone (experiments/configs/vqa.py:small) unless --config says otherwise; an
embedded config's backbone (``WORKDIR/backbone``, as experiments/train.py trains it) is reused, or trained first.
Rows go to ``WORKDIR/reproduce/``; a re-run reuses every finished row. Results: OUT/reproduction.json,
OUT/reproduction.md and PNGs. docs/reproduction.md describes the grid.
"""

import dataclasses

from absl import app, flags
from ml_collections import config_flags

from free_jax import cli
from free_jax import reproduce

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/configs/vqa.py:small',
                                          'Experiment config file (default: the small shipped backbone).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Study directory (its backbone/ is shared with train.py).')
_GRID = flags.DEFINE_enum('grid', 'full', list(reproduce.GRIDS), 'Which study grid to run.')
_OUT = flags.DEFINE_string('out', 'results', 'Where reproduction.json, reproduction.md and the PNGs go.')
_SEEDS = flags.DEFINE_list('seeds', None, "Replicate seeds, overriding the grid's (e.g. 0,1,2).")
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cli.many_runs_process(_WORKDIR.value)
  grid = reproduce.get_grid(_GRID.value)
  if _SEEDS.value:
    grid = dataclasses.replace(grid, seeds=tuple(int(s) for s in _SEEDS.value))
  cli.run_or_exit(reproduce.validate, _CONFIG.value, grid)  # a bad config or grid is one line, not a traceback
  reproduce.run_study(_CONFIG.value, _WORKDIR.value, grid, out_dir=_OUT.value)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
