r"""FREE exits on a real BLIP-2 Flan-T5 checkpoint (e.g. Salesforce/blip2-flan-t5-xl) for COCO captions.

Local paths only: the HF checkpoint directory at `model.pretrained_path`, and a prepared tfds
`coco_captions` under `data.data_dir` (tfds never downloads here):

  python experiments/train.py --config=experiments/configs/blip2_t5_coco.py --workdir=workdir/t5_coco \
    --config.model.pretrained_path=/ckpt/blip2-flan-t5-xl --config.data.data_dir=/data/tfds
"""

from free_jax import configs


def get_config(arg: str = '') -> 'ml_collections.ConfigDict':
  c = configs.base_config()
  c.model.source = 'pretrained'
  c.model.dtype = 'bfloat16'
  c.data.task, c.data.source = 'caption', 'coco_captions'
  c.data.num_train, c.data.num_calibration, c.data.num_test = 100_000, 1_000, 5_000
  c.data.max_text_length = 40
  c.exits.layers = (6, 12, 18)       # Flan-T5-XL has 24 decoder layers
  c.discriminator.hidden = 1024
  c.train.steps, c.train.batch_size = 5_000, 32
  c.eval.max_new_tokens = 30
  c.eval.risk_delta = 0.05
  return configs.finalize(c, arg)
