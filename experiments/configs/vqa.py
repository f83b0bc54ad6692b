r"""Embedded FREE benchmark: Sort-of-CLEVR VQA on a tiny BLIP-2 (ViT -> Q-Former -> 8-layer OPT).

Needs no downloads: the backbone is the one shipped in assets/sort_of_clevr_blip2 (docs/backbone.md), so a run
trains FREE exits, then evaluates with measured speedups. `--config.model.source=embedded` trains the backbone
here first (cached in the workdir), as `:smoke` does with a tiny one.

  python experiments/train.py --config=experiments/configs/vqa.py --workdir=workdir/vqa
  python experiments/train.py --config=experiments/configs/vqa.py:smoke --workdir=/tmp/smoke  # ~1 min
  python experiments/evaluate.py --config=experiments/configs/vqa.py --workdir=workdir/vqa
"""

from free_jax import configs


def get_config(arg: str = '') -> 'ml_collections.ConfigDict':
  c = configs.use_shipped_backbone(configs.base_config())
  c.data.task = 'vqa'
  return configs.finalize(c, arg)
