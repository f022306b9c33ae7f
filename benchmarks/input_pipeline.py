"""Input-pipeline throughput: images per second (and per CPU core) of ``train_iterator``.

Two cases:
* SimCLR two-view recipe at 224 from JPEG bytes (ImageNet-like ~400x500 JPEGs made from
  skimage.data photos, held in memory as a cached TFRecord source, so disk speed is out);
* the embedded MNIST default (32x32, SimCLR recipe at strength 0.5, no blur).

An "image" is one source example; each yields two augmented views. Usage:

  python benchmarks/input_pipeline.py --steps 20 --batch 64

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from contrastive_jax.configs import common  # noqa: E402
from contrastive_jax.data import pipeline  # noqa: E402
from contrastive_jax.data import sources as S  # noqa: E402


def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
  """``n`` distinct ~400x500 JPEGs (quality 90) cut and resized from skimage photos."""
  from skimage import data as skdata  # pylint: disable=g-import-not-at-top
  photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()]
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    im = photos[i % len(photos)]
    h, w = im.shape[:2]
    ch, cw = int(h * rng.uniform(0.7, 1.0)), int(w * rng.uniform(0.7, 1.0))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = tf.image.resize(im[y:y + ch, x:x + cw], [int(rng.integers(375, 425)),
                                                   int(rng.integers(475, 525))])
    crop = tf.cast(tf.clip_by_value(tf.round(crop), 0, 255), tf.uint8)
    out.append(tf.io.encode_jpeg(crop, quality=90).numpy())
  return out


def measure(config, batch: int, steps: int, warmup: int) -> tuple[float, float]:
  """(seconds to the first batch, images per second over ``steps`` batches)."""
  t0 = time.perf_counter()
  it = pipeline.train_iterator(config, mode="views", global_batch=batch, seed=0, process_index=0,
                        process_count=1)
  next(it)
  first = time.perf_counter() - t0
  for _ in range(warmup):
    next(it)
  t0 = time.perf_counter()
  for _ in range(steps):
    next(it)
  return first, batch * steps / (time.perf_counter() - t0)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--num_jpegs", type=int, default=256)
  parser.add_argument("--mnist_batch", type=int, default=256)
  args = parser.parse_args()
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    jpegs = make_jpegs(args.num_jpegs)
    S.write_image_text_tfrecords(((j, "photo") for j in jpegs), os.path.join(tmp, "bench"), 1)
    c = common.data_config("tfrecord", recipe="simclr", image_size=224, cache=True,
                           path=os.path.join(tmp, "bench-*.tfrecord"),
                           augment={"strength": 1.0, "blur": True})
    first, ips = measure(c, args.batch, args.steps, args.warmup)
    rows.append(("simclr 2 views, 224, JPEG ~400x500", args.batch, first, ips))

  c = common.data_config("mnist", recipe="simclr", image_size=32, augment={"strength": 0.5})
  first, ips = measure(c, args.mnist_batch, args.steps, args.warmup)
  rows.append(("mnist default (simclr s=0.5, 32, 2 views)", args.mnist_batch, first, ips))

  print(f"\n{cores} CPU core(s) visible, TensorFlow {tf.__version__}, "
        f"{args.steps} timed batches after {args.warmup} warm-up\n")
  print("| pipeline | batch | first batch (s) | images/s | images/s/core |")
  print("|---|---:|---:|---:|---:|")
  for name, b, first, ips in rows:
    print(f"| {name} | {b} | {first:.1f} | {ips:.0f} | {ips / cores:.0f} |")


if __name__ == "__main__":
  main()
