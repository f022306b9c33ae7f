"""The ``"data"`` axis's ring on TPU slices, and the collectives of each method's compiled step.

Table 1 (``--hops``, default): for each TPU generation and slice shape, libtpu's device
coordinates (``jax.experimental.topologies``, no TPU needed) give the ICI links between mesh
positions ``i`` and ``i + 1 mod W`` (grid distance, no wrap-around), for
``jax.experimental.mesh_utils.create_device_mesh``'s order (what ``distributed.device_order``
used before) and for ``distributed.device_order``'s. *On slices with wrap-around links (Cloud
TPU docs: v4/v5p whole 4x4x4 cubes, v5e/v6e the full 16x16) the old order's hops are also
given in torus distance. Pure Python after the topology loads.

Table 2 (``--collectives``): each method's train step (the tiny configs of
``tests/test_runs.py``: 16 px, global batch 16) compiled, never run, for 8 simulated CPU
devices and for a TPU topology (``--topology``, default ``v5e:2x4``), with the count of each
collective kind in the compiled HLO and the largest all-to-all.

  python benchmarks/ring_order.py                     # table 1 (seconds)
  python benchmarks/ring_order.py --collectives       # table 2 (minutes: 14 compiles)
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import re
import sys

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")          # no metadata server to ask
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import mesh_utils, topologies  # noqa: E402

from contrastive_jax import distributed  # noqa: E402

SHAPES = {
    "v4": ["2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8"],
    "v5p": ["2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8"],
    "v5e": ["2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"],
    "v6e": ["2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"],
}
KINDS = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")


def wraps(gen: str, shape: str) -> bool:
  """Wrap-around links per the Cloud TPU docs: v4/v5p slices of whole 4x4x4 cubes; v5e/v6e
  only the full 16x16 pod."""
  dims = [int(n) for n in shape.split("x")]
  return all(n % 4 == 0 for n in dims) if gen in ("v4", "v5p") else dims == [16, 16]


def links(order, torus: bool = False) -> np.ndarray:
  coords = np.asarray([d.coords for d in order])
  step = np.abs(coords - np.roll(coords, -1, axis=0))
  if torus:
    sides = coords.max(axis=0) + 1
    step = np.minimum(step, sides - step)
  return step.sum(axis=1)


def mesh_utils_order(devices):
  try:
    return np.asarray(mesh_utils.create_device_mesh((len(devices),), devices)).reshape(-1)
  except AssertionError:  # libtpu lists v4 as two cores per chip; mesh_utils wants megacore
    return np.asarray(devices)


def hops_table() -> None:
  print("| slice | devices | mesh_utils: hops > 1 link | longest hop | same, over the torus* "
        "| device_order: longest hop |")
  print("|---|---|---|---|---|---|")
  for gen, shapes in SHAPES.items():
    for shape in shapes:
      devices = topologies.get_topology_desc(platform="tpu",
                                             topology_name=f"{gen}:{shape}").devices
      old, new = links(mesh_utils_order(devices)), links(distributed.device_order(devices))
      if wraps(gen, shape):
        torus = links(mesh_utils_order(devices), torus=True)
        wrapped = f"{int((torus > 1).sum())} hops > 1, longest {torus.max()}"
      else:
        wrapped = "no wrap-around"
      print(f"| {gen}:{shape} | {len(devices)} | {int((old > 1).sum())} | {old.max()} | "
            f"{wrapped} | {new.max()} |")


def collectives(hlo: str) -> tuple[dict[str, int], int]:
  counts, largest = collections.Counter(), 0
  for m in re.finditer(r"= (.*?) (" + "|".join(KINDS) + r")(?:-start)?\(", hlo):
    counts[m.group(2)] += 1
    if m.group(2) == "all-to-all":
      shapes = re.findall(r"[a-z]+[0-9]*\[([0-9,]*)\]", m.group(1))
      largest = max(largest, sum(math.prod(int(d) for d in s.split(",") if d) for s in shapes))
  return dict(counts), largest


def collectives_table(topology: str) -> None:
  import test_runs  # pylint: disable=g-import-not-at-top  (the tests' tiny configs)
  from contrastive_jax import runs  # pylint: disable=g-import-not-at-top
  cases = {"SimCLR": ("simclr", {}), "MoCo v2 (shuffle-BN)": ("mocov2", {}),
           "MoCo v2 symmetric, sync BN": ("mocov2", {"moco.symmetric": True,
                                                     "moco.shuffle_bn": False}),
           "MoCo v3": ("mocov3", {}), "CLIP": ("clip", {}), "SigLIP": ("clip", {"clip.loss":
                                                                              "siglip"})}
  meshes = {"8 CPU": distributed.make_mesh(8), topology: distributed.make_mesh(
      devices=topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)}
  print("| method | devices | " + " | ".join(KINDS) + " | largest all-to-all (elements) |")
  print("|---|---|" + "---|" * (len(KINDS) + 1))
  for label, (name, overrides) in cases.items():
    config = test_runs.tiny_config(name, "replicated", **overrides)
    for where, mesh in meshes.items():
      run = runs.build_run(config, mesh)
      hlo = run.train_step.lower(run.abstract_state, run.abstract_batch()).compile().as_text()
      counts, largest = collectives(hlo)
      print(f"| {label} | {where} | " + " | ".join(str(counts.get(k, 0)) for k in KINDS)
            + f" | {largest} |", flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--collectives", action="store_true",
                      help="table 2 instead of table 1: each method's compiled collectives")
  parser.add_argument("--topology", default="v5e:2x4", help="TPU topology of table 2")
  args = parser.parse_args()
  print(f"jax {jax.__version__}")
  if args.collectives:
    collectives_table(args.topology)
  else:
    hops_table()


if __name__ == "__main__":
  main()
