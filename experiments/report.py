r"""Regenerates every figure the README quotes from fresh runs (free_jax.report): `make report`.

  python experiments/report.py --workdir=workdir/report            # default + caption runs, the 3-seed study
  python experiments/report.py --workdir=/tmp/r --config=experiments/configs/vqa.py:smoke \
    --caption_config=experiments/configs/caption.py:smoke --study_config=experiments/configs/vqa.py:smoke --grid=smoke --docs=/tmp/r/docs --results=/tmp/r/res \
    --readme=/tmp/r/README.md                                        # the same on the smoke configs (a test)

Finished runs in the workdir are reused; docs/results.md, docs/figures/ and the README's marked section are
rewritten with the commit that made them.
"""

import dataclasses

from absl import app, flags
from ml_collections import config_flags

from free_jax import cli, report, reproduce

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/configs/vqa.py', 'The default VQA run.',
                                          lock_config=True)
_CAPTION = config_flags.DEFINE_config_file('caption_config', 'experiments/configs/caption.py', 'The caption run.',
                                           lock_config=True)
_STUDY = config_flags.DEFINE_config_file('study_config', 'experiments/configs/vqa.py:small',
                                        'The reproduction study (on the small backbone).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', 'workdir/report', 'Where the runs live (reused when finished).')
_GRID = flags.DEFINE_enum('grid', 'full', list(reproduce.GRIDS), 'The study grid.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Replicate seeds of the study.')
_DOCS = flags.DEFINE_string('docs', 'docs', 'Where results.md and figures/ go.')
_RESULTS = flags.DEFINE_string('results', 'results', "Where the study's reproduction.{json,md} and PNGs go.")
_STUDY_RUN = flags.DEFINE_bool('study', True, 'Run (or reuse) the study; --nostudy keeps the study results in '
                                '--results and regenerates the two runs only.')
_README = flags.DEFINE_string('readme', 'README.md', 'README whose marked section is rewritten ("" = none).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  grid = dataclasses.replace(reproduce.get_grid(_GRID.value), seeds=tuple(int(s) for s in _SEEDS.value))
  runs = report.Runs(vqa=_CONFIG.value, caption=_CAPTION.value, study=_STUDY.value, grid=grid)
  cli.run_or_exit(report.make_report, runs, _WORKDIR.value, docs_dir=_DOCS.value, readme=_README.value or None,
                  results_dir=_RESULTS.value, study=_STUDY_RUN.value)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
