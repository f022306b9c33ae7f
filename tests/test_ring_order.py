"""The ``"data"`` axis order is a ring of one-link hops on every TPU slice shape.

Coordinates come from libtpu's own topology descriptions (no TPU needed): every consecutive
pair of mesh positions, and the closing pair, must be on the same chip or one ICI link apart.
The distance is the grid distance without wrap-around, stricter than the torus distance, so the
check holds whether or not a slice has wrap-around links. The compiled ring loss's
collective-permutes are checked against the same coordinates.
"""

from __future__ import annotations

import functools
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax import distributed, losses

# The TPU compiler and topology run here without a TPU: no metadata server to ask, and several
# test processes (and other users of this machine) may hold libtpu at once.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# Slice shapes from 4 to 256 chips (Cloud TPU docs). libtpu lists v4 chips as two devices
# (``core_on_chip`` 0 and 1); a real v4 runs one megacore device per chip.
SHAPES = {
    "v4": ["2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8"],
    "v5p": ["2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8"],
    "v5e": ["2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"],
    "v6e": ["2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"],
}
TOPOLOGIES = [f"{gen}:{shape}" for gen, shapes in SHAPES.items() for shape in shapes]


@functools.cache
def tpu_devices(topology: str, num_slices: int = 1) -> tuple:
  pytest.importorskip("libtpu")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  return tuple(topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                            num_slices=num_slices).devices)


def hop_links(order) -> np.ndarray:
  """ICI links between mesh position ``i`` and ``i + 1 mod W`` (grid distance, no wrap)."""
  coords = np.asarray([d.coords for d in order])
  return np.abs(coords - np.roll(coords, -1, axis=0)).sum(axis=1)


def _walk(points) -> list[int]:
  return [sum(abs(a - b) for a, b in zip(p, q)) for p, q in zip(points, points[1:] + points[:1])]


@pytest.mark.parametrize("shape", [(2, 1, 1), (2, 2, 1), (4, 4, 1), (2, 8, 1), (16, 16, 1),
                                   (2, 2, 4), (4, 8, 8), (3, 2, 1), (3, 3, 2), (1, 2, 3),
                                   (5, 2), (2, 3, 5)])
def test_grid_cycle_visits_every_point_once_in_unit_steps(shape):
  cycle, reason = distributed.grid_cycle(shape)
  assert cycle is not None, reason
  assert len(cycle) == len(set(cycle)) == math.prod(shape)
  assert all(0 <= v < n for point in cycle for v, n in zip(point, shape))
  assert set(_walk(cycle)) == {1}, (shape, cycle)


@pytest.mark.parametrize("shape,why", [((3, 3, 1), "only odd sides"), ((4, 1, 1), "a line of 4"),
                                       ((3, 5, 3), "only odd sides")])
def test_grid_cycle_none_where_no_cycle_exists(shape, why):
  cycle, reason = distributed.grid_cycle(shape)
  assert cycle is None and why in reason


def test_grid_cycle_of_one_point():
  assert distributed.grid_cycle((1, 1, 1)) == ([(0, 0, 0)], "")


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_tpu_ring_hops_are_one_link(topology):
  devices = tpu_devices(topology)
  order = distributed.make_mesh(devices=devices).devices.reshape(-1)
  assert sorted(d.id for d in order) == sorted(d.id for d in devices)
  links = hop_links(order)
  assert links.max() == 1, (
      f"{topology}: {int((links > 1).sum())} of {len(links)} hops cross more than one link "
      f"(up to {links.max()})")
  # The two cores of a chip (v4 as libtpu lists it) sit next to each other.
  chips = [tuple(d.coords) for d in order]
  assert len({c for c, n in zip(chips, chips[1:] + chips[:1]) if c == n}) in (
      0, len(set(chips)))


@pytest.mark.parametrize("topology,num_slices", [("v5e:4x4", 2), ("v5p:2x2x2", 4)])
def test_multislice_one_dcn_hop_per_slice_boundary(topology, num_slices):
  devices = tpu_devices(topology, num_slices)
  order = distributed.device_order(devices)
  slices = np.asarray([d.slice_index for d in order])
  crossing = slices != np.roll(slices, -1)
  assert crossing.sum() == num_slices  # the closing hop included
  assert list(dict.fromkeys(slices)) == list(range(num_slices))
  assert hop_links(order)[~crossing].max() == 1


def test_fallback_logs_the_reason(monkeypatch):
  devices = tpu_devices("v5e:2x2")[:3]  # 3 chips of a 2x2 slice fill no box
  warnings = []
  monkeypatch.setattr(distributed.logging, "warning", lambda msg, *a: warnings.append(msg % a))
  order = distributed.device_order(devices)
  assert sorted(d.id for d in order) == sorted(d.id for d in devices)
  assert "do not fill their 2x2x1 bounding box" in warnings[0], warnings


def test_cpu_order_unchanged():
  assert list(distributed.make_mesh().devices.reshape(-1)) == jax.devices()


COLLECTIVE_PERMUTE = re.compile(
    r"collective-permute(?:-start)?\(.*?source_target_pairs=\{((?:\{\d+,\d+\},?)+)\}")


@pytest.mark.parametrize("topology", ["v5e:2x4", "v5p:2x2x2"])
def test_compiled_ring_loss_permutes_between_neighbours(topology):
  """libtpu's compiled ring loss (forward and backward): its collective-permutes' source-target
  pairs index the mesh's device order; each pair is one link apart."""
  mesh = distributed.make_mesh(devices=tpu_devices(topology))
  loss = losses.sharded(losses.get_loss("clip", "ring"), mesh)
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  emb = jax.ShapeDtypeStruct((4 * mesh.size, 16), jnp.float32,
                             sharding=distributed.data_sharding(mesh))
  scale = jax.ShapeDtypeStruct((), jnp.float32, sharding=distributed.replicated(mesh))
  compiled = step.lower(emb, emb, scale).compile()
  assert compiled.input_shardings[0][0].mesh.devices.tolist() == mesh.devices.tolist()
  hlo = compiled.as_text()
  permutes = COLLECTIVE_PERMUTE.findall(hlo)
  assert permutes, "no collective-permute in the compiled ring loss"
  devices = mesh.devices.reshape(-1)
  for pairs in permutes:
    pairs = [tuple(map(int, p)) for p in re.findall(r"\{(\d+),(\d+)\}", pairs)]
    assert sorted(s for s, _ in pairs) == list(range(mesh.size))
    links = {(s, t): int(np.abs(np.subtract(devices[s].coords, devices[t].coords)).sum())
             for s, t in pairs}
    assert max(links.values()) == 1, f"{topology}: hops of several links {links}"


@pytest.mark.parametrize("topology", ["v5e:4x4", "v5e:8x8", "v4:4x4x4"])
def test_aligned_runs_of_the_ring_are_boxes(topology):
  """Every aligned run of N / 2^j consecutive ring positions (the groups of a sub-axis of the
  data axis: FSDP's [N/k, k] view, a per-view collective over half the devices) is a box of the
  slice's grid, which is what libtpu can route."""
  order = distributed.device_order(tpu_devices(topology))
  chips = [tuple(d.coords) for d in order]
  chips = [c for i, c in enumerate(chips) if i == 0 or c != chips[i - 1]]  # v4: two cores a chip
  size = len(chips)
  while size > 1:
    for start in range(0, len(chips), size):
      run = np.asarray(chips[start:start + size])
      box = np.prod(run.max(axis=0) - run.min(axis=0) + 1)
      assert box == size, f"{topology}: positions {start}..{start + size - 1} are not a box"
    size //= 2


@pytest.mark.parametrize("topology, group", [("v5e:8x8", 32), ("v5e:8x8", 16)])
def test_libtpu_compiles_a_collective_over_ring_groups(topology, group):
  """A psum over consecutive groups of the ring order compiles for the slice (libtpu failed it,
  "Failed to create limited ICI routing replica info table", when half the ring was not a
  rectangle of the torus)."""
  order = distributed.device_order(tpu_devices(topology))
  mesh = jax.sharding.Mesh(np.asarray(order).reshape(-1, group), ("a", "b"))
  spec = jax.sharding.PartitionSpec(("a", "b"))
  f = jax.shard_map(lambda v: jax.lax.psum(v, "b"), mesh=mesh, in_specs=spec, out_specs=spec)
  x = jax.ShapeDtypeStruct((len(order) * 8,), jnp.float32,
                           sharding=jax.sharding.NamedSharding(mesh, spec))
  jax.jit(f).lower(x).compile()
