"""MoCo v3, ResNet-50 on ImageNet-1k (Chen, Xie & He 2021, Sec. 3 and the official recipe;
100 epochs: 68.9%, 1000 epochs: 74.6% linear top-1).

Batch 4096, LARS (momentum 0.9, eta 1e-3; biases and BN excluded from decay and adaptation)
lr 0.6 x B/256, wd 1e-6, 10 warmup epochs then cosine; T = 1.0; momentum 0.99 -> 1 (cosine);
projector 2048-4096-256 (2 layers, last BN without affine), predictor 4096-256; sync BN;
asymmetric BYOL-style augmentations (recipe "mocov3"). Data: tfds ``imagenet2012``; in-memory
evaluation off at this scale.
``:quick`` keeps the recipe but shrinks sizes to a laptop smoke test.
"""

from __future__ import annotations

import math

import ml_collections

from contrastive_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, quick=False, epochs=100, batch=4096, data_dir="")
  c = common.base_config()
  c.method = "mocov3"
  c.global_batch = 16 if a.quick else a.batch
  steps_per_epoch = common.IMAGENET_TRAIN_EXAMPLES / a.batch
  c.total_steps = 4 if a.quick else math.ceil(a.epochs * steps_per_epoch)
  c.log_every = 1 if a.quick else 100

  c.model = ml_collections.ConfigDict(dict(
      name="resnet18" if a.quick else "resnet50",
      kwargs=dict(width=0.25) if a.quick else dict()))
  c.head = ml_collections.ConfigDict(dict(num_layers=2, hidden_dim=4096, out_dim=256))
  c.predictor = ml_collections.ConfigDict(dict(hidden_dim=4096, out_dim=256))
  c.loss = ml_collections.ConfigDict(dict(temperature=1.0))
  # schedule_steps: None follows config.total_steps (set it when the run is given in epochs).
  c.moco = ml_collections.ConfigDict(dict(momentum=0.99,
                                          schedule_steps=common.placeholder(int)))

  c.data = common.data_config(
      "tfds", name="imagenet2012", eval_split="validation", data_dir=a.data_dir,
      recipe="mocov3", image_size=64 if a.quick else 224, context_length=32,
      shuffle_buffer=1000 if a.quick else 50_000)

  c.optim = common.optim_config(
      "lars", base_lr=0.6, lr_scaling="linear",
      warmup_steps=1 if a.quick else math.ceil(10 * steps_per_epoch), schedule="cosine",
      weight_decay=1e-6, momentum=0.9, lars_eta=1e-3)

  c.dtype = "bfloat16"
  c.checkpoint.every_steps = 2 if a.quick else 5000
  c.eval.enabled = False
  # MoCo v3 trained batch 4096 on TPU v3 (Chen, Xie & He 2021, Sec. 5 and their appendix);
  # on v5e, the current cost-efficient training TPU, 64 chips give 64 images per chip, as
  # SimCLR's. compile_for checks that it fits (docs/compile_for.md).
  c.pod = "v5e-64"
  return c
