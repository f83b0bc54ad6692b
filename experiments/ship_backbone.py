r"""Ships a finished embedded run's backbone (free_jax.shipped): HF BLIP-2 files, made_by.json, training curves.

  python experiments/train.py --config=experiments/configs/vqa.py --config.model.source=embedded ... \
    --workdir=workdir/backbone_wide
  python experiments/ship_backbone.py --workdir=workdir/backbone_wide --lm_dtype=bfloat16 \
    --command="<the command above>"                           # -> assets/sort_of_clevr_blip2
  python experiments/ship_backbone.py ... --overwrite --evaluated_by=workdir/vqa   # record a run's test figures

docs/backbone.md gives the commands that made the shipped backbones and what they answer.
"""

from absl import app, flags

from free_jax import cli, configs, shipped

_WORKDIR = flags.DEFINE_string('workdir', None, 'A finished run of experiments/train.py with model.source=embedded.')
_OUT = flags.DEFINE_string('out', configs.SHIPPED_BACKBONE, 'The shipped directory.')
_COMMAND = flags.DEFINE_string('command', None, 'The exact command that trained the run (recorded).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing shipped directory.')
_LM_DTYPE = flags.DEFINE_enum('lm_dtype', 'float32', list(shipped.LM_DTYPES),
                              'Stored dtype of the language model (bfloat16 halves the file).')
_EVALUATED_BY = flags.DEFINE_string('evaluated_by', None, 'A finished train.py run on exactly the shipped weights '
                                    "whose eval/summary.json gives the record's test figures (default: --workdir).")
flags.mark_flags_as_required(['workdir', 'command'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  record = cli.run_or_exit(shipped.ship, _WORKDIR.value, _OUT.value, _COMMAND.value, _OVERWRITE.value,
                           _LM_DTYPE.value, _EVALUATED_BY.value)
  print(f"shipped {_OUT.value}: fingerprint {record['fingerprint']}, commit {record['commit']}")


if __name__ == '__main__':
  app.run(main)
