r"""Trains FREE exits (and, for the embedded config, the backbone first), then evaluates.

  python experiments/train.py --config=experiments/configs/vqa.py --workdir=workdir/vqa
  python experiments/train.py --config=experiments/configs/vqa.py:smoke --workdir=/tmp/smoke \
    --config.free.mode=ce_only

Re-running on the same workdir resumes an interrupted run and leaves a finished one untouched.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from free_jax import cli
from free_jax.eval import evaluator, final_screen
from free_jax.training import distributed, pipeline

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file[:smoke].', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics, evaluation).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:  # orbax logs every save at INFO; keep the progress bar readable
    logging.set_verbosity(logging.WARNING)
  distributed.initialize()  # multi-host: before anything touches a device; a no-op on one process
  try:
    pipeline.validate_config(_CONFIG.value)
  except ValueError as e:  # a bad config is a one-line message, not a traceback
    sys.exit(f'config error: {e}')
  summary = cli.run_or_exit(pipeline.train_and_evaluate, _CONFIG.value, _WORKDIR.value,
                            evaluators=[evaluator.early_exit_evaluation])
  print(final_screen.final_screen(summary['early_exit_evaluation'], _WORKDIR.value), flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
