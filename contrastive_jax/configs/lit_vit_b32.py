"""LiT (Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning") from a CLIP.

The image tower and its projection come from a converted checkpoint (``init_from.path``, e.g.
OpenAI's CLIP ViT-B/32 converted by ``python -m contrastive_jax.convert import``) and are
locked: ``clip.lock_image`` runs them in inference mode under ``stop_gradient`` (no gradient,
BN statistics and dropout fixed) and ``optim.frozen_patterns`` gives them zero updates and no
optimizer state (so weight decay does not move them either). The text tower and the logit
scale train from scratch with CLIP's loss, on CLIP BPE tokens (``data.tokenizer='clip_bpe'``).
LiT's recipe: Adam(W) lr 1e-3, wd 1e-4, batch 16k-32k, cosine with warmup.

``:quick`` is a smoke test on the embedded MNIST digits with a small ViT whose weights come
from a file of the same architecture (tests/test_lit.py writes one).
"""

from __future__ import annotations

import ml_collections

from contrastive_jax.configs import common

LOCKED = ("image_encoder", "image_proj")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, quick=False, batch=16_384, steps=55_000,
                       init="/path/to/openai_vit_b32.safetensors",
                       path="gs://YOUR_BUCKET/image_text/{split}-*.tfrecord")
  c = common.base_config()
  c.method = "clip"
  c.global_batch = 16 if a.quick else a.batch
  c.total_steps = 3 if a.quick else a.steps
  c.log_every = 1 if a.quick else 100

  clip_image = dict(ln_pre=True, patch_bias=False, ln_eps=1e-5, activation="quick_gelu")
  if a.quick:
    c.model = ml_collections.ConfigDict(dict(
        name="vit", kwargs=dict(patch_size=7, width=32, depth=1, num_heads=2, **clip_image)))
    text = dict(width=32, depth=1, num_heads=2)
  else:
    c.model = ml_collections.ConfigDict(dict(name="vit_b32", kwargs=clip_image))
    text = dict(width=512, depth=12, num_heads=8)
  # Pool at the first <end_of_text> (49407, the largest BPE id: the same as CLIP's argmax rule).
  c.text = ml_collections.ConfigDict(dict(kwargs=dict(
      vocab_size=49_408, context_length=77, ln_eps=1e-5, activation="quick_gelu", eot_id=49_407,
      **text)))
  c.clip = common.clip_config("clip", embed_dim=16 if a.quick else 512, lock_image=True)
  c.init_from.path = a.init
  c.init_from.patterns = LOCKED

  if a.quick:
    c.data = common.data_config("mnist", recipe="clip", image_size=28, tokenizer="clip_bpe")
  else:
    c.data = common.data_config(
        "tfrecord", eval_split="validation", path=a.path, recipe="clip", image_size=224,
        shuffle_buffer=100_000, skip_corrupt=True, tokenizer="clip_bpe")

  c.optim = common.optim_config(
      "adamw", base_lr=1e-3, lr_scaling="none", warmup_steps=1 if a.quick else 10_000,
      schedule="cosine", weight_decay=1e-4, frozen_patterns=LOCKED)
  c.checkpoint.every_steps = 3 if a.quick else 2000
  c.eval.enabled = not a.quick
  # 64 v5e chips, 256 pairs per chip at batch 16,384: the image tower is locked (forward only,
  # no gradients or moments), so each chip holds a bigger share than CLIP's. v5e is Cloud TPU's
  # current cost-efficient training chip; compile_for checks that it fits.
  c.pod = "v5e-64"
  return c
