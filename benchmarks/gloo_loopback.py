"""Why a CPU pod of 2 processes x 2 devices stalls: gloo send buffers locked at 4.5 KiB.

XLA:CPU runs cross-process collectives through gloo's TCP transport. gloo's older, buffer-based
algorithms (XLA uses ``gloo::ReduceScatterHalvingDoubling`` for a reduce-scatter) size a
socket's send buffer to the first message they send on it: ``setsockopt(SO_SNDBUF, nbytes)``,
raised later only by a larger message of that same path. A small first message (<= 2304 bytes;
a SimCLR step's first reduce-scatter is the transpose of the loss's all-gather of embeddings)
gives the kernel's minimum buffer, 4608 bytes, and ``SO_SNDBUF`` also switches off the kernel's
send-buffer autotuning for that socket (socket(7), tcp(7)). gloo's newer algorithms
(``gloo::allreduce``, ``gloo::allgather``) never resize, so the big gradient all-reduce that
follows runs over that socket with one 64 KiB segment in flight: the receiver delays its ACK of
a lone segment by up to 40 ms (tcp(7), TCP_QUICKACK), so the link carries about 1.6 MB/s.

This script shows it without a model: P processes x D simulated CPU devices joined by
``jax.distributed`` over 127.0.0.1 (gloo), fresh processes per case, in one run (so that a
loaded machine weighs on every case alike):

* ``all-reduce``: an all-reduce (``psum``) of ``--mb`` MiB per device, timed;
* ``reduce-scatter first``: the same after one reduce-scatter (``psum_scatter``) of a small
  array (``--first_bytes`` per message): what a SimCLR step does.

For each it prints the median all-reduce time over ``--repeats``, the bus bandwidth (what each
link carried per second: 2 (n-1)/n of the array over the time) and the ``SO_SNDBUF`` of the
process's gloo sockets, smallest and largest, read back after the collectives; and whether
delayed ACKs are off on loopback (the fix, docs/rehearsals_gloo.md:
``ip route change table local local 127.0.0.1 dev lo ... quickack 1``).

  python benchmarks/gloo_loopback.py                       # 2 x 2, 16 MiB
  python benchmarks/gloo_loopback.py --mb 64 --repeats 3 --devices 1
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

from contrastive_jax.tools import local_pod

CASES = ("all-reduce", "reduce-scatter first")


def loopback_send_buffers(exclude_port: int) -> list[int]:
  """SO_SNDBUF (bytes) of this process's TCP sockets to 127.0.0.1, but the coordinator's."""
  sizes = []
  for name in os.listdir("/proc/self/fd"):
    fd = int(name)
    try:
      if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
        continue
      s = socket.socket(fileno=os.dup(fd))
    except OSError:
      continue
    with s:
      try:
        if s.type != socket.SOCK_STREAM or s.family not in (socket.AF_INET, socket.AF_INET6):
          continue
        local, peer = s.getsockname()[1], s.getpeername()
      except OSError:  # a listening or unconnected socket
        continue
      if peer[0] not in ("127.0.0.1", "::ffff:127.0.0.1") or exclude_port in (local, peer[1]):
        continue
      sizes.append(s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
  return sizes


def worker(process_id: int, processes: int, port: int, devices: int, mb: float,
           first_bytes: int, repeats: int) -> None:
  """One process: join the pod, optionally a small reduce-scatter, then time the all-reduce."""
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", processes, process_id)
  mesh = Mesh(np.array(jax.devices()), ("d",))
  n = len(jax.devices())

  def sharded(per_device: int):
    return jax.make_array_from_callback(
        (n * per_device,), NamedSharding(mesh, P("d")),
        lambda idx: np.ones(per_device, np.float32))

  def collective(fn):
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("d"), out_specs=P("d")))

  if first_bytes:
    # psum_scatter of n * k floats per device: every message of the halving-doubling
    # reduce-scatter is at most first_bytes long.
    small = sharded(n * max(1, first_bytes // 4))
    collective(lambda a: jax.lax.psum_scatter(a, "d", tiled=True))(small).block_until_ready()
  x = sharded(int(mb * 2**20) // 4)
  allreduce = collective(lambda a: jax.lax.psum(a, "d")).lower(x).compile()
  allreduce(x).block_until_ready()  # creates the communicator, warms up
  seconds = []
  for _ in range(repeats):
    t = time.perf_counter()
    allreduce(x).block_until_ready()
    seconds.append(time.perf_counter() - t)
  print("RESULT " + json.dumps({"process": process_id, "seconds": seconds,
                                "sndbuf": loopback_send_buffers(port)}), flush=True)


def run_case(args, first_bytes: int) -> dict:
  argv_for = lambda i, port: [
      sys.executable, os.path.abspath(__file__), "--worker", str(i), "--port", str(port),
      "--processes", str(args.processes), "--devices", str(args.devices), "--mb", str(args.mb),
      "--first_bytes", str(first_bytes), "--repeats", str(args.repeats)]
  with local_pod.LocalPod(argv_for, args.processes, devices=args.devices) as pod:
    rcs = pod.wait(args.timeout_s)
    outputs = pod.logs()
  results = []
  for rc, out in zip(rcs, outputs):
    lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
    if rc != 0 or not lines:
      raise RuntimeError(f"worker failed (rc={rc}):\n{out[-3000:]}")
    results.append(json.loads(lines[-1][len("RESULT "):]))
  seconds = [max(r["seconds"][k] for r in results) for k in range(args.repeats)]
  sndbuf = [b for r in results for b in r["sndbuf"]]
  return {"seconds": statistics.median(seconds), "sndbuf": sndbuf}


def loopback_quickack() -> str:
  """'on' if 127.0.0.1's route turns delayed ACKs off (``quickack 1``), else 'off'."""
  route = local_pod.loopback_route()
  if route is None:
    return "unknown (no ip command)"
  return "on" if local_pod.loopback_quickack(route) else "off"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--processes", type=int, default=2)
  p.add_argument("--devices", type=int, default=2, help="simulated CPU devices per process")
  p.add_argument("--mb", type=float, default=16, help="MiB per device all-reduced")
  p.add_argument("--first_bytes", type=int, default=1024,
                 help="bytes per message of the small reduce-scatter")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--cases", default=",".join(CASES))
  p.add_argument("--timeout_s", type=float, default=900)
  p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
  p.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker is not None:
    worker(args.worker, args.processes, args.port, args.devices, args.mb, args.first_bytes,
           args.repeats)
    return 0
  n = args.processes * args.devices
  link_mb = 2 * (n - 1) / n * args.mb * 2**20 / 1e6
  print(f"{args.processes} processes x {args.devices} devices, gloo over 127.0.0.1; "
        f"all-reduce of {args.mb:g} MiB per device ({link_mb:.1f} MB per link); "
        f"loopback quickack: {loopback_quickack()}; load {os.getloadavg()[0]:.1f}")
  print(f"| case | all-reduce s | bus MB/s | gloo SO_SNDBUF min..max |")
  print("|---|---:|---:|---|")
  for case in args.cases.split(","):
    if case not in CASES:
      raise SystemExit(f"--cases: unknown case {case!r}; known: {', '.join(CASES)}")
    r = run_case(args, args.first_bytes if case == "reduce-scatter first" else 0)
    bufs = f"{min(r['sndbuf'])}..{max(r['sndbuf'])}" if r["sndbuf"] else "-"
    print(f"| {case} | {r['seconds']:.2f} | {link_mb / r['seconds']:.0f} | {bufs} |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
