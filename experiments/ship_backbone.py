r"""Ships a finished embedded run's backbone as the project's default (free_jax.shipped).

  python experiments/train.py --config=experiments/configs/vqa.py --config.model.source=embedded \
    --config.backbone_train.steps=20000 --config.backbone_train.num_examples=160000 \
    --config.backbone_train.checkpoint_every=2000 --workdir=workdir/backbone
  python experiments/ship_backbone.py --workdir=workdir/backbone --command="<the command above>" --overwrite

Writes assets/sort_of_clevr_blip2/ (HF BLIP-2 files, made_by.json, training_curves.png); docs/backbone.md
says what the shipped one is and how it was made.
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
