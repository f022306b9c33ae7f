"""Throughput of the full jitted train step against this machine's dense matmul rate.

For each model the script builds the run from its config (``configs/*.py``) with the trainer's
run builder (``runs.build_run``: same state, shardings and jitted step as ``train.py``; the
``--sharding`` strategy), initialises the state, compiles the step (forward, contrastive loss,
backward, optimizer update) on synthetic batches of the right shapes, and reports:

* compile time (``lower().compile()``) and per-device temporary memory (``memory_analysis``);
* FLOPs per step from the compiled program (``cost_analysis()["flops"]``, times the devices);
* step time: the median of ``--steps`` timed steps after one warm-up step;
* examples/s and images/s (SimCLR: 2 views per example), achieved FLOP/s, and utilisation:
  achieved FLOP/s over the *ceiling*, the rate of a large dense ``jnp.dot`` in the same dtype
  timed in the same run on the same machine (a practical peak, not the datasheet's).

A second table compiles (never runs) the step with GradCache (``config.grad_cache``) at
several micro-batch counts and prints its temporary memory: what gradient caching saves at a
given batch.

  python benchmarks/train_step.py                        # all models, CPU-sized batches
  python benchmarks/train_step.py --dtype bfloat16 --steps 10 \\
      --models resnet50_simclr,vit_b16_clip --batch resnet50_simclr=256,vit_b16_clip=256
  python benchmarks/train_step.py --models '' --grad-cache-model vit_b16_clip \\
      --grad-cache-batch 64 --micro 1,2,4,8               # the GradCache table only

On a GPU host see ``benchmarks/gpu_check.sh``. XLA's cost model counts a while-loop body once,
so the GradCache table (whose micro-batch loops are scans) shows memory only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

# name -> (config module, config overrides, default batch on CPU)
MODELS = {
    "resnet50_simclr": ("simclr_resnet50_imagenet", {}, 8),
    "vit_b16_clip": ("clip_vit_b32", {"model.name": "vit_b16"}, 8),
    "resnet18_cifar_simclr": ("simclr_resnet18_cifar10", {}, 64),
    "convnet_mnist_simclr": ("simclr_mnist", {}, 256),
}


def build(name: str, batch: int, dtype: str, remat: bool, micro: int = 1,
          strategy: str = "replicated"):
  """``runs.Run`` of the model ``name`` at this batch, dtype and sharding strategy."""
  import importlib
  from contrastive_jax import configs, runs

  module, overrides, _ = MODELS[name]
  config = importlib.import_module(f"contrastive_jax.configs.{module}").get_config(None)
  configs.apply_overrides(config, overrides)
  config.global_batch = batch
  config.dtype = dtype
  config.remat = remat
  config.grad_cache.micro_batches = micro
  config.sharding.strategy = strategy
  return runs.build_run(config, runs.make_mesh(config), num_steps=1_000_000)


def synthetic_batch(config, method, abstract: bool = False):
  """Random global batch of the shapes the input pipeline yields (uniform [0, 1) images)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  b, s = config.global_batch, config.data.image_size
  shapes = ({"view1": ((b, s, s, 3), jnp.float32), "view2": ((b, s, s, 3), jnp.float32)}
            if method.input_mode == "views" else
            {"image": ((b, s, s, 3), jnp.float32),
             "tokens": ((b, int(config.data.context_length)), jnp.int32)})
  if abstract:
    return {k: jax.ShapeDtypeStruct(shape, dt) for k, (shape, dt) in shapes.items()}
  rs = np.random.RandomState(0)
  out = {}
  for k, (shape, dt) in shapes.items():
    out[k] = (rs.rand(*shape).astype(np.float32) if dt == jnp.float32
              else rs.randint(1, 1000, shape).astype(np.int32))
  return out


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", float("nan")))


def matmul_ceiling(dtype: str, n: int, repeats: int = 5) -> float:
  """FLOP/s of an ``[n, n] @ [n, n]`` ``jnp.dot`` in ``dtype``: the best of ``repeats``."""
  import jax
  import jax.numpy as jnp

  dt = jnp.dtype(dtype)
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dt)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dt)
  dot = jax.jit(jnp.dot)
  jax.block_until_ready(dot(a, b))
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(dot(a, b))
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 / best


def measure(name: str, batch: int, dtype: str, remat: bool, steps: int,
            strategy: str = "replicated") -> dict:
  import jax

  run = build(name, batch, dtype, remat, strategy=strategy)
  config, method, mesh = run.config, run.method, run.mesh
  state = run.init_state(0)
  batch_arrays = jax.device_put(synthetic_batch(config, method), run.batch_sharding)
  step = run.train_step
  t = time.perf_counter()
  compiled = step.lower(state, batch_arrays).compile()
  compile_s = time.perf_counter() - t
  flops = _flops(compiled) * mesh.size
  temp = compiled.memory_analysis().temp_size_in_bytes
  state, metrics = compiled(state, batch_arrays)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = compiled(state, batch_arrays)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  step_s = statistics.median(times)
  views = 2 if method.input_mode == "views" else 1
  return dict(name=name, batch=batch, size=config.data.image_size, compile_s=compile_s,
              temp=temp, flops=flops, step_s=step_s, examples_s=batch / step_s,
              images_s=views * batch / step_s, flops_s=flops / step_s,
              loss=float(metrics["loss"]), devices=mesh.size)


def grad_cache_table(name: str, batch: int, dtype: str, micros: list[int]) -> None:
  """Compile-only: temporary memory and FLOPs of the step for each micro-batch count."""
  print(f"\nGradCache: {name}, global batch {batch}, {dtype}, compile only (per device)\n")
  print("| micro-batches M | rows per micro-batch | temp memory | vs M=1 |")
  print("|---:|---:|---:|---:|")
  base = None
  for m in micros:
    run = build(name, batch, dtype, False, micro=m)
    compiled = run.train_step.lower(run.abstract_state, run.abstract_batch()).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    base = base or temp
    print(f"| {m} | {batch // m} | {temp / 2**20:,.1f} MiB | {temp / base:.2f}x |")
    sys.stdout.flush()
  print("\nM > 1 costs one extra forward pass of the global batch (about +1/3 of the model's "
        "FLOPs); XLA's cost_analysis counts each micro-batch loop body once, so its FLOP "
        "count is not shown for M > 1.")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default=",".join(MODELS),
                      help=f"comma-separated subset of {list(MODELS)} ('' for none)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
  parser.add_argument("--batch", default="",
                      help="per-model global batch overrides, e.g. resnet50_simclr=16,"
                           "vit_b16_clip=8 (default: the CPU-sized batches in MODELS)")
  parser.add_argument("--remat", action="store_true", help="config.remat=True for every model")
  parser.add_argument("--sharding", default="replicated", choices=("replicated", "fsdp"),
                      help="config.sharding.strategy for every model")
  parser.add_argument("--matmul-size", type=int, default=2048)
  parser.add_argument("--grad-cache-model", default="resnet18_cifar_simclr",
                      help="model of the GradCache memory table ('' skips it)")
  parser.add_argument("--grad-cache-batch", type=int, default=256)
  parser.add_argument("--micro", default="1,4", help="micro-batch counts of the GradCache table")
  args = parser.parse_args()

  import jax
  jax.config.update("jax_threefry_partitionable", True)

  names = [n for n in args.models.split(",") if n]
  unknown = sorted(set(names) - set(MODELS))
  if unknown:
    parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
  batches = {n: MODELS[n][2] for n in MODELS}
  for part in filter(None, args.batch.split(",")):
    key, _, value = part.partition("=")
    if key not in MODELS or not value.isdigit():
      parser.error(f"--batch entry {part!r}: use NAME=INT with NAME in {list(MODELS)}")
    batches[key] = int(value)

  devices = jax.devices()
  print(f"{len(devices)} x {devices[0].device_kind} ({jax.default_backend()}), jax "
        f"{jax.__version__}, compute dtype {args.dtype}, params float32, remat {args.remat}")
  ceiling = matmul_ceiling(args.dtype, args.matmul_size)
  print(f"ceiling at start: {args.matmul_size}x{args.matmul_size} {args.dtype} jnp.dot at "
        f"{ceiling / 1e9:,.1f} GFLOP/s per device\n")
  sys.stdout.flush()

  if names:
    print("| model | image | global batch | compile s | temp memory | GFLOP/step | step s "
          "| examples/s | images/s | achieved GFLOP/s | ceiling GFLOP/s | utilisation |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
      r = measure(name, batches[name], args.dtype, args.remat, args.steps, args.sharding)
      # Re-measured next to each model: on a shared machine the load drifts during a run.
      row_ceiling = matmul_ceiling(args.dtype, args.matmul_size)
      util = r["flops_s"] / (row_ceiling * r["devices"])
      print(f"| {name} | {r['size']} | {r['batch']} | {r['compile_s']:.1f} "
            f"| {r['temp'] / 2**20:,.0f} MiB | {r['flops'] / 1e9:,.1f} | {r['step_s']:.3f} "
            f"| {r['examples_s']:,.1f} | {r['images_s']:,.1f} | {r['flops_s'] / 1e9:,.1f} "
            f"| {row_ceiling / 1e9:,.1f} | {100 * util:.0f}% |")
      sys.stdout.flush()
    print(f"\nMedian of {args.steps} timed steps after 1 warm-up; FLOPs from XLA's "
          "cost_analysis of the compiled step; ceiling = best of 5 dense "
          f"{args.matmul_size}^2 jnp.dot in {args.dtype}, timed right after the model's steps; "
          "utilisation = achieved FLOP/s / (ceiling x devices). SimCLR images/s counts both "
          "views.")

  if args.grad_cache_model:
    grad_cache_table(args.grad_cache_model, args.grad_cache_batch, args.dtype,
                     [int(m) for m in args.micro.split(",")])


if __name__ == "__main__":
  main()
