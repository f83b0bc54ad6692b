r"""Embedded FREE benchmark: Sort-of-CLEVR VQA on a tiny BLIP-2 (ViT -> Q-Former -> 8-layer OPT).

Needs no downloads: the backbone is trained here first (cached in the workdir), then FREE exits, then
evaluation with measured speedups.

  python experiments/train.py --config=experiments/configs/vqa.py --workdir=workdir/vqa
  python experiments/train.py --config=experiments/configs/vqa.py:smoke --workdir=/tmp/smoke  # < 60 s
  python experiments/evaluate.py --config=experiments/configs/vqa.py --workdir=workdir/vqa
"""

from free_jax import configs


def get_config(arg: str = '') -> 'ml_collections.ConfigDict':
  c = configs.base_config()
  c.data.task = 'vqa'
  return configs.finalize(c, arg)
