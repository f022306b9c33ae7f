"""MoCo v2, ResNet-50 on ImageNet-1k (Chen et al. 2020, "Improved Baselines with Momentum
Contrastive Learning"; 200 epochs give 67.5% linear top-1, 800 epochs 71.1%).

Batch 256, SGD (momentum 0.9) lr 0.03 x B/256, wd 1e-4, cosine schedule; T = 0.2; queue
K = 65,536; key-encoder momentum 0.999; 2-layer MLP head 2048-128; MoCo v2 augmentations;
shuffle-BN. Data: tfds ``imagenet2012`` (set ``data.data_dir``, e.g. a gs:// bucket). The
trainer's in-memory kNN/linear evaluators do not scale to ImageNet: evaluation is off here
(run a separate linear evaluation on the saved encoder).
  python -m contrastive_jax.main --config=configs/mocov2_resnet50_imagenet.py --workdir=...
``:quick`` keeps the recipe but shrinks sizes to a laptop smoke test.
"""

from __future__ import annotations

import math

import ml_collections

from contrastive_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, quick=False, epochs=200, batch=256, data_dir="")
  c = common.base_config()
  c.method = "mocov2"
  c.global_batch = 16 if a.quick else a.batch
  # Steps, not epochs: the trainer would otherwise read the split to count it.
  c.total_steps = 4 if a.quick else math.ceil(
      a.epochs * common.IMAGENET_TRAIN_EXAMPLES / a.batch)
  c.log_every = 1 if a.quick else 100

  c.model = ml_collections.ConfigDict(dict(
      name="resnet18" if a.quick else "resnet50",
      kwargs=dict(width=0.25) if a.quick else dict()))
  c.head = ml_collections.ConfigDict(dict(hidden_dim=2048, out_dim=128))
  c.loss = ml_collections.ConfigDict(dict(temperature=0.2))
  c.moco = ml_collections.ConfigDict(dict(
      queue_size=4 * c.global_batch if a.quick else 65_536, momentum=0.999, shuffle_bn=True,
      symmetric=False))

  c.data = common.data_config(
      "tfds", name="imagenet2012", eval_split="validation", data_dir=a.data_dir,
      recipe="mocov2", image_size=64 if a.quick else 224, context_length=32,
      shuffle_buffer=1000 if a.quick else 50_000)

  c.optim = common.optim_config(
      "sgd", base_lr=0.03, lr_scaling="linear", warmup_steps=0, schedule="cosine",
      weight_decay=1e-4, momentum=0.9)

  c.dtype = "bfloat16"
  c.checkpoint.every_steps = 2 if a.quick else 5000
  c.eval.enabled = False
  # MoCo v2 trained batch 256 on 8 V100 GPUs (Chen et al. 2020, Sec. 3); one 8-chip v5e host
  # (v5litepod-8), the current cost-efficient TPU, has the same 32 images per device.
  c.pod = "v5e-8"
  return c
