"""SimCLR ResNet-18 on CIFAR-10: CIFAR stem (3x3 stride 1, no max-pool), T 0.5, colour jitter
strength 0.5, no blur, batch 512, LARS 1.0 x B/256 (solo-learn-like), 1000 epochs for the full
recipe (~90.7% linear in solo-learn); ``:epochs=200`` for a shorter run; ``:quick`` for a smoke
run. Data: tfds ``cifar10`` (``tfds build cifar10`` once, or ``data.data_dir`` pointing at it).
"""

from __future__ import annotations

import ml_collections

from contrastive_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, quick=False, epochs=1000, batch=512)
  c = common.base_config()
  c.method = "simclr"
  c.global_batch = 16 if a.quick else a.batch
  if a.quick:
    c.total_steps = 2
  else:
    c.total_epochs = float(a.epochs)
  c.log_every = 1 if a.quick else 100
  c.model = ml_collections.ConfigDict(dict(
      name="resnet18", kwargs=dict(stem="cifar", width=1.0 if not a.quick else 0.125)))
  c.head = ml_collections.ConfigDict(dict(
      use_bn=True, version=1, hidden_dim=2048 if not a.quick else 64, out_dim=128))
  c.loss = ml_collections.ConfigDict(dict(temperature=0.5))
  c.data = common.data_config("tfds", name="cifar10", recipe="simclr", image_size=32,
                              augment=dict(strength=0.5, blur=False), shuffle_buffer=50_000,
                              cache=True)
  c.optim = common.optim_config(
      "lars", base_lr=1.0, lr_scaling="linear",
      warmup_fraction=10 / a.epochs if not a.quick else 0.0, schedule="cosine",
      weight_decay=1e-6, momentum=0.9, lars_eta=1e-3)
  c.checkpoint.every_steps = 2 if a.quick else 2000
  c.eval.every_steps = 0 if a.quick else 5000
  c.eval.batch_size = 512 if not a.quick else 16
  return c
