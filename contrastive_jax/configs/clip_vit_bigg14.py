"""CLIP ViT-bigG/14 at open_clip's 160k batch, sized for a TPU v5e-256 (16 GiB HBM per chip).

The largest CLIP people train in the open: open_clip's ``ViT-bigG-14`` (Cherti et al. 2023,
"Reproducible scaling laws for contrastive language-image learning"; released as
``laion2b_s39b_b160k``: LAION-2B, 39B samples seen, global batch 160k). Architecture
(``models/registry.py`` ``CLIP_PRESETS["clip_vit_bigg14"]``, 2.54B parameters): image ViT 48 x
1,664, 16 heads of 104, MLP 8,192, patch 14 at 224 (256 patches + class token), ln_pre, bias-free
patch conv, GELU; text 32 x 1,280, 20 heads, MLP 5,120, context 77, open_clip's BPE vocabulary
of 49,408 (``data.tokenizer="clip_bpe"``, pooled at ``<end_of_text>`` 49,407); embedding 1,280.

Batch: 160,000 = 625 x 256, exactly 625 pairs per chip on a v5e-256. It fits in 16 GiB per chip
as libtpu compiles it: 13.29 GiB (5.40 arguments, 7.89 temporaries), 3,100 TFLOP per chip per
step, a 15.7 s floor at 197 TFLOP/s (figures and the command in docs/largest_runs.md). What
makes it fit:
* ``sharding.strategy="fsdp"``: parameters and both AdamW moments split over the 256 chips,
  and the towers' activations pinned to the batch axis (``models.layers.shard_batch``), so
  the partitioner gathers weights, not activations;
* ``sharding.view=False``: the leaves 256 does not divide (qkv and out kernels, widths 4,992 and
  1,664) stay whole on every chip (5.04 GiB of state per chip), because libtpu 0.0.42 cannot
  compile this step on a v5e:16x16 with ``sharding.py``'s factored view;
* ``optim.mu_dtype="bfloat16"``: the first moment in bf16;
* ``grad_cache.micro_batches=125``: GradCache (Gao et al. 2021) runs the towers on 5 pairs per
  chip at a time, so activations are those of 5 pairs, not 625 (25 chunks: 16.93 GiB, no fit);
* ``remat`` and ``scan=True`` in both towers: one rematerialised block in the program, each
  block's input kept per layer;
* ``loss_impl="ring"``, ``loss_tile=125``: the loss over 160k x 160k pairs never holds more than
  a 125 x 125 tile of logits per chip (Inf-CL, Cheng et al. 2024); 125 divides 625.

Recipe beyond the batch: AdamW b1 0.9, b2 0.98, eps 1e-6, weight decay 0.2, cosine after 10k
warmup steps, learned temperature, as ``clip_vit_b32``; the learning rate (``lr=``, default 1e-3,
no batch scaling) is ours, not a published bigG value: check it before a real run. ``:quick``
keeps the recipe's switches but shrinks every size to a laptop smoke test.
"""

from __future__ import annotations

import math

import ml_collections

from contrastive_jax.configs import common

BATCH = 160_000  # open_clip's 160k: 625 pairs per chip on 256 chips
EXAMPLES_SEEN = 39_000_000_000  # "s39b"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, quick=False, batch=BATCH, examples_seen=EXAMPLES_SEEN, lr=1e-3,
                       micro_batches=125, loss_tile=125,
                       path="gs://YOUR_BUCKET/image_text/{split}-*.tfrecord",
                       tfds_dir="gs://YOUR_BUCKET/tensorflow_datasets")
  c = common.base_config()
  c.method = "clip"
  c.global_batch = 32 if a.quick else a.batch
  c.total_steps = 3 if a.quick else math.ceil(a.examples_seen / a.batch)
  c.log_every = 1 if a.quick else 100

  image = dict(ln_pre=True, patch_bias=False, ln_eps=1e-5, activation="gelu", scan=True)
  text = dict(vocab_size=49_408, context_length=77, eot_id=49_407, ln_eps=1e-5,
              activation="gelu", scan=True)
  if a.quick:
    c.model = ml_collections.ConfigDict(dict(name="vit", kwargs=dict(
        patch_size=14, width=26, depth=2, num_heads=2, mlp_dim=128, **image)))
    text.update(width=20, depth=2, num_heads=2, mlp_dim=80)
  else:
    c.model = ml_collections.ConfigDict(dict(name="vit_bigg14", kwargs=image))
    text.update(width=1280, depth=32, num_heads=20, mlp_dim=5120)
  c.text = ml_collections.ConfigDict(dict(kwargs=text))
  c.clip = common.clip_config("clip", embed_dim=16 if a.quick else 1280)

  c.data = common.data_config(
      "tfrecord", eval_split="validation", path=a.path, recipe="clip",
      image_size=28 if a.quick else 224, shuffle_buffer=1000 if a.quick else 100_000,
      skip_corrupt=True, tokenizer="clip_bpe", context_length=77)

  c.optim = common.optim_config(
      "adamw", base_lr=a.lr, lr_scaling="none", warmup_steps=1 if a.quick else 10_000,
      schedule="cosine", weight_decay=0.2, b1=0.9, b2=0.98, eps=1e-6, mu_dtype="bfloat16")

  c.dtype = "bfloat16"
  c.remat = True
  c.loss_impl = "ring"
  c.loss_tile = 4 if a.quick else a.loss_tile
  c.grad_cache.micro_batches = 2 if a.quick else a.micro_batches
  c.sharding.strategy = "fsdp"
  # libtpu 0.0.42 cannot compile this step on a v5e:16x16 with the view (sharding.py): the
  # leaves 256 does not divide (qkv and out kernels, 5 GiB of state per chip) stay whole.
  c.sharding.view = False
  c.checkpoint.every_steps = 2 if a.quick else 1000
  c.eval.evaluators = common.image_text_evals(a.tfds_dir, every_steps=5000)
  c.eval.enabled = not a.quick
  c.eval.batch_size = 1024
  c.eval.embedding_plot = ""
  # open_clip trained bigG/14 at a 160k batch on A100s; sized here for a full v5e pod (625 pairs
  # per chip). Compile it before renting:
  # `python -m contrastive_jax.compile_for configs/clip_vit_bigg14.py`.
  c.pod = "v5e-256"
  return c
