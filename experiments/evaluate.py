r"""Evaluates a trained FREE run: early-exit decoding quality, calibration and measured speedups.

  python experiments/evaluate.py --config=experiments/configs/vqa.py --workdir=workdir/vqa
  python experiments/evaluate.py --config=experiments/configs/vqa.py --workdir=workdir/vqa \
    --config.data.test_seed=7 --config.eval.threshold=0.9

Writes WORKDIR/eval/summary.json and WORKDIR/eval/*.png (see `free_jax.eval.evaluator`). Nothing is
trained: the backbone and exits must already be in the workdir (experiments/train.py).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from free_jax import cli
from free_jax.eval import evaluator, final_screen
from free_jax.training import pipeline

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file[:smoke].', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory written by experiments/train.py.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:  # absl's INFO lines (backend probing, orbax) are not for this screen
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  cli.run_or_exit(pipeline.validate_config, config)
  backbone, exit_params = cli.run_or_exit(evaluator.load_run, config, _WORKDIR.value)
  summary = cli.run_or_exit(evaluator.early_exit_evaluation, config, _WORKDIR.value, backbone, exit_params,
                            reuse=False)  # an explicit evaluation always measures again
  print(final_screen.final_screen(summary, _WORKDIR.value), flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
