"""Compile the CLIP train step for a GPU node that is not here, with the real XLA:GPU compiler.

Builds the run with ``runs.build_run`` (the training path: ``configs/clip_vit_b32.py`` with a
``models.registry.CLIP_PRESETS`` tower pair, bf16 compute, remat, AdamW) on the devices of a
``gpu_targets`` target (``contrastive_jax/gpu_targets.py``: jax's CUDA plugin and a device
description from the GPU's published figures), compiles the jitted train step with abstract
inputs, and prints per GPU: compile time, XLA's ``memory_analysis`` against the GPU's memory,
the step's FLOPs, the collectives in the compiled HLO, and the compute-bound step time at the
GPU's peak bf16 rate.

FLOPs: the GPU executable has no ``cost_analysis`` (GEMMs and convolutions are cuBLAS/cuDNN
custom calls XLA does not count), so they come from XLA's cost analysis of the program before
partitioning, divided by the number of GPUs: right for data parallelism (the optimizer update,
repeated on every GPU when replicated, is a rounding error next to the model). A loop body is
counted once.

  PYTHONPATH=.:/path/to/plugin python benchmarks/gpu_compile.py --target 8xa100-80gb
  python benchmarks/gpu_compile.py --target 1xrtx4090 --per-gpu-batch 32 --strategy replicated
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import re
import sys
import time

_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                "collective-permute")


def collective_counts(hlo_text: str) -> dict[str, int]:
  """How many of each collective op (start ops of async pairs included once) the HLO has."""
  counts = collections.Counter()
  for kind in _COLLECTIVES:
    counts[kind] = len(re.findall(rf"= [^=]*? {kind}(?:-start)?\(", hlo_text))
  return dict(counts)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--target", default="8xa100-80gb")
  parser.add_argument("--model", default="clip_vit_b16")
  parser.add_argument("--per-gpu-batch", type=int, default=128)
  parser.add_argument("--strategy", default="replicated", choices=("replicated", "fsdp"))
  args = parser.parse_args()

  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  root = pathlib.Path(__file__).resolve().parents[1]
  sys.path[:0] = [str(root), str(root / "benchmarks")]  # `configs`, `fsdp_memory`
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src.lib import xla_client  # pylint: disable=g-import-not-at-top
  import fsdp_memory  # pylint: disable=g-import-not-at-top
  from contrastive_jax import distributed, gpu_targets, runs  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_threefry_partitionable", True)

  spec = gpu_targets.GPU_SPECS[args.target]
  mesh = distributed.make_mesh(devices=gpu_targets.gpu_devices(args.target))
  config = fsdp_memory.clip_config(args.model, args.per_gpu_batch, mesh.size, args.strategy,
                                   None)
  run = runs.build_run(config, mesh, num_steps=config.total_steps)
  lowered = run.train_step.lower(run.abstract_state, run.abstract_batch())
  t = time.perf_counter()
  compiled = lowered.compile(compiler_options=gpu_targets.COMPILER_OPTIONS)
  compile_s = time.perf_counter() - t
  mem = compiled.memory_analysis()
  args_b, temp_b = mem.argument_size_in_bytes, mem.temp_size_in_bytes
  out_b = mem.output_size_in_bytes - mem.alias_size_in_bytes
  total = args_b + temp_b + out_b
  cost = xla_client._xla.hlo_module_cost_analysis(  # pylint: disable=protected-access
      jax.devices("cpu")[0].client, lowered.compiler_ir("hlo").get_hlo_module())
  flops = cost["flops"] / mesh.size
  colls = collective_counts(compiled.as_text())

  gib = lambda b: f"{b / 2**30:,.2f}"  # noqa: E731
  print(f"{args.model}, {args.per_gpu_batch} pairs per GPU (global {config.global_batch}), "
        f"{args.strategy}, image {config.data.image_size}, context {config.data.context_length}, "
        f"bf16 compute, remat, AdamW; target {args.target} ({spec['device_kind']}); "
        f"jax {jax.__version__}\n")
  print("| compile s | state GiB | arguments GiB | temporaries GiB | outputs GiB | total GiB "
        "| HBM GiB | TFLOP/step/GPU | compute bound ms | collectives |")
  print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
  colls_s = ", ".join(f"{k} {v}" for k, v in colls.items() if v) or "none"
  print(f"| {compile_s:.0f} | {gib(run.state_bytes_per_device)} | {gib(args_b)} | "
        f"{gib(temp_b)} | {gib(out_b)} | {gib(total)} | {gib(spec['hbm_bytes'])} | "
        f"{flops / 1e12:.2f} | {1e3 * flops / spec['peak_bf16_flops']:.0f} | {colls_s} |")
  print(f"\ncompute bound: FLOPs / peak bf16 {spec['peak_bf16_flops'] / 1e12:.0f} TFLOP/s "
        f"({spec['source']}); no GPU has run this program, so it is a floor, not a forecast.")
  if total > spec["hbm_bytes"]:
    print(f"\ndoes NOT fit: {gib(total)} GiB > {gib(spec['hbm_bytes'])} GiB per GPU; use "
          "config.sharding.strategy='fsdp', config.grad_cache.micro_batches, or a smaller "
          "per-GPU batch")


if __name__ == "__main__":
  main()
