"""Per-stage CPU cost of a two-view recipe on one core: tf.data against the same graph in a
plain TensorFlow session, next to torchvision, measured side by side.

For ``--recipe`` (default simclr, blur off with ``--blur 0``), each row switches one more
stage of the library's own ``augment.two_views`` on at the recipe's probability (decode,
crop + resize, flip, colour jitter, grayscale, blur) and times the two views of every JPEG
in process CPU time on one thread, two ways:

* ``tf.data``: a ``Dataset.map`` with one thread (private pool of 1, no intra-op
  parallelism), as ``data/throughput.py`` and the training pipeline run it;
* ``session``: the same ops built once into a ``tf.compat.v1`` graph and run by a session
  with one intra-op and one inter-op thread, one JPEG per ``run``;
* ``py_function`` (full recipe only): the same one-thread tf.data map, but its function calls
  the recipe as a ``tf.function`` through ``tf.py_function`` (the tf.function call path
  optimises the graph as a session does; same random draws, rounding differs by ~1e-6).

The two differ only in how TensorFlow executes the graph (grappler and control-flow
lowering run on a session's graph), so their gap per stage is executor overhead, not
arithmetic. Each round runs every row and then torchvision's SimCLR transforms on PIL
images (``torchvision_simclr.py --cpu_time 1``, one thread, no DataLoader) on the same
files, so a change of load falls on all of them; the ratio to torchvision is given per
round. The JPEGs are the ~400x500 skimage photos of ``input_pipeline.py``.

  python benchmarks/input_profile.py --num_jpegs 48 --rounds 3 --blur 0
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import input_pipeline  # noqa: E402  pylint: disable=g-import-not-at-top

from contrastive_jax.data import augment as A  # noqa: E402

_OFF = dict(flip_prob=0.0, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=(0.0, 0.0),
            solarize_prob=(0.0, 0.0), normalize=None)
_STAGES = (("crop + resize", ()), ("flip", ("flip_prob",)), ("colour jitter", ("jitter_prob",)),
           ("grayscale", ("grayscale_prob",)), ("blur", ("blur_prob",)),
           ("solarize", ("solarize_prob",)), ("normalise", ("normalize",)))


def stage_fns(recipe: str, blur: bool):
  """``[(row, fn(jpeg_bytes, index) -> tensor)]``, cumulative stages of ``recipe``."""
  full = A.recipe_config(recipe, 224, {"blur": blur})
  fns = [("decode", lambda d, i: tf.shape(tf.io.decode_jpeg(d, channels=3)))]
  cur = dict(_OFF)
  for name, fields in _STAGES:
    cur.update({f: getattr(full, f) for f in fields})
    if any(cur[f] == _OFF[f] for f in fields):
      continue  # the recipe (or --blur 0) does not have this stage

    def fn(data, i, cfg=dataclasses.replace(full, **cur)):
      image = tf.io.decode_jpeg(data, channels=3)
      return tf.stack(A.two_views(image, A.example_seed(0, 0, i), cfg))
    fns.append((name, fn))
  return fns


def tfdata_ms(fn, datas: list[bytes]) -> float:
  """CPU ms per JPEG of ``fn`` in a one-thread tf.data map (one pass after a warm-up)."""
  return input_pipeline._cpu_ms_per_image(fn, datas, passes=1)  # pylint: disable=protected-access


def session_ms(fn, datas: list[bytes]) -> float:
  """CPU ms per JPEG of ``fn`` built into a graph and run by a one-thread session."""
  tf1 = tf.compat.v1
  graph = tf.Graph()
  with graph.as_default():
    data = tf1.placeholder(tf.string, [])
    index = tf1.placeholder(tf.int64, [])
    out = fn(data, index)
  config = tf1.ConfigProto(intra_op_parallelism_threads=1, inter_op_parallelism_threads=1)
  with tf1.Session(graph=graph, config=config) as sess:
    for k, d in enumerate(datas[:8]):
      sess.run(out, {data: d, index: k})
    t0 = time.process_time()
    for k, d in enumerate(datas):
      sess.run(out, {data: d, index: k})
    return 1e3 * (time.process_time() - t0) / len(datas)


def py_function_ms(fn, datas: list[bytes]) -> float:
  """CPU ms per JPEG of ``fn`` as a ``tf.function`` called through ``tf.py_function`` in a
  one-thread tf.data map."""
  inner = tf.function(fn)

  def outer(data, index):
    out = tf.py_function(inner, [data, index], tf.float32)
    out.set_shape(inner.get_concrete_function(
        tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.int64)).output_shapes)
    return out
  return tfdata_ms(outer, datas)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--recipe", default="simclr")
  parser.add_argument("--blur", type=int, default=0)
  parser.add_argument("--num_jpegs", type=int, default=48)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--data_dir", default="/tmp/contrastive_jax_bench_input")
  args = parser.parse_args()
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)
  folder = input_pipeline.write_jpeg_folder(os.path.join(args.data_dir, "jpegs"),
                                            args.num_jpegs)
  files = sorted(tf.io.gfile.glob(os.path.join(folder, "photos", "*.jpg")))[:args.num_jpegs]
  datas = [tf.io.gfile.GFile(f, "rb").read() for f in files]
  fns = stage_fns(args.recipe, bool(args.blur))
  runs: dict[str, list[float]] = {}
  loads = [input_pipeline._loadavg()]  # pylint: disable=protected-access
  for _ in range(args.rounds):
    for name, fn in fns:
      runs.setdefault(("tf.data", name), []).append(tfdata_ms(fn, datas))
      runs.setdefault(("session", name), []).append(session_ms(fn, datas))
    runs.setdefault(("py_function", ""), []).append(py_function_ms(fns[-1][1], datas))
    if args.recipe == "simclr":
      tv = input_pipeline.torchvision_cpu_ms(folder, bool(args.blur), 1)
      if tv is not None:
        runs.setdefault(("torchvision", ""), []).append(tv)
    loads.append(input_pipeline._loadavg())  # pylint: disable=protected-access
  print(f"\n{args.recipe}, blur={bool(args.blur)}: CPU ms per JPEG (two views at 224 px, "
        f"{len(datas)} ~400x500 JPEGs, one thread); cumulative, per round; stage = "
        "increment of the round minima\n")
  print("| stage | tf.data ms (rounds) | stage | session ms (rounds) | stage |")
  print("|---|---|---:|---|---:|")
  prev = {"tf.data": 0.0, "session": 0.0}
  for name, _ in fns:
    cells = []
    for kind in ("tf.data", "session"):
      r = runs[(kind, name)]
      cells += [", ".join(f"{v:.2f}" for v in r), f"{min(r) - prev[kind]:+.2f}"]
      prev[kind] = min(r)
    print(f"| {name} | " + " | ".join(cells) + " |")
  last = fns[-1][0]
  runs.update({("py_function", last): runs[("py_function", "")]})
  print(f"\nfull recipe, tf.data map calling a tf.function through tf.py_function, ms per "
        f"round: {', '.join(f'{v:.2f}' for v in runs[('py_function', last)])}")
  tv = runs.get(("torchvision", ""))
  if tv:
    print(f"\ntorchvision (PIL, one thread) ms per round: {', '.join(f'{v:.2f}' for v in tv)}")
    for kind in ("tf.data", "session", "py_function"):
      ratios = [t / o for t, o in zip(tv, runs[(kind, last)])]
      print(f"torchvision / {kind} per round: {', '.join(f'{v:.2f}x' for v in ratios)}")
  print(f"\nload average (1, 5, 15 min) before and after each round: {loads}")


if __name__ == "__main__":
  main()
