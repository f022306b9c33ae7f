"""Per-device memory and FLOPs of loss + gradient, global-view jit vs shard_map local rows.

Compiles (never runs) each variant on N simulated CPU devices and reads the executable's
``memory_analysis()`` (temporary buffers per device) and ``cost_analysis()`` (FLOPs per device).

  python benchmarks/loss_scaling.py [--devices 8] [--dim 128] [--batches 1024,4096,16384,65536]

Prints a markdown table. Numbers are exact properties of the compiled programs, not timings.
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--batches", default="1024,4096,16384,65536")
  parser.add_argument("--losses", default="nt_xent,clip")
  args = parser.parse_args()
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"

  import jax
  import jax.numpy as jnp
  from contrastive_jax import distributed, losses

  mesh = distributed.make_mesh(args.devices)
  shard = distributed.data_sharding(mesh)
  scalar = {"nt_xent": 0.1, "clip": 10.0}

  def compiled_stats(fn, n):
    x = jax.ShapeDtypeStruct((n, args.dim), jnp.float32, sharding=shard)
    step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
    c = step.lower(x, x).compile()
    mem = c.memory_analysis()
    cost = c.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return mem.temp_size_in_bytes, cost.get("flops", float("nan"))

  print(f"{args.devices} devices, embedding dim {args.dim}, float32; per-device figures\n")
  print("| loss | global batch | local rows | global-view temp | shard_map temp "
        "| global-view GFLOP | shard_map GFLOP |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  for name in args.losses.split(","):
    fn, value = losses.LOSSES[name], scalar[name]
    plain = lambda a, b, fn=fn, value=value: fn(a, b, value)
    global_fn = losses.sharded(fn, mesh)
    local = lambda a, b, g=global_fn, value=value: g(a, b, value)
    for n in (int(b) for b in args.batches.split(",")):
      t_plain, f_plain = compiled_stats(plain, n)
      t_local, f_local = compiled_stats(local, n)
      print(f"| {name} | {n:,} | {n // args.devices:,} | {t_plain / 2**20:,.1f} MiB "
            f"| {t_local / 2**20:,.1f} MiB | {f_plain / 1e9:,.2f} | {f_local / 1e9:,.2f} |")
      sys.stdout.flush()


if __name__ == "__main__":
  main()
