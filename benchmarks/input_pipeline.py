"""Input-pipeline benchmarks: start-up and resume cost at scale, and augmentation throughput.

Parts (``--parts``, default all):

* ``startup``: time to the first batch and time to resume at step N (a fresh iterator with
  ``start_step=N``, as after a preemption) of the streaming TFRecord path, on generated shards
  of 10k and 1M records (1,000 records per file, each a 16x16 JPEG and a caption, ~0.4 KB;
  kept under ``--data_dir``, default ``/tmp/contrastive_jax_bench_input``: ~4 MB and ~400 MB).
  Also the cost of the counting pass that a start without an index pays (what start-up read
  before the shard index existed).
* ``simclr``: images per second of the SimCLR two-view recipe at 224 px, with and without
  blur, on a folder of ImageNet-sized (~400x500) JPEGs made from skimage photos; next to it,
  when torchvision is importable, torchvision's standard SimCLR transforms (RandomResizedCrop,
  flip, ColorJitter(0.8, 0.8, 0.8, 0.2) p=0.8, RandomGrayscale 0.2, GaussianBlur p=0.5 with a
  23-pixel kernel) in a DataLoader with one worker per core, on the same files, in a child
  process (``torchvision_simclr.py``). ``--rounds R`` runs every pipeline R times, alternating,
  and prints each round's ratio and the load average: on a shared machine the ratio of
  neighbouring runs is the figure to trust, not the absolute rates.
* ``stages``: CPU milliseconds per source image (two views at 224 px) of each stage of a
  recipe (``--recipes``, default simclr,mocov2,mocov3,clip) on one core: decode, crop and
  resize, flip, colour jitter, grayscale, blur, solarize, normalisation, each switched on in
  turn at the recipe's probability, so a row's increment is that stage's average cost. Every
  row runs the library's own ``augment_view`` in a single-threaded tf.data map over the JPEG
  folder and is timed in process CPU time (``time.process_time``), the minimum of ``--rounds``
  rounds taken in turn: CPU time, unlike wall time, barely moves when other jobs share the
  machine. With torchvision installed, the same for its SimCLR transforms on PIL images, one
  thread, no DataLoader (``torchvision_simclr.py --cpu_time``): the per-core ratio.
* ``mnist``: the embedded MNIST default (32x32, SimCLR recipe at strength 0.5, no blur).

An "image" is one source example; each yields two augmented views. Usage:

  python benchmarks/input_pipeline.py --steps 20 --batch 64

Prints markdown tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from contrastive_jax.configs import common  # noqa: E402
from contrastive_jax.data import augment as A  # noqa: E402
from contrastive_jax.data import pipeline, records  # noqa: E402
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


def write_shards(folder: str, num_records: int, per_file: int = 1000) -> str:
  """Generated shards of ``num_records`` tiny records in ``folder`` (reused when complete);
  returns their glob."""
  pattern = os.path.join(folder, "gen-*.tfrecord")
  num_files = -(-num_records // per_file)
  if os.path.exists(os.path.join(folder, "gen.index.json")):
    return pattern
  os.makedirs(folder, exist_ok=True)
  image = tf.io.encode_jpeg(np.random.default_rng(0).integers(0, 256, (16, 16, 3),
                                                               np.uint8)).numpy()
  record = tf.train.Example(features=tf.train.Features(feature={
      "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
      "caption": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"a generated image"])),
      "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[0])),
  })).SerializeToString()
  files, counts = [], []
  for i in range(num_files):
    n = min(per_file, num_records - i * per_file)
    path = os.path.join(folder, f"gen-{i:05d}-of-{num_files:05d}.tfrecord")
    with tf.io.TFRecordWriter(path) as w:
      for _ in range(n):
        w.write(record)
    files.append(path)
    counts.append(n)
  S.write_tfrecord_index(files, counts, os.path.join(folder, "gen.index.json"))
  return pattern


def startup_rows(data_dir: str, sizes, batch: int, resume_step: int):
  rows = []
  for n in sizes:
    pattern = write_shards(os.path.join(data_dir, f"records_{n}"), n)
    c = common.data_config("tfrecord", path=pattern, image_size=32, recipe="clip",
                           skip_corrupt=True)  # as the CLIP / SigLIP configs

    def first_batch(step):
      t0 = time.perf_counter()
      it = pipeline.train_iterator(c, mode="views", global_batch=batch, seed=0, start_step=step,
                            process_index=0, process_count=1)
      next(it)
      return time.perf_counter() - t0, it.stats

    first, _ = first_batch(0)
    resume, stats = first_batch(resume_step)
    files = S.tfrecord_files(pattern)
    t0 = time.perf_counter()
    total = sum(records.count_examples(tf.data.TFRecordDataset(f)) for f in files)
    count = time.perf_counter() - t0
    assert total == n
    size = sum(os.path.getsize(f) for f in files) / 2**20
    rows.append((n, len(files), size, first, resume, stats, count))
  return rows


def write_jpeg_folder(folder: str, num: int) -> str:
  if not os.path.isdir(os.path.join(folder, "photos")):
    os.makedirs(os.path.join(folder, "photos"))
    for i, jpeg in enumerate(make_jpegs(num)):
      with open(os.path.join(folder, "photos", f"{i:05d}.jpg"), "wb") as f:
        f.write(jpeg)
  return folder


def _loadavg() -> str:
  with open("/proc/loadavg") as f:
    return " ".join(f.read().split()[:3])


def torchvision_rate(folder: str, batch: int, steps: int, warmup: int, blur: bool,
                     workers: int) -> float | None:
  """Images/s of torchvision's SimCLR transforms in a DataLoader (``torchvision_simclr.py``,
  in a child process); None without torchvision."""
  if importlib.util.find_spec("torchvision") is None:
    return None
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchvision_simclr.py")
  out = subprocess.run(
      [sys.executable, script, "--folder", folder, "--batch", str(batch), "--steps",
       str(steps), "--warmup", str(warmup), "--blur", str(int(blur)), "--workers",
       str(workers)], check=True, capture_output=True, text=True)
  return float(json.loads(out.stdout.strip().splitlines()[-1])["images_per_s"])


_STAGE_OFF = dict(flip_prob=0.0, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=(0.0, 0.0),
                  solarize_prob=(0.0, 0.0), normalize=None)
# (row name, the AugmentConfig fields that switch the stage on at the recipe's setting)
_STAGES = (("crop + resize", ()), ("flip", ("flip_prob",)), ("colour jitter", ("jitter_prob",)),
           ("grayscale", ("grayscale_prob",)), ("blur", ("blur_prob",)),
           ("solarize", ("solarize_prob",)), ("normalise", ("normalize",)))


def _cpu_ms_per_image(fn, datas: list[bytes], passes: int = 2) -> float:
  """CPU ms per element of ``fn(jpeg_bytes, index)`` over ``datas`` in a one-thread tf.data
  map (the best of ``passes`` passes after a warm-up pass)."""
  ds = tf.data.Dataset.from_tensor_slices((tf.constant(datas),
                                           tf.range(len(datas), dtype=tf.int64)))
  ds = ds.map(fn, num_parallel_calls=1).batch(16)
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  options.autotune.enabled = False
  ds = ds.with_options(options)
  for _ in ds:  # traces and warms up
    pass
  best = float("inf")
  for _ in range(passes):
    t0 = time.process_time()
    for _ in ds:
      pass
    best = min(best, time.process_time() - t0)
  return 1e3 * best / len(datas)


def stage_rows(folder: str, recipe: str, rounds: int) -> list[tuple[str, float]]:
  """Cumulative CPU ms per image (two views at 224) as each stage of ``recipe`` is switched
  on: ``[(stage, ms)]``, the minimum over ``rounds``."""
  files = sorted(tf.io.gfile.glob(os.path.join(folder, "photos", "*.jpg")))
  datas = [tf.io.gfile.GFile(f, "rb").read() for f in files]
  full = A.recipe_config(recipe, 224, {"blur": True})
  fns = [("decode", lambda d, i: tf.shape(tf.io.decode_jpeg(d, channels=3)))]
  cur = dict(_STAGE_OFF)
  for name, fields in _STAGES:
    cur.update({f: getattr(full, f) for f in fields})
    if any(cur[f] == _STAGE_OFF[f] for f in fields):
      continue  # the recipe does not have this stage
    cfg = dataclasses.replace(full, **cur)

    def fn(data, i, cfg=cfg):
      image = tf.io.decode_jpeg(data, channels=3)
      return tf.stack(A.two_views(image, A.example_seed(0, 0, i), cfg))
    fns.append((name, fn))
  best = {name: float("inf") for name, _ in fns}
  for _ in range(rounds):
    for name, fn in fns:
      best[name] = min(best[name], _cpu_ms_per_image(fn, datas))
  return [(name, best[name]) for name, _ in fns]


def torchvision_cpu_ms(folder: str, blur: bool, rounds: int) -> float | None:
  """CPU ms per image of torchvision's SimCLR transforms, one thread, in a child process."""
  if importlib.util.find_spec("torchvision") is None:
    return None
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchvision_simclr.py")
  out = subprocess.run([sys.executable, script, "--folder", folder, "--blur", str(int(blur)),
                        "--cpu_time", "1", "--rounds", str(rounds)],
                       check=True, capture_output=True, text=True)
  return float(json.loads(out.stdout.strip().splitlines()[-1])["cpu_ms_per_image"])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--parts", default="startup,simclr,mnist")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--num_jpegs", type=int, default=256)
  parser.add_argument("--rounds", type=int, default=1)
  parser.add_argument("--mnist_batch", type=int, default=256)
  parser.add_argument("--sizes", default="10000,1000000")
  parser.add_argument("--startup_batch", type=int, default=256)
  parser.add_argument("--resume_step", type=int, default=2000)
  parser.add_argument("--data_dir", default="/tmp/contrastive_jax_bench_input")
  parser.add_argument("--recipes", default="simclr,mocov2,mocov3,clip")
  args = parser.parse_args()
  parts = set(args.parts.split(","))
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  print(f"\n{cores} CPU core(s) visible, TensorFlow {tf.__version__}")

  if "startup" in parts:
    rows = startup_rows(args.data_dir, [int(x) for x in args.sizes.split(",")],
                        args.startup_batch, args.resume_step)
    print(f"\nStreaming TFRecord start-up (skip_corrupt=True, local batch "
          f"{args.startup_batch}, window 10,000, 16 files in parallel; resume at step "
          f"{args.resume_step}):\n")
    print("| records | files | MiB | first batch (s) | resume (s) | resume position (epoch, "
          "window, offset) | records re-read | counting pass without index (s) |")
    print("|---:|---:|---:|---:|---:|---|---:|---:|")
    for n, nf, size, first, resume, stats, count in rows:
      print(f"| {n:,} | {nf:,} | {size:.0f} | {first:.2f} | {resume:.2f} | "
            f"{stats['resume_position']} | {stats['resume_records_skipped']:,} | {count:.1f} |")
    if len(rows) > 1:
      print(f"\nlargest / smallest: first batch {rows[-1][3] / rows[0][3]:.2f}x, resume "
            f"{rows[-1][4] / rows[0][4]:.2f}x")

  if "simclr" in parts:
    folder = write_jpeg_folder(os.path.join(args.data_dir, "jpegs"), args.num_jpegs)
    print(f"\nSimCLR two views at 224 px from {args.num_jpegs} ~400x500 JPEG files "
          f"({folder}), batch {args.batch}, {args.steps} timed batches after "
          f"{args.warmup} warm-up, {args.rounds} round(s); in each round every pipeline "
          "runs once, one after the other, so that a change of load on a shared machine "
          "falls on all of them:\n")
    rates: dict[tuple[str, bool], list[float]] = {}
    loads = [_loadavg()]
    for _ in range(args.rounds):
      for blur in (True, False):
        for crop_decode in ("off", "on"):
          c = common.data_config("folder", path=folder, image_size=224, recipe="simclr",
                                 augment={"strength": 1.0, "blur": blur},
                                 crop_decode=crop_decode)
          rates.setdefault((crop_decode, blur), []).append(
              measure(c, args.batch, args.steps, args.warmup)[1])
        tv = torchvision_rate(folder, args.batch, args.steps, args.warmup, blur, cores)
        if tv is not None:
          rates.setdefault(("torchvision", blur), []).append(tv)
      loads.append(_loadavg())
    names = {"off": "contrastive_jax tf.data, full decode",
             "on": "contrastive_jax tf.data, crop-window decode",
             "torchvision": f"torchvision DataLoader, {cores} workers"}
    print("| pipeline | blur | images/s (median of rounds) | images/s/core | "
          "x torchvision (per round) |")
    print("|---|---|---:|---:|---|")
    for blur in (True, False):
      tv = rates.get(("torchvision", blur))
      for kind in ("off", "on", "torchvision"):
        r = rates.get((kind, blur))
        if r is None:
          print(f"| {names[kind]} | {blur} | not installed | - | - |")
          continue
        ratio = "-" if tv is None or kind == "torchvision" else ", ".join(
            f"{a / t:.2f}" for a, t in zip(r, tv))
        med = float(np.median(r))
        print(f"| {names[kind]} | {blur} | {med:.0f} | {med / cores:.0f} | {ratio} |")
    print(f"\nload average (1, 5, 15 min) before and after each round: {loads}")

  if "stages" in parts:
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    folder = write_jpeg_folder(os.path.join(args.data_dir, "jpegs"), args.num_jpegs)
    print(f"\nCPU ms per image (two views at 224 px, {args.num_jpegs} ~400x500 JPEGs, one "
          f"thread, process CPU time, best of {args.rounds} round(s)); each row adds one "
          "stage at the recipe's probability:\n")
    loads = [_loadavg()]
    for recipe in args.recipes.split(","):
      rows = stage_rows(folder, recipe, args.rounds)
      print(f"| {recipe} | cumulative ms | stage ms |\n|---|---:|---:|")
      prev = 0.0
      for name, ms in rows:
        print(f"| {name} | {ms:.2f} | {ms - prev:+.2f} |")
        prev = ms
      print(f"| **images per CPU-second** | {1e3 / prev:.0f} | |\n", flush=True)
    for blur in (False, True):
      tv = torchvision_cpu_ms(folder, blur, args.rounds)
      if tv is not None:
        print(f"torchvision SimCLR transforms (PIL, one thread), blur={blur}: {tv:.2f} ms per "
              f"image, {1e3 / tv:.0f} images per CPU-second")
    loads.append(_loadavg())
    print(f"\nload average (1, 5, 15 min) before and after: {loads}")

  if "mnist" in parts:
    c = common.data_config("mnist", recipe="simclr", image_size=32, augment={"strength": 0.5})
    first, ips = measure(c, args.mnist_batch, args.steps, args.warmup)
    print(f"\nmnist default (simclr s=0.5, 32, 2 views), batch {args.mnist_batch}: first "
          f"batch {first:.1f} s, {ips:.0f} images/s, {ips / cores:.0f} images/s/core")


if __name__ == "__main__":
  main()
