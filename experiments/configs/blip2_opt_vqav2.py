r"""FREE exits on a real BLIP-2 OPT checkpoint (e.g. Salesforce/blip2-opt-2.7b) for VQAv2.

Everything is read from local paths; nothing is downloaded. Put the HF checkpoint directory (config.json,
*.safetensors, tokenizer and preprocessor files) at `model.pretrained_path` and the official VQAv2 files
(v2_OpenEnded_mscoco_{split}2014_questions.json, v2_mscoco_{split}2014_annotations.json, COCO
{split}2014/ images) under `data.data_dir`:

  python experiments/train.py --config=experiments/configs/blip2_opt_vqav2.py --workdir=workdir/opt_vqav2 \
    --config.model.pretrained_path=/ckpt/blip2-opt-2.7b --config.data.data_dir=/data/vqav2
"""

from free_jax import configs


def get_config(arg: str = '') -> 'ml_collections.ConfigDict':
  c = configs.base_config()
  c.model.source = 'pretrained'
  c.model.dtype = 'bfloat16'
  c.data.task, c.data.source = 'vqa', 'vqav2'
  c.data.num_train, c.data.num_calibration, c.data.num_test = 100_000, 2_000, 5_000
  c.data.max_text_length = 32
  c.exits.layers = (8, 16, 24)       # OPT-2.7B has 32 decoder layers
  c.discriminator.hidden = 1024
  c.train.steps, c.train.batch_size = 5_000, 32
  c.eval.max_new_tokens = 10
  c.eval.batch_size = 1
  return configs.finalize(c, arg)
