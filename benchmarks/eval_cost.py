"""Compute cost of the in-loop evaluation of the CLIP / SigLIP configs, against training.

For each config (``clip_vit_b32``, ``siglip_vit_b16``, their real architectures, dtype and
remat), the script builds the run shape-first (``runs.build_run``: abstract state, nothing
initialised), and compiles, never runs, on the simulated CPU devices:

* the train step (forward, loss, backward, AdamW update) at a global batch ``--train-batch``;
* the evaluators' image encoder (``method.encode_image``) and text encoder
  (``method.encode_text``) at the config's ``eval.batch_size``, the jitted functions the
  evaluators call (``streaming.Encoders``).

FLOPs come from the compiled programs (``cost_analysis()["flops"]``, per device, times the
devices). Per-example costs are the program's FLOPs over its batch; the train step's is
scaled to the config's global batch (its only super-linear term, the ``B x B`` logits, is under
0.1% at 32k: printed). The in-loop evaluation is what ``config.eval.evaluators`` runs every
``every_steps`` steps: for each zero-shot evaluator its images plus C x T prompts, for each
retrieval evaluator its images plus K captions per image (sizes below: ImageNet validation
subset, COCO Karpathy 5k test). Its share of training compute is

    eval FLOPs per evaluation / (every_steps x train FLOPs per step).

  python benchmarks/eval_cost.py                       # both configs, image size as configured
  python benchmarks/eval_cost.py --image-size 112      # cheaper compile; FLOPs then differ

XLA counts a while-loop body once; these models have none (no scanned layers), and the
configs use the all-gather loss, not the ring's loop.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

CONFIGS = ("clip_vit_b32", "siglip_vit_b16")
# Examples per split the in-loop evaluators read (tfds split sizes).
SPLIT_SIZES = {("imagenet2012", "validation"): 50_000, ("coco_captions", "test"): 5_000,
               ("imagenet_v2", "test"): 10_000, ("imagenet_sketch", "test"): 50_889}


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", float("nan")))


def split_examples(data: dict) -> int:
  """Examples of ``data``'s eval split, a ``split[:n]`` slice counted as ``n``."""
  split = data["eval_split"]
  m = re.fullmatch(r"(\w+)\[:(\d+)\]", split)
  if m:
    return int(m.group(2))
  return SPLIT_SIZES[(data["name"], split)]


def in_loop_workload(config) -> tuple[int, int, int, list[str]]:
  """``(every_steps, images, texts, lines)`` of the evaluators that run in the loop."""
  from contrastive_jax.evaluate import class_names, runner, streaming

  specs = runner.specs_of(config, "image_text")
  due = {n: s for n, s in specs.items() if s["every_steps"]}
  every = sorted({s["every_steps"] for s in due.values()})
  if len(every) != 1:
    raise ValueError(f"expected one in-loop frequency, got {every}")
  images = texts = 0
  lines = []
  for name, spec in due.items():
    data = streaming.data_config(config, spec).to_dict()
    n = split_examples(data)
    if spec["type"] == "zero_shot":
      classes = len(class_names.subset_wnids(spec["wnids"])) if spec["wnids"] else 1000
      templates = (len(class_names.imagenet_templates()) if spec["templates"] == "clip"
                   else len(spec["templates"]))
      t = classes * templates
    elif spec["type"] == "retrieval":
      t = n * int(data["captions_per_image"] or 1)
    else:
      raise ValueError(f"{name}: in-loop {spec['type']} is not costed here")
    images, texts = images + n, texts + t
    lines.append(f"{name} ({spec['type']}): {n:,} images, {t:,} texts")
  return every[0], images, texts, lines


def measure(name: str, train_batch: int, image_size: int | None) -> dict:
  import importlib

  import jax
  import numpy as np

  from contrastive_jax import runs
  from contrastive_jax.evaluate import streaming

  config = importlib.import_module(f"contrastive_jax.configs.{name}").get_config(None)
  real_batch = config.global_batch
  every, eval_images, eval_texts, lines = in_loop_workload(config)
  if image_size:
    config.data.image_size = image_size
  config.global_batch = train_batch
  run = runs.build_run(config, runs.make_mesh(config), num_steps=1_000_000)
  mesh, devices = run.mesh, run.mesh.size
  t0 = time.perf_counter()
  train = _flops(run.train_step.lower(run.abstract_state, run.abstract_batch()).compile())
  train *= devices

  eb = int(config.eval.batch_size)
  s, length = int(config.data.image_size), int(config.data.context_length)
  batch_sharding = run.batch_sharding
  images = jax.ShapeDtypeStruct((eb, s, s, 3), np.float32, sharding=batch_sharding)
  tokens = jax.ShapeDtypeStruct((eb, length), np.int32, sharding=batch_sharding)
  enc = streaming.Encoders(run.method)
  img = _flops(enc.get("image_embedding", mesh).lower(run.abstract_state, images).compile())
  txt = _flops(enc.get("text_embedding", mesh).lower(run.abstract_state, tokens).compile())
  compile_s = time.perf_counter() - t0
  img, txt = img * devices / eb, txt * devices / eb
  train_per_example = train / train_batch
  train_step = train_per_example * real_batch
  logits = 2 * 2 * real_batch ** 2 * int(config.clip.embed_dim)  # fwd + bwd-ish, both ways
  eval_flops = eval_images * img + eval_texts * txt
  return dict(name=name, size=s, params=run.num_params, train_batch=train_batch,
              real_batch=real_batch, train_ex=train_per_example, train_step=train_step,
              logits_share=logits / train_step, img=img, txt=txt, eval_images=eval_images,
              eval_texts=eval_texts, eval=eval_flops, every=every,
              fraction=eval_flops / (every * train_step), lines=lines, compile_s=compile_s,
              devices=devices)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--configs", default=",".join(CONFIGS))
  parser.add_argument("--train-batch", type=int, default=64,
                      help="global batch the train step is compiled at (FLOPs scaled to the "
                      "config's batch)")
  parser.add_argument("--image-size", type=int, default=0,
                      help="override the configs' image size (0: as configured, 224)")
  parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
  args = parser.parse_args(argv)
  os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  jax.config.update("jax_threefry_partitionable", True)

  rows = [measure(n, args.train_batch, args.image_size or None)
          for n in args.configs.split(",") if n]
  g = 1e9
  print(f"\nIn-loop evaluation cost, from compiled programs ({jax.device_count()} CPU devices, "
        "compile only; FLOPs as XLA's cost_analysis counts them)\n")
  print("| config | image size | params | train GFLOP / example | train PFLOP / step (batch) "
        "| eval image GFLOP | eval text GFLOP | in-loop eval: images + texts | eval PFLOP "
        "| = train steps | every | share of training compute |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['name']} | {r['size']} | {r['params'] / 1e6:.0f}M | {r['train_ex'] / g:.1f} "
          f"| {r['train_step'] / 1e15:.2f} ({r['real_batch']:,}) | {r['img'] / g:.2f} "
          f"| {r['txt'] / g:.2f} | {r['eval_images']:,} + {r['eval_texts']:,} "
          f"| {r['eval'] / 1e15:.3f} | {r['eval'] / r['train_step']:.2f} | {r['every']:,} "
          f"| {100 * r['fraction']:.4f}% |")
  for r in rows:
    print(f"\n{r['name']}: " + "; ".join(r["lines"]) +
          f". Train step compiled at batch {r['train_batch']} and scaled; the B x B logits "
          f"at {r['real_batch']:,} are ~{100 * r['logits_share']:.2f}% of a step (estimated: "
          "4 B^2 E). "
          f"Compiles: {r['compile_s']:.0f} s.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
