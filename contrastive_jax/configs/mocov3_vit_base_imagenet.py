"""MoCo v3, ViT-B/16 on ImageNet-1k (Chen, Xie & He 2021, Sec. 4-5; 300 epochs: 76.7% linear).

Batch 4096, AdamW lr 1.5e-4 x B/256, wd 0.1, 40 warmup epochs then cosine; T = 0.2; momentum
0.99 -> 1 (cosine); 3-layer projector 4096-256 and predictor 4096-256 (BN in the heads, sync);
the ViT has fixed 2-D sin-cos position embeddings and a random patch projection that is never
trained (Sec. 4.2): ``freeze_patch_embed=True`` stops its gradient and
``optim.frozen_patterns`` keeps AdamW's decoupled weight decay off it. Data: tfds
``imagenet2012``; in-memory evaluation off at this scale.
``:quick`` keeps the recipe but shrinks sizes to a laptop smoke test.
"""

from __future__ import annotations

import math

import ml_collections

from contrastive_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, quick=False, epochs=300, batch=4096, data_dir="")
  c = common.base_config()
  c.method = "mocov3"
  c.global_batch = 16 if a.quick else a.batch
  steps_per_epoch = common.IMAGENET_TRAIN_EXAMPLES / a.batch
  c.total_steps = 4 if a.quick else math.ceil(a.epochs * steps_per_epoch)
  c.log_every = 1 if a.quick else 100

  vit = dict(posemb="sincos2d", freeze_patch_embed=True, pool="cls")
  if a.quick:
    c.model = ml_collections.ConfigDict(dict(
        name="vit", kwargs=dict(patch_size=16, width=64, depth=2, num_heads=2, **vit)))
  else:
    c.model = ml_collections.ConfigDict(dict(name="vit_b16", kwargs=vit))
  c.head = ml_collections.ConfigDict(dict(num_layers=3, hidden_dim=4096, out_dim=256))
  c.predictor = ml_collections.ConfigDict(dict(hidden_dim=4096, out_dim=256))
  c.loss = ml_collections.ConfigDict(dict(temperature=0.2))
  # schedule_steps: None follows config.total_steps (set it when the run is given in epochs).
  c.moco = ml_collections.ConfigDict(dict(momentum=0.99,
                                          schedule_steps=common.placeholder(int)))

  c.data = common.data_config(
      "tfds", name="imagenet2012", eval_split="validation", data_dir=a.data_dir,
      recipe="mocov3", image_size=64 if a.quick else 224, context_length=32,
      shuffle_buffer=1000 if a.quick else 50_000)

  c.optim = common.optim_config(
      "adamw", base_lr=1.5e-4, lr_scaling="linear",
      warmup_steps=1 if a.quick else math.ceil(40 * steps_per_epoch), schedule="cosine",
      weight_decay=0.1, b1=0.9, b2=0.999, eps=1e-8,
      frozen_patterns=("patch_embed_frozen",))

  c.dtype = "bfloat16"
  c.checkpoint.every_steps = 2 if a.quick else 5000
  c.eval.enabled = False
  # MoCo v3 trained ViT-B at batch 4096 on TPU v3 (Chen, Xie & He 2021, Sec. 5); on v5e, the
  # current cost-efficient training TPU, 64 chips give 64 images per chip. compile_for
  # checks that it fits (docs/compile_for.md).
  c.pod = "v5e-64"
  return c
