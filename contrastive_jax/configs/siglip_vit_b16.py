"""SigLIP ViT-B/16 (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training").

Batch 32,768; sigmoid loss with learned scale (init log 10, clipped at 100 like CLIP's) and
bias (init -10); AdamW lr 1e-3 (no batch scaling), b2 0.95 (the paper's fix for large-batch
instability, Sec. 4.5), wd 1e-4, 5,000 warmup steps then cosine; 9B examples seen. Image
tower ViT-B/16 (mean-pooled tokens here; the paper uses a MAP head), text tower 12 x 768 with
context 64 and a 32k SentencePiece vocabulary. Check these numbers against the paper (Sec. 4)
before a long run.

Data: image-text TFRecords (``data.path``) and a SentencePiece model (``data.spm_model``;
``text.kwargs.vocab_size`` = its size + 3). Evaluation: ImageNet zero-shot (CLIP's names and 80
templates), ImageNet-v2/-Sketch and COCO 5k retrieval from tfds in ``tfds_dir``
(``common.image_text_evals``), in the loop and at the end.
``:quick`` keeps the recipe but shrinks sizes to a laptop smoke test.
"""

from __future__ import annotations

import math

import ml_collections

from contrastive_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, quick=False, batch=32_768, examples_seen=9_000_000_000,
                       path="gs://YOUR_BUCKET/image_text/{split}-*.tfrecord",
                       spm_model="gs://YOUR_BUCKET/spm/32k.model", spm_vocab=32_000,
                       tfds_dir="gs://YOUR_BUCKET/tensorflow_datasets")
  c = common.base_config()
  c.method = "clip"
  c.global_batch = 16 if a.quick else a.batch
  c.total_steps = 4 if a.quick else math.ceil(a.examples_seen / a.batch)
  c.log_every = 1 if a.quick else 100

  if a.quick:
    c.model = ml_collections.ConfigDict(dict(
        name="vit", kwargs=dict(patch_size=16, width=64, depth=2, num_heads=2, pool="gap")))
    text = dict(width=64, depth=2, num_heads=2)
  else:
    c.model = ml_collections.ConfigDict(dict(name="vit_b16", kwargs=dict(pool="gap")))
    text = dict(width=768, depth=12, num_heads=12)
  c.text = ml_collections.ConfigDict(dict(kwargs=dict(
      vocab_size=a.spm_vocab + 3, context_length=64, **text)))
  c.clip = common.clip_config("siglip", embed_dim=768)

  c.data = common.data_config(
      "tfrecord", eval_split="validation", path=a.path, recipe="clip",
      image_size=64 if a.quick else 224, shuffle_buffer=1000 if a.quick else 100_000,
      skip_corrupt=True, context_length=64, tokenizer="sentencepiece", spm_model=a.spm_model)

  c.optim = common.optim_config(
      "adamw", base_lr=1e-3, lr_scaling="none", warmup_steps=1 if a.quick else 5_000,
      schedule="cosine", weight_decay=1e-4, b1=0.9, b2=0.95, eps=1e-8)

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
  # A full v5e pod (256 chips, 128 pairs per chip at batch 32,768; the paper trained on TPU v4,
  # Zhai et al. 2023, Sec. 4); v5e is Cloud TPU's current cost-efficient training chip.
  # compile_for checks that it fits (docs/compile_for.md).
  c.pod = "v5e-256"
  return c
