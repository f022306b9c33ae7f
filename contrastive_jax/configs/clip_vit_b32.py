"""CLIP ViT-B/32 (Radford et al. 2021; OpenAI's B/32 architecture, 63.2% ImageNet zero-shot).

Batch 32,768; AdamW lr 5e-4 (no batch scaling), b1 0.9, b2 0.98, eps 1e-6, wd 0.2 (gains,
biases, embeddings and the logit scale excluded by ``optim.weight_decay_mask``), 10,000
warmup steps (open_clip) then cosine; learned temperature initialised at 1/0.07, scale
clipped at 100; 32 epochs of 400M pairs. Image tower ViT-B/32 with ln_pre, bias-free patch
conv and QuickGELU; text tower 12 x 512, 8 heads, context 77.

Data: image-text TFRecords (``data.path``, ``{split}`` is replaced by the split; records with
``image`` (encoded bytes) and ``caption``). Tokenizer: a SentencePiece model (``data.spm_model``)
whose size, plus our 3 special ids, is ``text.kwargs.vocab_size``. Evaluation in the loop and
at the end (``common.image_text_evals``): ImageNet zero-shot with CLIP's class names and 80
templates, ImageNet-v2/-Sketch, COCO 5k retrieval, from tfds datasets in ``tfds_dir``; the same
evaluators run from ``python -m contrastive_jax.evaluate --workdir=...``.
``:quick`` keeps the recipe but shrinks sizes to a laptop smoke test.
"""

from __future__ import annotations

import math

import ml_collections

from contrastive_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, quick=False, batch=32_768, examples_seen=32 * 400_000_000,
                       path="gs://YOUR_BUCKET/image_text/{split}-*.tfrecord",
                       spm_model="gs://YOUR_BUCKET/spm/32k.model", spm_vocab=32_000,
                       tfds_dir="gs://YOUR_BUCKET/tensorflow_datasets")
  c = common.base_config()
  c.method = "clip"
  c.global_batch = 16 if a.quick else a.batch
  c.total_steps = 4 if a.quick else math.ceil(a.examples_seen / a.batch)
  c.log_every = 1 if a.quick else 100

  clip_image = dict(ln_pre=True, patch_bias=False, ln_eps=1e-5, activation="quick_gelu")
  if a.quick:
    c.model = ml_collections.ConfigDict(dict(
        name="vit", kwargs=dict(patch_size=32, width=64, depth=2, num_heads=2, **clip_image)))
    text = dict(width=64, depth=2, num_heads=2)
  else:
    c.model = ml_collections.ConfigDict(dict(name="vit_b32", kwargs=clip_image))
    text = dict(width=512, depth=12, num_heads=8)
  c.text = ml_collections.ConfigDict(dict(kwargs=dict(
      vocab_size=a.spm_vocab + 3, context_length=77, ln_eps=1e-5, activation="quick_gelu",
      **text)))
  c.clip = common.clip_config("clip", embed_dim=512)

  c.data = common.data_config(
      "tfrecord", eval_split="validation", path=a.path, recipe="clip",
      image_size=64 if a.quick else 224, shuffle_buffer=1000 if a.quick else 100_000,
      skip_corrupt=True, tokenizer="sentencepiece", spm_model=a.spm_model)

  c.optim = common.optim_config(
      "adamw", base_lr=5e-4, lr_scaling="none", warmup_steps=1 if a.quick else 10_000,
      schedule="cosine", weight_decay=0.2, b1=0.9, b2=0.98, eps=1e-6)

  c.dtype = "bfloat16"
  c.remat = not a.quick
  c.checkpoint.every_steps = 2 if a.quick else 2000
  # ImageNet zero-shot (10k-image subset every 5000 steps, all 50k at the end; also
  # ImageNet-v2 and -Sketch at the end) and COCO 5k retrieval (every 5000 steps and at the
  # end), read from tfds in a.tfds_dir; cost in docs/evaluation.md. Off in :quick (no ImageNet).
  c.eval.evaluators = common.image_text_evals(a.tfds_dir, every_steps=5000)
  # Also ImageNet-R and -A (200 classes each) and Flickr30k 1k test from Karpathy's split file:
  #   c.eval.evaluators = common.image_text_evals(
  #       a.tfds_dir, every_steps=5000, variants=tuple(common.IMAGENET_VARIANTS),
  #       flickr30k=("gs://YOUR_BUCKET/flickr30k/dataset_flickr30k.json",
  #                  "gs://YOUR_BUCKET/flickr30k/flickr30k-images"))
  c.eval.enabled = not a.quick
  c.eval.batch_size = 1024
  c.eval.embedding_plot = ""
  # A full v5e pod (256 chips, 128 pairs per chip at batch 32,768): OpenAI trained on V100s,
  # open_clip on A100s; v5e is Cloud TPU's current cost-efficient training chip. compile_for
  # checks that it fits (docs/compile_for.md).
  c.pod = "v5e-256"
  return c
