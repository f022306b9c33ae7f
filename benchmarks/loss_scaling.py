"""Per-device memory and FLOPs of loss + gradient: global-view jit, all-gather, ring, tiled ring.

Compiles (never runs) each variant on simulated CPU devices and reads the executable's
``memory_analysis()`` (temporary buffers per device) and ``cost_analysis()`` (FLOPs per device).

  python benchmarks/loss_scaling.py [--devices 8] [--dim 128] [--batches 1024,...,262144]
      [--local-batch 1024] [--scaling-devices 2,4,8] [--losses nt_xent,clip] [--tile 1024]
      [--large-batches 1048576,4194304] [--large-dim 512] [--speed-batch 8192]

Prints up to four markdown tables. The first grows the global batch on ``--devices`` devices:
the all-gather loss holds [n, N] logits per device, the ring (``losses.ring``) one [n, n] block,
the tiled ring (``tile=--tile``) one [tile, tile] tile, so its memory is O(n x D). The second
fixes the local batch and grows the device count (meshes over the first k of the ``--devices``
simulated devices): the rings' memory stays flat while the all-gather's grows with the global
batch. The third is the very large batches (``--large-batches`` at ``--large-dim``; the
all-gather and untiled ring are compiled too, their figures are what they would need). These
numbers are exact properties of the compiled programs, not timings. The fourth *runs* the ring
and the tiled ring side by side at ``--speed-batch`` (CPU, wall clock; 0 skips it).
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
  parser.add_argument("--tile", type=int, default=1024, help="tile of the tiled ring")
  parser.add_argument("--large-batches", default="1048576,4194304",
                      help="global batches of the third table ('' skips it)")
  parser.add_argument("--large-dim", type=int, default=512)
  parser.add_argument("--large-losses", default="clip,nt_xent,moco_v3,siglip")
  parser.add_argument("--speed-batch", type=int, default=8192,
                      help="global batch of the timed ring vs tiled ring table (0 skips it)")
  parser.add_argument("--speed-tiles", default="256,1024")
  parser.add_argument("--speed-losses", default="clip")
  args = parser.parse_args()
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"

  import time

  import jax
  import jax.numpy as jnp
  import numpy as np
  from contrastive_jax import distributed, losses

  scalar = {"nt_xent": (0.1,), "clip": (10.0,), "moco_v3": (0.2,), "siglip": (10.0, -10.0)}

  def compiled_stats(fn, mesh, n, dim=args.dim):
    x = jax.ShapeDtypeStruct((n, dim), jnp.float32, sharding=distributed.data_sharding(mesh))
    step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
    c = step.lower(x, x).compile()
    cost = c.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return c.memory_analysis().temp_size_in_bytes, cost.get("flops", float("nan"))

  def variants(name, mesh, tile=args.tile):
    values = scalar[name]
    gather = losses.sharded(losses.LOSSES[name], mesh)
    ring = losses.sharded(losses.get_loss(name, "ring"), mesh)
    tiled = losses.sharded(losses.get_loss(name, "ring", tile=tile), mesh)
    return (lambda a, b: losses.LOSSES[name](a, b, *values),
            lambda a, b: gather(a, b, *values),
            lambda a, b: ring(a, b, *values),
            lambda a, b: tiled(a, b, *values))

  mib = lambda b: f"{b / 2**20:,.1f} MiB"
  gib = lambda b: f"{b / 2**30:,.2f} GiB"
  mesh = distributed.make_mesh(args.devices)
  print(f"{args.devices} devices, embedding dim {args.dim}, float32; per-device figures of "
        "value_and_grad\n")
  print(f"| loss | global batch | local rows | global-view temp | all-gather temp | ring temp "
        f"| tiled ring temp (tile {args.tile}) | ring / all-gather | global-view GFLOP "
        "| all-gather GFLOP | ring GFLOP* |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for name in args.losses.split(","):
    plain, gather, ring, tiled = variants(name, mesh)
    for n in (int(b) for b in args.batches.split(",")):
      if args.no_global_view:
        t_plain, f_plain = float("nan"), float("nan")
      else:
        t_plain, f_plain = compiled_stats(plain, mesh, n)
      t_gather, f_gather = compiled_stats(gather, mesh, n)
      t_ring, f_ring = compiled_stats(ring, mesh, n)
      t_tiled, _ = compiled_stats(tiled, mesh, n)
      plain_mem = "-" if args.no_global_view else mib(t_plain)
      print(f"| {name} | {n:,} | {n // args.devices:,} | {plain_mem} | {mib(t_gather)} "
            f"| {mib(t_ring)} | {mib(t_tiled)} | 1/{t_gather / t_ring:,.1f} | {f_plain / 1e9:,.2f} "
            f"| {f_gather / 1e9:,.2f} | {args.devices * f_ring / 1e9:,.2f} |")
      sys.stdout.flush()
  print(FLOP_NOTE)

  if args.local_batch > 0:
    print(f"\nFixed local batch {args.local_batch:,} rows per device, growing device count\n")
    print(f"| loss | devices | global batch | all-gather temp | ring temp | tiled ring temp "
          f"(tile {args.tile}) | ring / all-gather | all-gather GFLOP | ring GFLOP* |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.losses.split(","):
      for k in (int(d) for d in args.scaling_devices.split(",")):
        sub = distributed.make_mesh(k)
        _, gather, ring, tiled = variants(name, sub)
        n = k * args.local_batch
        t_gather, f_gather = compiled_stats(gather, sub, n)
        t_ring, f_ring = compiled_stats(ring, sub, n)
        t_tiled, _ = compiled_stats(tiled, sub, n)
        print(f"| {name} | {k} | {n:,} | {mib(t_gather)} | {mib(t_ring)} | {mib(t_tiled)} "
              f"| 1/{t_gather / t_ring:,.1f} | {f_gather / 1e9:,.2f} | {k * f_ring / 1e9:,.2f} |")
        sys.stdout.flush()
    print(FLOP_NOTE)

  if args.large_batches:
    print(f"\nVery large global batches on {args.devices} devices, embedding dim "
          f"{args.large_dim}, float32; per-device temporary memory of value_and_grad "
          "(compile only)\n")
    print(f"| loss | global batch | local rows | all-gather | ring | tiled ring (tile "
          f"{args.tile}) | compile s (tiled) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.large_losses.split(","):
      _, gather, ring, tiled = variants(name, mesh)
      for n in (int(b) for b in args.large_batches.split(",")):
        t_gather, _ = compiled_stats(gather, mesh, n, args.large_dim)
        t_ring, _ = compiled_stats(ring, mesh, n, args.large_dim)
        start = time.perf_counter()
        t_tiled, _ = compiled_stats(tiled, mesh, n, args.large_dim)
        seconds = time.perf_counter() - start
        print(f"| {name} | {n:,} | {n // args.devices:,} | {gib(t_gather)} | {gib(t_ring)} "
              f"| {gib(t_tiled)} | {seconds:.1f} |")
        sys.stdout.flush()

  if args.speed_batch > 0:
    print(f"\nWall clock of value_and_grad, ring vs tiled ring, {args.devices} simulated CPU "
          f"devices, global batch {args.speed_batch:,}, dim {args.dim} (median of 5 runs)\n")
    print("| loss | variant | seconds / step | vs ring |")
    print("|---|---|---:|---:|")
    rng = np.random.default_rng(0)
    sharding = distributed.data_sharding(mesh)
    x = [jax.device_put(jnp.asarray(rng.normal(size=(args.speed_batch, args.dim)),
                                    jnp.float32), sharding) for _ in range(2)]
    for name in args.speed_losses.split(","):
      base = None
      for tile in [None] + [int(t) for t in args.speed_tiles.split(",")]:
        loss = losses.sharded(losses.get_loss(name, "ring", tile=tile), mesh)
        step = jax.jit(jax.value_and_grad(
            lambda a, b, loss=loss: loss(a, b, *scalar[name]), argnums=(0, 1)))
        jax.block_until_ready(step(*x))
        times = []
        for _ in range(5):
          start = time.perf_counter()
          jax.block_until_ready(step(*x))
          times.append(time.perf_counter() - start)
        median = float(np.median(times))
        base = base or median
        label = "ring" if tile is None else f"tiled ring, tile {tile}"
        print(f"| {name} | {label} | {median:.3f} | {median / base:.2f}x |")
        sys.stdout.flush()


if __name__ == "__main__":
  main()
