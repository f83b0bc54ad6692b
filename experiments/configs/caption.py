r"""Embedded FREE benchmark, captioning: Sort-of-CLEVR scene descriptions on the shipped BLIP-2.

  python experiments/train.py --config=experiments/configs/caption.py --workdir=workdir/caption
  python experiments/train.py --config=experiments/configs/caption.py:smoke --workdir=/tmp/smoke_cap
"""

from free_jax import configs


def get_config(arg: str = '') -> 'ml_collections.ConfigDict':
  c = configs.use_shipped_backbone(configs.base_config())
  c.data.task = 'caption'
  c.data.max_text_length = 40      # captions are a few clauses long
  c.eval.max_new_tokens = 32       # a whole caption
  c.eval.risk_delta = 0.05         # token-level disagreement is tolerated a bit more for captions
  # A caption is 32 decode steps, evaluated at batch 1 for its wall clock and costs: fewer examples keep the run's
  # evaluation to ~20 minutes on 2 CPU cores at width 512 (CIDEr over 300 captions; LTT at delta 0.05 needs ~1000).
  c.data.num_test, c.data.num_calibration = 300, 1000
  c.eval.num_calibration_thresholds = 7  # each candidate is a pass over the 1000 calibration captions
  c.eval.timing_examples = 32      # 32 captions time ~1000 decode steps per pass
  return configs.finalize(c, arg, smoke_overrides=_smoke)


def _smoke(c):
  c.eval.max_new_tokens = 8  # a smoke run needs only the machinery, not whole captions
