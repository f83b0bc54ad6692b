r"""The recipe screen (free_jax.screen): FREE's untested choices, each against CE-only at the same steps, paired.

  python experiments/screen.py --workdir=/tmp/screen --variants=free --steps=8000         # the learning curves
  python experiments/screen.py --workdir=/tmp/screen --out=results/screen                 # every variant
  python experiments/screen.py --workdir=/tmp/screen --variants=free,adv0.1 --seeds=0,1,2

It runs on the small shipped backbone (experiments/configs/vqa.py:small) unless --config says otherwise. Runs go to
``WORKDIR/screen/``; a re-run reuses every finished one. Results: OUT/screen.json, OUT/screen.md and curve PNGs.
"""

from absl import app, flags
from ml_collections import config_flags

from free_jax import cli, screen

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/configs/vqa.py:small',
                                          'Experiment config file (default: the small shipped backbone).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Screen directory (its backbone/ is shared with train.py).')
_OUT = flags.DEFINE_string('out', 'results/screen', 'Where screen.json, screen.md and the PNGs go.')
_VARIANTS = flags.DEFINE_list('variants', list(screen.VARIANTS), f'Variants, from {list(screen.VARIANTS)}.')
_FRACTIONS = flags.DEFINE_list('label_fractions', ['0.01', '0.1'], 'Label fractions.')
_SEEDS = flags.DEFINE_list('seeds', ['0'], 'Replicate seeds.')
_STEPS = flags.DEFINE_integer('steps', screen.Screen.steps, 'Exit training steps of every run.')
_VALIDATE_EVERY = flags.DEFINE_integer('validate_every', screen.Screen.validate_every,
                                       'Steps between the learning curves\' points.')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cli.many_runs_process(_WORKDIR.value)
  plan = screen.Screen(variants=tuple(_VARIANTS.value), label_fractions=tuple(float(f) for f in _FRACTIONS.value),
                       seeds=tuple(int(s) for s in _SEEDS.value), steps=_STEPS.value,
                       validate_every=_VALIDATE_EVERY.value)
  cli.run_or_exit(screen.validate, _CONFIG.value, plan)
  cli.run_or_exit(screen.run_screen, _CONFIG.value, _WORKDIR.value, plan, out_dir=_OUT.value)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
