"""CLIP (or SigLIP) on the embedded MNIST digits with captions from class templates.

Training captions are drawn from five templates ("a handwritten 7", "the digit seven", ...);
two other templates are held out and used only for the zero-shot evaluation at the end
(``zero_shot/top1`` in the summary) and as retrieval captions. The image tower is the default
run's small ConvNet (``:tower=vit`` for a patch-4 ViT, which needs many more steps on 5,000
digits), the text tower a 3-layer transformer over bytes; sized for a few minutes on a 2-core
CPU:
  python -m contrastive_jax.main --config=configs/clip_mnist.py --workdir=/tmp/clip_mnist
``:quick`` shrinks it to a smoke test; ``:loss=siglip`` trains SigLIP instead.
"""

from __future__ import annotations

import ml_collections

from contrastive_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, quick=False, steps=600, batch=256, loss="clip", tower="convnet")
  c = common.base_config()
  c.method = "clip"
  c.global_batch = 32 if a.quick else a.batch
  c.total_steps = 4 if a.quick else a.steps
  c.log_every = 2 if a.quick else 50

  width = 32 if a.quick else 128
  depth = 1 if a.quick else 3
  if a.tower not in ("convnet", "vit"):
    raise ValueError(f"clip_mnist: tower={a.tower!r}; use tower=convnet or tower=vit")
  if a.tower == "vit":
    image_kwargs = dict(patch_size=4, width=width, depth=depth, num_heads=4, pool="gap")
  else:
    image_kwargs = dict(widths=(16, 16, 32, 32) if a.quick else (16, 32, 64, 128))
  c.model = ml_collections.ConfigDict(dict(name=a.tower, kwargs=image_kwargs))
  c.text = ml_collections.ConfigDict(dict(
      kwargs=dict(width=width, depth=depth, num_heads=4)))
  c.clip = common.clip_config(a.loss, embed_dim=32 if a.quick else 128)

  c.data = common.data_config("mnist", recipe="clip", image_size=28, context_length=40)

  c.optim = common.optim_config(
      "adamw", base_lr=1e-3, lr_scaling="none", warmup_fraction=0.05, schedule="cosine",
      weight_decay=0.2, b1=0.9, b2=0.98, eps=1e-6)

  c.checkpoint.every_steps = 2 if a.quick else 300
  c.eval.every_steps = 0 if a.quick else 300
  c.eval.batch_size = 256
  c.eval.raw_pixel_baseline = not a.quick
  return c
