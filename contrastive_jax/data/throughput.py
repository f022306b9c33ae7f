"""How many training examples one CPU core turns into model inputs per second, for a config's
own recipe: the host side of ``python -m contrastive_jax.compile_for``'s input budget.

``examples_per_core_second(config.data, mode)`` writes synthetic ImageNet-sized JPEGs in
memory (``synthetic_jpegs``: smooth random colour fields, 500 x 375 like ImageNet's typical
photo, quality 90), then runs the training pipeline's per-example work on them, as
``pipeline.train_iterator`` does it (``augment_config`` of ``config.data``; the crop-window
decode ``augment.encoded_views`` where the config decodes crops, else a full decode and
``augment.augment_view``; two views for SimCLR/MoCo, one for image-text), batched, in a tf.data
pipeline held to one core (a private thread pool of one thread, no intra-op parallelism). It
reports examples (images) per second on that core after a warm-up.

What it leaves out: reading the records (from local disk or GCS) and, for image-text configs,
tokenising the caption (the tokenizer's model file is the run's; its cost is small next to a
JPEG decode). Random pixels would decode slower than photos; the smooth fields are closer to
photos' entropy, but any synthetic image is a stand-in: measure on the run's own data with
``benchmarks/input_pipeline.py`` before relying on a margin.
"""

from __future__ import annotations

import time

import numpy as np
import tensorflow as tf

from contrastive_jax.data import augment as aug_lib
from contrastive_jax.data import pipeline

IMAGENET_TYPICAL_HW = (375, 500)


def synthetic_jpegs(num: int = 32, hw: tuple[int, int] = IMAGENET_TYPICAL_HW, seed: int = 0,
                    quality: int = 90) -> list[bytes]:
  """``num`` JPEG files' bytes of ``hw`` smooth random colour fields (low-frequency noise
  upsampled bicubically, plus mild pixel noise): photo-like entropy, no real data needed."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num):
    coarse = rng.uniform(0, 255, size=(hw[0] // 25 + 1, hw[1] // 25 + 1, 3)).astype(np.float32)
    image = tf.image.resize(coarse[None], hw, method="bicubic")[0].numpy()
    image += rng.normal(0, 6, size=image.shape)
    image = np.clip(image, 0, 255).astype(np.uint8)
    out.append(tf.io.encode_jpeg(image, quality=quality).numpy())
  return out


def example_fn(data_config, mode: str):
  """``(bytes, id) -> views`` of ``data_config``'s training recipe, as the input pipeline
  computes them for an encoded record."""
  if mode not in pipeline.MODES:
    raise ValueError(f"mode={mode!r} is unknown; use one of {pipeline.MODES}")
  cfg = pipeline.augment_config(data_config)
  crop_decode = {"auto": pipeline._is_streaming(data_config), "on": True, "off": False,  # pylint: disable=protected-access
                 True: True, False: False}.get(data_config.crop_decode, True)
  views = (1, 2) if mode == "views" else (1,)

  def fn(data, example_id):
    ex_seed = aug_lib.example_seed(0, 0, example_id)
    if crop_decode:
      return tuple(aug_lib.encoded_views(data, ex_seed, cfg, views))
    image = tf.io.decode_jpeg(data, channels=3)
    return tuple(aug_lib.augment_view(image, aug_lib.view_seed(ex_seed, v), cfg, v)
                 for v in views)

  return fn


def examples_per_core_second(data_config, mode: str, *, seconds: float = 4.0,
                             batch: int = 32, num_images: int = 32,
                             warmup_batches: int = 2) -> float:
  """Training examples per second on one CPU core for ``data_config``'s recipe (see the module
  docstring); runs for about ``seconds`` after ``warmup_batches``."""
  files = synthetic_jpegs(num_images)
  fn = example_fn(data_config, mode)
  ds = tf.data.Dataset.from_tensor_slices(tf.constant(files)).repeat()
  ds = ds.enumerate().map(lambda i, data: fn(data, i),
                          num_parallel_calls=1, deterministic=True)
  ds = ds.batch(batch, drop_remainder=True).prefetch(1)
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  options.autotune.enabled = False
  ds = ds.with_options(options)
  it = iter(ds)
  for _ in range(warmup_batches):
    next(it)
  count, start = 0, time.perf_counter()
  while True:
    next(it)
    count += batch
    elapsed = time.perf_counter() - start
    if elapsed >= seconds:
      return count / elapsed
