"""Does CLIP ViT-bigG/14 at 160k fit a v5e-256, and the tiled ring at 4M a v5e-8? (TPU compiler)

Compiles (never runs) with libtpu's own compiler on this machine, no TPU needed:
``jax.experimental.topologies.get_topology_desc(platform="tpu", topology_name=...)`` gives the
slice's devices, ``distributed.make_mesh(devices=...)`` the run's mesh, and
``runs.build_run(config, mesh).train_step.lower(run.abstract_state, run.abstract_batch())
.compile()`` the program a run would execute. Prints, per chip:

* memory from ``memory_analysis()``: arguments (state shard + batch shard), temporaries,
  outputs not aliased to the donated state, and their total, against the chip's HBM;
* FLOPs counted from the compiled HLO with loop trip counts (``hlo_flops``): XLA's
  ``cost_analysis()`` counts a while-loop body once, so a step with 25 GradCache chunks, a
  48-block scan and a 256-hop ring reports a small fraction of its work (printed beside it);
* a lower bound on step time, FLOPs / peak (v5e: 197 TFLOP/s bf16, Cloud TPU docs), and the
  model FLOPs (3 x the forward pass, counted from the architecture) over the compiled FLOPs,
  which is the MFU ceiling once remat and GradCache recompute the forward pass.

  TPU_SKIP_MDS_QUERY=1 JAX_PLATFORMS=cpu python benchmarks/bigg_fit.py            # both rows
  python benchmarks/bigg_fit.py --only bigg --set loss_tile=256                   # one change
  python benchmarks/bigg_fit.py --only quick --topology v5e:2x2                   # seconds

It is a benchmark, not a test: bigG compiles for minutes on a small CPU.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Other processes on this machine may hold libtpu's lockfile; compiling needs no TPU to lock.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

GIB = 2 ** 30
DUMP_DIR = ""  # --dump: where to write each compiled program's HLO text
# Cloud TPU docs (system architecture pages): HBM per chip and peak bf16 FLOP/s.
CHIPS = {"v5e": (16 * GIB, 197e12), "v4": (32 * GIB, 275e12), "v5p": (95 * GIB, 459e12),
         "v6e": (32 * GIB, 918e12)}

# ----------------------------------------------------------------------------- HLO FLOPs

_HEADER = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s*\((.*)\)\s*->\s*.*\{\s*$")
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\S+?)(?:\{[^}]*\})?\s+([\w\-]+)\((.*)$")
_PARAM = re.compile(r"([\w.\-]+):\s*((?:pred|[subf]\d+|bf16|f8\w*|c64|c128)\[[\d,]*\])")
_SHAPE = re.compile(r"^(?:pred|[subf]\d+|bf16|f8\w*|c64|c128)\[([\d,]*)\]")


def _dims(shape: str) -> list[int] | None:
  m = _SHAPE.match(shape)
  return [int(d) for d in m.group(1).split(",") if d] if m else None


def _matmul_flops(op: str, out: list[int], lhs: list[int], rhs: list[int], attrs: str) -> float:
  """2 x multiply-adds of a ``dot`` or ``convolution`` (XLA:TPU writes matmuls as both).

  A convolution does ``prod(out) x prod(rhs) / out_features`` multiply-adds per its kernel
  (the kernel's input-feature dimension is already ``C_in / feature_group_count``), except that
  with ``lhs_dilate=d`` only ``1 / d`` of a window's taps land on input values (the others are
  the inserted zeros): XLA:TPU writes a batched matmul such as attention's
  ``bqhd,bkhd->bhqk`` as a base-dilated convolution whose window (``size=B x H``,
  ``lhs_dilate=B x H``) walks the batch and head dimensions, one real tap each; counted per
  window tap it would be B x H times too large.
  """
  if op == "dot":
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs)
    k = math.prod(lhs[int(d)] for d in contracting.group(1).split(",") if d) if contracting else 1
    return 2.0 * math.prod(out) * k
  labels = re.search(r"dim_labels=\w+_(\w+)->", attrs)
  out_features = rhs[labels.group(1).index("o")] if labels else rhs[-1]
  dilate = re.search(r"lhs_dilate=([\dx]+)", attrs)
  dilation = math.prod(int(d) for d in dilate.group(1).split("x")) if dilate else 1
  return 2.0 * math.prod(out) * math.prod(rhs) / out_features / dilation


def hlo_flops(hlo: str) -> tuple[float, list[int]]:
  """``(FLOPs, trip counts)`` of the entry computation of compiled HLO text.

  Counts the matmul FLOPs (``dot`` and ``convolution``; elementwise work, a few % in a
  transformer, is left out), each called computation once per call (``calls=``, the largest
  branch of a conditional) and a while body once per trip. The trip count is read from the loop's
  condition, ``counter < N`` with a constant N (the form of ``scan`` and ``fori_loop`` from 0);
  a loop whose condition has another form counts once and is reported as trip count 0.
  """
  comps: dict[str, list[str]] = {}
  shapes: dict[str, dict[str, list[int] | None]] = {}
  entry, name = None, None
  for line in hlo.splitlines():
    header = _HEADER.match(line)
    if header:
      name = header.group(2)
      comps[name] = []
      shapes[name] = {p: _dims(s) for p, s in _PARAM.findall(header.group(3))}
      if header.group(1):
        entry = name
    elif name is not None and line.startswith(" "):
      comps[name].append(line)
      d = _DEF.match(line)
      if d:
        shapes[name][d.group(1)] = _dims(d.group(2))
  trips: list[int] = []
  memo: dict[str, float] = {}

  def trip_count(cond: str) -> int:
    consts = {}
    for line in comps.get(cond, ()):
      c = re.match(r"^\s*%([\w.\-]+)\s*=\s*s32\[\]\S*\s+constant\((-?\d+)\)", line)
      if c:
        consts[c.group(1)] = int(c.group(2))
    for line in comps.get(cond, ()):
      c = re.search(r"compare\(%[\w.\-]+,\s*%([\w.\-]+)\),\s*direction=(LT|LE)", line)
      if c and c.group(1) in consts:
        return consts[c.group(1)] + (c.group(2) == "LE")
    return 0

  def flops(comp: str) -> float:
    if comp in memo:
      return memo[comp]
    total = 0.0
    for line in comps.get(comp, ()):
      d = _DEF.match(line)
      if d and d.group(3) in ("dot", "convolution"):
        operands = re.findall(r"%([\w.\-]+)", d.group(4).split(")")[0])
        dims = [shapes[comp].get(o) for o in operands[:2]]
        out = _dims(d.group(2))
        if out is not None and len(dims) == 2 and None not in dims:
          total += _matmul_flops(d.group(3), out, dims[0], dims[1], d.group(4))
      for callee in re.findall(r"\bcalls=%([\w.\-]+)", line):
        total += flops(callee)
      for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
        total += max(flops(c.strip().lstrip("%")) for c in group.split(","))
      body = re.search(r"\bbody=%([\w.\-]+)", line)
      if body:
        cond = re.search(r"\bcondition=%([\w.\-]+)", line)
        n = trip_count(cond.group(1)) if cond else 0
        trips.append(n)
        total += max(n, 1) * flops(body.group(1))
    memo[comp] = total
    return total

  return flops(entry), trips


# ----------------------------------------------------------------------------- model FLOPs

def transformer_forward_flops(tokens: int, width: int, depth: int, mlp: int) -> float:
  """Per example: qkv + out projections (4 W^2), MLP (2 W M), scores and values (2 T W) per
  token, x 2 FLOPs per multiply-add."""
  return 2.0 * depth * tokens * (4 * width * width + 2 * width * mlp + 2 * tokens * width)


def clip_model_flops(config) -> float:
  """3 x forward FLOPs of the two towers and projections per step (global), from the config."""
  from contrastive_jax.models import registry
  img = registry.build_model(config.model.name, **dict(config.model.kwargs))
  txt = dict(config.text.kwargs)
  s, p = int(config.data.image_size), img.patch_size
  t_img = (s // p) ** 2 + (img.pool == "cls")
  w, e = img.width, int(config.clip.embed_dim)
  fwd = transformer_forward_flops(t_img, w, img.depth, img.mlp_dim or 4 * w)
  fwd += 2.0 * (s // p) ** 2 * p * p * 3 * w + 2.0 * w * e
  tw = txt["width"]
  fwd += transformer_forward_flops(int(config.data.context_length), tw, txt["depth"],
                                   txt.get("mlp_dim") or 4 * tw) + 2.0 * tw * e
  return 3.0 * fwd * int(config.global_batch)


# ----------------------------------------------------------------------------- measurements

def topology_mesh(name: str):
  from jax.experimental import topologies
  from contrastive_jax import distributed
  devices = topologies.get_topology_desc(platform="tpu", topology_name=name).devices
  return distributed.make_mesh(devices=devices)


def measure_train(config, topology: str) -> dict:
  from contrastive_jax import runs
  mesh = topology_mesh(topology)
  t0 = time.perf_counter()
  run = runs.build_run(config, mesh, num_steps=config.total_steps)
  compiled = run.train_step.lower(run.abstract_state, run.abstract_batch()).compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  hlo = compiled.as_text()
  if DUMP_DIR:
    with open(os.path.join(DUMP_DIR, f"train_{topology.replace(':', '_')}.hlo"), "w") as f:
      f.write(hlo)
  flops, trips = hlo_flops(hlo)
  return dict(chips=mesh.size, params=run.num_params, state=run.state_bytes_per_device,
              args=mem.argument_size_in_bytes, temp=mem.temp_size_in_bytes,
              out=mem.output_size_in_bytes - mem.alias_size_in_bytes,
              flops=flops / 1.0, xla_flops=float(cost.get("flops", float("nan"))),
              model_flops=clip_model_flops(config) / mesh.size, trips=trips, seconds=seconds)


def measure_ring_loss(global_batch: int, dim: int, tile: int, topology: str) -> dict:
  """value_and_grad of the tiled-ring CLIP loss on ``[B, dim]`` float32 embeddings."""
  import jax
  import jax.numpy as jnp
  from contrastive_jax import distributed, losses
  mesh = topology_mesh(topology)
  loss = losses.sharded(losses.get_loss("clip", "ring", tile=tile), mesh)
  x = jax.ShapeDtypeStruct((global_batch, dim), jnp.float32,
                           sharding=distributed.data_sharding(mesh))
  t0 = time.perf_counter()
  compiled = jax.jit(jax.value_and_grad(lambda a, b: loss(a, b, 10.0), argnums=(0, 1))).lower(
      x, x).compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops, trips = hlo_flops(compiled.as_text())
  return dict(chips=mesh.size, params=0, state=0, args=mem.argument_size_in_bytes,
              temp=mem.temp_size_in_bytes,
              out=mem.output_size_in_bytes - mem.alias_size_in_bytes, flops=flops,
              xla_flops=float(cost.get("flops", float("nan"))), model_flops=float("nan"),
              trips=trips, seconds=seconds)


def bigg_config(quick: bool, overrides: list[str], depth: int | None = None):
  from contrastive_jax.configs import clip_vit_bigg14
  from contrastive_jax import configs
  c = clip_vit_bigg14.get_config("quick" if quick else None)
  configs.apply_overrides(c, overrides)
  if depth:  # a probe: both towers this deep (the preset's widths kept)
    c.model.kwargs.depth = depth
    c.text.kwargs.depth = depth
  return c


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default="bigg,ring4m",
                      help="rows: bigg (configs/clip_vit_bigg14.py), ring4m (the tiled CLIP "
                           "loss at --ring-batch), quick (bigg's :quick config)")
  parser.add_argument("--topology", default="v5e:16x16", help="slice of the bigg rows")
  parser.add_argument("--ring-topology", default="v5e:2x4")
  parser.add_argument("--ring-batch", type=int, default=4_194_304)
  parser.add_argument("--ring-dim", type=int, default=512)
  parser.add_argument("--ring-tile", type=int, default=1024)
  parser.add_argument("--set", action="append", default=[],
                      help="config override key=value for the bigg rows (repeatable)")
  parser.add_argument("--dump", default="", help="folder for the compiled HLO texts")
  parser.add_argument("--depth", type=int, default=0,
                      help="probe: both towers at this depth (0: the config's 48 and 32)")
  parser.add_argument("--no-pin", action="store_true",
                      help="trace without the activation constraints of FSDP runs "
                           "(sharding.activation_mesh), to measure what they change")
  args = parser.parse_args()
  global DUMP_DIR
  DUMP_DIR = args.dump
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  if args.no_pin:
    from contrastive_jax import sharding
    sharding.activation_mesh = lambda *_: None

  rows = []
  for what in args.only.split(","):
    if what in ("bigg", "quick"):
      c = bigg_config(what == "quick", args.set, args.depth)
      topo = args.topology if what == "bigg" else "v5e:2x2"
      label = (f"CLIP bigG/14 {'(quick)' if what == 'quick' else ''} B={c.global_batch:,}, "
               f"{c.grad_cache.micro_batches} chunks, tile {c.loss_tile}")
      rows.append((label, topo, measure_train(c, topo)))
    elif what == "ring4m":
      rows.append((f"tiled ring CLIP loss B={args.ring_batch:,}, D={args.ring_dim}, tile "
                   f"{args.ring_tile}", args.ring_topology,
                   measure_ring_loss(args.ring_batch, args.ring_dim, args.ring_tile,
                                     args.ring_topology)))
    else:
      parser.error(f"--only: unknown row {what!r}")
    print(f"done: {rows[-1][0]} in {rows[-1][2]['seconds']:.0f} s", file=sys.stderr)

  gib = lambda b: f"{b / GIB:,.2f}"  # noqa: E731
  print("| program | slice | state GiB | arguments GiB | temporaries GiB | outputs GiB | "
        "total GiB / HBM | TFLOP/chip (loops counted) | cost_analysis TFLOP | bound step s | "
        "model/compiled FLOPs | compile s |")
  print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for label, topo, r in rows:
    hbm, peak = CHIPS[topo.split(":")[0]]
    total = r["args"] + r["temp"] + r["out"]
    ratio = r["model_flops"] / r["flops"] if r["flops"] else float("nan")
    print(f"| {label} | {topo} ({r['chips']} chips) | {gib(r['state'])} | {gib(r['args'])} | "
          f"{gib(r['temp'])} | {gib(r['out'])} | {gib(total)} / {hbm / GIB:.0f} "
          f"{'fits' if total <= hbm else 'DOES NOT FIT'} | {r['flops'] / 1e12:,.1f} | "
          f"{r['xla_flops'] / 1e12:,.2f} | {r['flops'] / peak:,.2f} | "
          f"{'-' if math.isnan(ratio) else f'{ratio:.2f}'} | {r['seconds']:.0f} |")
  for label, _, r in rows:
    print(f"{label}: loop trip counts {sorted(set(r['trips']))}")


if __name__ == "__main__":
  main()
