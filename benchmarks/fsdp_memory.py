"""Per-device memory of the CLIP train step, replicated vs FSDP, on simulated devices.

For each CLIP size (ViT-B/16, L/14, g/14, bigG/14 with open_clip's text towers) and each
``config.sharding.strategy``, the script builds the run with ``runs.build_run`` (bf16 compute,
float32 parameters, remat on, AdamW), compiles the jitted train step for a mesh of ``--devices``
simulated CPU devices with abstract inputs (nothing is allocated or run), and prints XLA's
per-device ``memory_analysis``: arguments (state shard + batch shard), temporaries, outputs not
aliased to donated arguments, and their total. The numbers are the compiled program's buffer
assignment on the CPU backend; a TPU/GPU compile schedules differently, so read them as
estimates of the same program's needs.

  python benchmarks/fsdp_memory.py                                  # 64 devices, all models
  python benchmarks/fsdp_memory.py --models clip_vit_bigg14 --per-device-batch 32 \\
      --strategies fsdp --mu-dtype bfloat16

The device count is set through ``XLA_FLAGS=--xla_force_host_platform_device_count`` before jax
is imported, so run it as its own process (it is not part of the test suite: bigG/14 compiles
for minutes on a small CPU).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

MODELS = ("clip_vit_b16", "clip_vit_l14", "clip_vit_g14", "clip_vit_bigg14")


def clip_config(preset: str, per_device_batch: int, devices: int, strategy: str,
                mu_dtype: str | None):
  """``configs/clip_vit_b32.py`` with the towers of ``models.registry.CLIP_PRESETS[preset]``."""
  from configs import clip_vit_b32
  from contrastive_jax.models import registry

  p = registry.CLIP_PRESETS[preset]
  c = clip_vit_b32.get_config(None)
  c.model.name = p["image_model"]
  c.model.kwargs = dict(p["image_kwargs"])
  c.text.kwargs = dict(p["text_kwargs"])  # OpenAI's 49,408-token vocabulary, context 77
  c.clip.embed_dim = p["embed_dim"]
  c.data.context_length = 77
  c.global_batch = per_device_batch * devices
  c.total_steps = 100_000  # shapes the schedule only
  c.dtype = "bfloat16"
  c.remat = True
  c.optim.mu_dtype = mu_dtype
  c.sharding.strategy = strategy
  return c


def measure(preset: str, per_device_batch: int, strategy: str, mu_dtype: str | None) -> dict:
  import jax
  from contrastive_jax import distributed, runs

  mesh = distributed.make_mesh(None)
  config = clip_config(preset, per_device_batch, mesh.size, strategy, mu_dtype)
  run = runs.build_run(config, mesh, num_steps=config.total_steps)
  t = time.perf_counter()
  compiled = run.train_step.lower(run.abstract_state, run.abstract_batch()).compile()
  compile_s = time.perf_counter() - t
  mem = compiled.memory_analysis()
  args, temp = mem.argument_size_in_bytes, mem.temp_size_in_bytes
  out = mem.output_size_in_bytes - mem.alias_size_in_bytes  # donated state reuses its buffers
  return dict(model=preset, strategy=strategy, params=run.num_params,
              state=run.state_bytes_per_device,
              args=args, temp=temp, out=out, total=args + temp + out, compile_s=compile_s,
              devices=mesh.size, image=config.data.image_size, jax=jax.__version__)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", type=int, default=64)
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--strategies", default="replicated,fsdp")
  parser.add_argument("--per-device-batch", type=int, default=32)
  parser.add_argument("--mu-dtype", default=None, choices=(None, "bfloat16"),
                      help="AdamW first-moment dtype (default float32)")
  args = parser.parse_args()

  # XLA:CPU's default concurrency-optimised scheduler runs independent work early, which
  # keeps every block's recomputed activations alive at once (remat then saves nothing: measured
  # 1,513 vs 1,497 MiB for 6 ViT-B blocks); the memory-minimising list scheduler is what TPU and
  # GPU compiles approximate, and it shows remat's saving (794 -> 618 MiB).
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.devices}"
                             " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # for `configs`
  import jax
  jax.config.update("jax_threefry_partitionable", True)
  jax.config.update("jax_platforms", "cpu")
  if jax.device_count() != args.devices:
    sys.exit(f"{jax.device_count()} devices visible, {args.devices} asked: run in a fresh process")

  gib = lambda b: f"{b / 2**30:,.2f}"  # noqa: E731
  global_batch = args.per_device_batch * args.devices
  print(f"{args.devices} simulated CPU devices, jax {jax.__version__}; CLIP, image 224, "
        f"context 77, {args.per_device_batch} pairs per device (global {global_batch}), "
        f"bf16 compute, float32 params, remat, AdamW (mu {args.mu_dtype or 'float32'}); "
        "compile only; GiB per device\n")
  print("| model | params | strategy | state | arguments | temporaries | outputs | total "
        "| compile s |")
  print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
  for model in filter(None, args.models.split(",")):
    for strategy in filter(None, args.strategies.split(",")):
      r = measure(model, args.per_device_batch, strategy, args.mu_dtype)
      print(f"| {model} | {r['params'] / 1e6:,.0f}M | {strategy} | {gib(r['state'])} "
            f"| {gib(r['args'])} | {gib(r['temp'])} | {gib(r['out'])} | {gib(r['total'])} "
            f"| {r['compile_s']:.0f} |")
      sys.stdout.flush()
  print("\nstate: the train state's bytes per device (params, AdamW moments, step, rng); "
        "arguments: state + batch shard; outputs: those not aliased to the donated state; "
        "total = arguments + temporaries + outputs (XLA memory_analysis of the compiled step).")


if __name__ == "__main__":
  main()
