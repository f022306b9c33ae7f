"""Per-device memory and FLOPs of loss + gradient: global-view jit, shard_map all-gather, ring.

Compiles (never runs) each variant on simulated CPU devices and reads the executable's
``memory_analysis()`` (temporary buffers per device) and ``cost_analysis()`` (FLOPs per device).

  python benchmarks/loss_scaling.py [--devices 8] [--dim 128] [--batches 1024,...,262144]
      [--local-batch 1024] [--scaling-devices 2,4,8] [--losses nt_xent,clip]

Prints two markdown tables. The first grows the global batch on ``--devices`` devices: the
all-gather loss holds [n, N] logits per device, the ring (``ring_losses``) one [n, n] block, so
the ratio ring/all-gather falls like 1/W. The second fixes the local batch and grows the
device count (meshes over the first k of the ``--devices`` simulated devices): the ring's
memory stays flat while the all-gather's grows with the global batch. Numbers are exact
properties of the compiled programs, not timings.
"""

from __future__ import annotations

import argparse
import os
import sys


FLOP_NOTE = ("\n*XLA's cost_analysis counts a while-loop body once; the ring's figure is that "
             "count times the W hops (an estimate: the few non-loop FLOPs are multiplied too).")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--batches", default="1024,4096,16384,65536,131072,262144")
  parser.add_argument("--losses", default="nt_xent,clip")
  parser.add_argument("--local-batch", type=int, default=1024,
                      help="rows per device of the second table (0 skips it)")
  parser.add_argument("--scaling-devices", default="2,4,8",
                      help="device counts of the second table, each <= --devices")
  parser.add_argument("--no-global-view", action="store_true",
                      help="skip the global-view jit column (slow to compile at large N)")
  args = parser.parse_args()
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"

  import jax
  import jax.numpy as jnp
  from contrastive_jax import distributed, losses, ring_losses

  scalar = {"nt_xent": (0.1,), "clip": (10.0,), "moco_v3": (0.2,), "siglip": (10.0, -10.0)}

  def compiled_stats(fn, mesh, n):
    x = jax.ShapeDtypeStruct((n, args.dim), jnp.float32,
                             sharding=distributed.data_sharding(mesh))
    step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
    c = step.lower(x, x).compile()
    cost = c.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return c.memory_analysis().temp_size_in_bytes, cost.get("flops", float("nan"))

  def variants(name, mesh):
    values = scalar[name]
    gather = losses.sharded(losses.LOSSES[name], mesh)
    ring = losses.sharded(ring_losses.get_loss(name, "ring"), mesh)
    return (lambda a, b: losses.LOSSES[name](a, b, *values),
            lambda a, b: gather(a, b, *values),
            lambda a, b: ring(a, b, *values))

  mib = lambda b: f"{b / 2**20:,.1f} MiB"
  mesh = distributed.make_mesh(args.devices)
  print(f"{args.devices} devices, embedding dim {args.dim}, float32; per-device figures of "
        "value_and_grad\n")
  print("| loss | global batch | local rows | global-view temp | all-gather temp | ring temp "
        "| ring / all-gather | global-view GFLOP | all-gather GFLOP | ring GFLOP* |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for name in args.losses.split(","):
    plain, gather, ring = variants(name, mesh)
    for n in (int(b) for b in args.batches.split(",")):
      if args.no_global_view:
        t_plain, f_plain = float("nan"), float("nan")
      else:
        t_plain, f_plain = compiled_stats(plain, mesh, n)
      t_gather, f_gather = compiled_stats(gather, mesh, n)
      t_ring, f_ring = compiled_stats(ring, mesh, n)
      plain_mem = "-" if args.no_global_view else mib(t_plain)
      print(f"| {name} | {n:,} | {n // args.devices:,} | {plain_mem} | {mib(t_gather)} "
            f"| {mib(t_ring)} | 1/{t_gather / t_ring:,.1f} | {f_plain / 1e9:,.2f} "
            f"| {f_gather / 1e9:,.2f} | {args.devices * f_ring / 1e9:,.2f} |")
      sys.stdout.flush()
  print(FLOP_NOTE)

  if args.local_batch <= 0:
    return
  print(f"\nFixed local batch {args.local_batch:,} rows per device, growing device count\n")
  print("| loss | devices | global batch | all-gather temp | ring temp | ring / all-gather "
        "| all-gather GFLOP | ring GFLOP* |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|")
  for name in args.losses.split(","):
    for k in (int(d) for d in args.scaling_devices.split(",")):
      sub = distributed.make_mesh(k)
      _, gather, ring = variants(name, sub)
      n = k * args.local_batch
      t_gather, f_gather = compiled_stats(gather, sub, n)
      t_ring, f_ring = compiled_stats(ring, sub, n)
      print(f"| {name} | {k} | {n:,} | {mib(t_gather)} | {mib(t_ring)} "
            f"| 1/{t_gather / t_ring:,.1f} | {f_gather / 1e9:,.2f} | {k * f_ring / 1e9:,.2f} |")
      sys.stdout.flush()
  print(FLOP_NOTE)


if __name__ == "__main__":
  main()
