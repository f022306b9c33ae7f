"""SimCLR ResNet-50 on ImageNet (Chen et al. 2020): batch 4096, LARS, lr 0.3 x B/256, wd 1e-6,
T 0.1, 3-layer projection head (SimCLR v2) with 128-d output, 10 warmup epochs then cosine,
simclr augmentations with blur. Published linear-eval top-1: 69.1 (1x, 1000 epochs).

  --config=configs/simclr_resnet50_imagenet.py            # 100 epochs
  --config=configs/simclr_resnet50_imagenet.py:epochs=1000
  --config=configs/simclr_resnet50_imagenet.py:quick      # tiny sizes, mock-able smoke run

Data: tfds ``imagenet2012`` prepared under ``data.data_dir`` (e.g. gs://bucket/tensorflow_datasets;
tfds cannot download ImageNet: see https://www.tensorflow.org/datasets/catalog/imagenet2012).
"""

from __future__ import annotations

import ml_collections

from contrastive_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, quick=False, epochs=100, batch=4096)
  c = common.base_config()
  c.method = "simclr"
  c.global_batch = 16 if a.quick else a.batch
  if a.quick:
    c.total_steps = 2
  else:
    c.total_epochs = float(a.epochs)
  c.dtype = "bfloat16"
  c.log_every = 1 if a.quick else 100
  c.model = ml_collections.ConfigDict(dict(
      name="resnet50", kwargs=dict(stem="imagenet", width=1.0 if not a.quick else 0.125)))
  c.head = ml_collections.ConfigDict(dict(
      use_bn=True, version=2, hidden_dim=2048 if not a.quick else 64, out_dim=128))
  c.loss = ml_collections.ConfigDict(dict(temperature=0.1))
  c.data = common.data_config(
      "tfds", name="imagenet2012", eval_split="validation", recipe="simclr",
      image_size=224 if not a.quick else 32, augment=dict(strength=1.0, blur=True),
      shuffle_buffer=50_000)
  c.optim = common.optim_config(
      "lars", base_lr=0.3, lr_scaling="linear",
      warmup_fraction=10 / a.epochs if not a.quick else 0.0, schedule="cosine",
      weight_decay=1e-6, momentum=0.9, lars_eta=1e-3)
  c.checkpoint.every_steps = 2 if a.quick else 2500
  # ImageNet does not fit the in-memory evaluators; evaluate with the standalone evaluator on a
  # subset, or keep the kNN monitor off (the default here).
  c.eval.enabled = False
  # SimCLR trained batch 4096 on 128 TPU v3 cores (64 chips; Chen et al. 2020, Sec. 2.2). The
  # same 64 chips of v5e, the current cost-efficient training TPU, hold 64 images (128 views)
  # per chip; compile_for checks that it fits 16 GiB (docs/compile_for.md).
  c.pod = "v5e-64"
  return c
