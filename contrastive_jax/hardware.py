"""TPU chips and slice names: the published figures a compile-only report needs, and libtpu's
devices for a slice that nobody has rented yet.

``chip_spec("v5e")`` gives a ``ChipSpec`` (peak bf16 FLOP/s, HBM size and bandwidth, ICI
bandwidth and links per chip, chips and vCPUs per host); ``parse_topology("v5e-64")`` turns a
Cloud TPU accelerator name or an explicit shape into a ``Topology``; ``tpu_devices(topology)``
returns the ``TpuDevice`` objects of that slice from ``jax.experimental.topologies``
(libtpu's compiler runs on a CPU machine: set ``TPU_SKIP_MDS_QUERY=1``), for a
``jax.sharding.Mesh`` whose programs ``jit(...).lower(...).compile()`` compiles with the real TPU
compiler.

Names accepted (Cloud TPU accelerator types, https://cloud.google.com/tpu/docs/regions-zones):
``v5e-64`` / ``v5litepod-64`` and ``v6e-256`` count chips; ``v4-32`` and ``v5p-32`` count
TensorCores, two per chip (so ``v4-32`` is 16 chips); an explicit shape ``v5e:8x8`` or
``v4:2x2x4`` names the chips along each torus axis.

The chip figures are the per-chip rows of the Cloud TPU system-architecture pages
(https://cloud.google.com/tpu/docs/v4, .../v5e, .../v5p, .../v6e), transcribed for this table
on 2026-12-04 from the pages as last read (this machine has no internet: check the pages
before quoting a figure). ICI bandwidth is the page's per-chip figure (Gbps over all links);
HBM sizes are those the runtime reports as device memory (v4 32 GiB, v5e 16, v5p 95, v6e 32).
Host vCPUs are those of the TPU VM machine types (ct4p-hightpu-4t, ct5lp-hightpu-{1,4,8}t,
ct5p-hightpu-4t, ct6e-standard-{1,4,8}t) on the same pages.

A GPU target plugs into the same report with its own ``ChipSpec`` (``kind="gpu"``) and devices.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping

from contrastive_jax.errors import ConfigError

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  """One accelerator chip's published figures (all per chip).

  Attributes:
    name: generation, e.g. ``"v5e"`` (or a GPU's name).
    peak_bf16_flops: dense bf16 FLOP/s.
    hbm_bytes: device memory.
    hbm_bw_bytes_s: HBM bandwidth, bytes/s.
    ici_bw_bytes_s: chip-to-chip bandwidth over all its links, bytes/s (GPU: NVLink).
    ici_links: links per chip (4 on the 2-D tori of v5e/v6e, 6 on the 3-D tori of v4/v5p).
    chips_per_host: chips per host of a multi-host slice.
    host_vcpus: vCPUs of that host.
    single_host: ``{chips: (chips_per_host, vcpus)}`` for slices served by one host of another
      machine type (v5e and v6e 1, 4 and 8 chips).
    torus_dims: 2 or 3.
    cores_per_chip: TensorCores a chip counts for in v4/v5p accelerator names.
    kind: ``"tpu"`` or ``"gpu"``.
    source: where the figures come from.
    link: the chip-to-chip link's name in reports (``"ICI"``; a GPU's ``"NVLink"``, ``"PCIe"``).
  """
  name: str
  peak_bf16_flops: float
  hbm_bytes: int
  hbm_bw_bytes_s: float
  ici_bw_bytes_s: float
  ici_links: int
  chips_per_host: int
  host_vcpus: int
  single_host: Mapping[int, tuple[int, int]] = dataclasses.field(default_factory=dict)
  torus_dims: int = 2
  cores_per_chip: int = 1
  kind: str = "tpu"
  source: str = ""
  link: str = "ICI"

  @classmethod
  def from_figures(cls, name: str, figures: Mapping[str, float], *, kind: str = "gpu",
                   chips_per_host: int = 8, host_vcpus: int = 0, source: str = "",
                   link: str = "NVLink") -> "ChipSpec":
    """A chip from a dict of ``peak_bf16_flops``, ``hbm_bytes``, ``hbm_bw_bytes_s`` and
    ``interconnect_bw_bytes_s`` (e.g. a GPU's published figures: NVLink as the interconnect)."""
    return cls(name=name, peak_bf16_flops=float(figures["peak_bf16_flops"]),
               hbm_bytes=int(figures["hbm_bytes"]),
               hbm_bw_bytes_s=float(figures["hbm_bw_bytes_s"]),
               ici_bw_bytes_s=float(figures["interconnect_bw_bytes_s"]), ici_links=0,
               chips_per_host=chips_per_host, host_vcpus=host_vcpus, torus_dims=0, kind=kind,
               source=source, link=link)

  def host(self, num_chips: int) -> tuple[int, int]:
    """``(chips per host, vCPUs per host)`` of a slice of ``num_chips`` chips."""
    return self.single_host.get(num_chips, (self.chips_per_host, self.host_vcpus))


def _gbps(gbit_per_s: float) -> float:
  return gbit_per_s * 1e9 / 8


_DOCS = "https://cloud.google.com/tpu/docs/{} (per-chip table; transcribed 2026-12-04)"

CHIPS: dict[str, ChipSpec] = {
    "v4": ChipSpec("v4", peak_bf16_flops=275e12, hbm_bytes=32 * GiB, hbm_bw_bytes_s=1200e9,
                   ici_bw_bytes_s=_gbps(2400), ici_links=6, chips_per_host=4, host_vcpus=240,
                   torus_dims=3, cores_per_chip=2, source=_DOCS.format("v4")),
    "v5e": ChipSpec("v5e", peak_bf16_flops=197e12, hbm_bytes=16 * GiB, hbm_bw_bytes_s=819e9,
                    ici_bw_bytes_s=_gbps(1600), ici_links=4, chips_per_host=4, host_vcpus=112,
                    single_host={1: (1, 24), 4: (4, 112), 8: (8, 224)},
                    source=_DOCS.format("v5e")),
    "v5p": ChipSpec("v5p", peak_bf16_flops=459e12, hbm_bytes=95 * GiB, hbm_bw_bytes_s=2765e9,
                    ici_bw_bytes_s=_gbps(4800), ici_links=6, chips_per_host=4, host_vcpus=208,
                    torus_dims=3, cores_per_chip=2, source=_DOCS.format("v5p")),
    "v6e": ChipSpec("v6e", peak_bf16_flops=918e12, hbm_bytes=32 * GiB, hbm_bw_bytes_s=1640e9,
                    ici_bw_bytes_s=_gbps(3584), ici_links=4, chips_per_host=4, host_vcpus=180,
                    single_host={1: (1, 44), 4: (4, 180), 8: (8, 180)},
                    source=_DOCS.format("v6e")),
}
# Accelerator-type prefixes (Cloud TPU names) -> generation.
_ALIASES = {"v4": "v4", "v5e": "v5e", "v5litepod": "v5e", "v5lite": "v5e", "v5p": "v5p",
            "v6e": "v6e"}
# Slice sizes in chips: v5e/v6e from 1 chip to a 16x16 pod; v4/v5p from a 2x2x1 cube up.
_SIZES_2D = (1, 4, 8, 16, 32, 64, 128, 256)
_SIZES_3D = tuple(4 * 2 ** k for k in range(11))  # 4 .. 4096 chips


def chip_spec(generation: str) -> ChipSpec:
  """The figures of a TPU generation (``"v5e"``, ``"v5litepod"``, ``"v4"``, ...)."""
  gen = _ALIASES.get(generation.lower())
  if gen is None:
    raise ConfigError(f"TPU generation {generation!r} is unknown; use one of "
                      f"{sorted(_ALIASES)}")
  return CHIPS[gen]


def default_shape(generation: str, num_chips: int) -> tuple[int, ...]:
  """The physical shape Cloud TPU gives a slice of ``num_chips`` chips.

  2-D (v5e, v6e): ``1x1, 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16``. 3-D (v4, v5p): ``2x2x1`` then
  the smallest axis doubled (``2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ...``).
  """
  spec = chip_spec(generation)
  sizes = _SIZES_3D if spec.torus_dims == 3 else _SIZES_2D
  if num_chips not in sizes:
    raise ConfigError(f"a {spec.name} slice of {num_chips} chips does not exist; "
                      f"{spec.name} slices have {', '.join(map(str, sizes))} chips")
  if spec.torus_dims == 2:
    side = 2 ** (int(math.log2(num_chips)) // 2)
    return (side, num_chips // side)
  shape = [2, 2, 1]
  while math.prod(shape) < num_chips:  # double the smallest axis, the last one on a tie
    i = min(range(3), key=lambda k: (shape[k], -k))
    shape[i] *= 2
  return tuple(shape)


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice: its generation's ``chip``, torus ``shape`` and the name it was given."""
  name: str
  chip: ChipSpec
  shape: tuple[int, ...]

  @property
  def num_chips(self) -> int:
    return math.prod(self.shape)

  @property
  def libtpu_name(self) -> str:
    """The name ``jax.experimental.topologies.get_topology_desc`` takes, e.g. ``v5e:8x8``."""
    return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"

  @property
  def hosts(self) -> int:
    return max(1, self.num_chips // self.chip.host(self.num_chips)[0])


_NAME = re.compile(r"^(?P<gen>[a-z0-9]+?)(?:-(?P<count>\d+)|:(?P<shape>\d+(?:x\d+){1,2}))$")


def parse_topology(name: str) -> Topology:
  """``"v5e-64"``, ``"v5litepod-64"``, ``"v6e-256"``, ``"v4-32"``, ``"v5p-32"``, ``"v5e:8x8"``
  or ``"v4:2x2x4"`` -> ``Topology``; a ``ConfigError`` names the valid forms otherwise."""
  text = str(name).strip().lower()
  m = _NAME.match(text)
  forms = ("v5e-64 (or v5litepod-64), v6e-256, v4-32, v5p-32 (v4/v5p count TensorCores, 2 "
           "per chip), or a shape such as v5e:8x8, v4:2x2x4")
  if not m or m["gen"] not in _ALIASES:
    raise ConfigError(f"--topology={name!r} is not a TPU slice name; use {forms}; "
                      f"generations: {sorted(_ALIASES)}")
  spec = chip_spec(m["gen"])
  if m["count"] is not None:
    count = int(m["count"])
    if count % spec.cores_per_chip:
      raise ConfigError(f"--topology={name!r}: {spec.name} names count TensorCores, "
                        f"{spec.cores_per_chip} per chip; use an even number such as "
                        f"{spec.name}-{2 * max(1, count // 2)}")
    try:
      shape = default_shape(spec.name, count // spec.cores_per_chip)
    except ConfigError as error:
      valid = (_SIZES_3D if spec.torus_dims == 3 else _SIZES_2D)
      names = ", ".join(f"{m['gen']}-{n * spec.cores_per_chip}" for n in valid)
      raise ConfigError(f"--topology={name!r}: {error}; valid names: {names}") from None
  else:
    shape = tuple(int(s) for s in m["shape"].split("x"))
    if len(shape) != spec.torus_dims or min(shape) < 1:
      example = "8x8" if spec.torus_dims == 2 else "2x2x4"
      raise ConfigError(f"--topology={name!r}: a {spec.name} shape has {spec.torus_dims} "
                        f"positive axes, e.g. {spec.name}:{example}")
  return Topology(name=str(name), chip=spec, shape=shape)


def tpu_devices(topology: str | Topology) -> list:
  """libtpu's devices of the slice (``TpuDevice``: ``coords``, ``process_index`` per host),
  without a TPU: ``jax.experimental.topologies.get_topology_desc`` with the real TPU compiler.

  v4 uses megacore (one device per chip, as jax sees a v4 VM); slices of one host (v5e/v6e
  1, 4, 8 chips) are one host of their machine type.
  """
  topo = parse_topology(topology) if isinstance(topology, str) else topology
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server off a TPU VM
  # Several processes of this machine may compile with libtpu at once (tests, helpers).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kwargs = {}
  if topo.chip.name == "v4":
    kwargs["chip_config_name"] = "megacore"
  per_host = topo.chip.host(topo.num_chips)[0]
  if per_host != topo.chip.chips_per_host or topo.num_chips < topo.chip.chips_per_host:
    kwargs["chips_per_host_bounds"] = tuple(topo.shape) + (1,) * (3 - len(topo.shape))
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.libtpu_name,
                                        **kwargs)
  except (ImportError, RuntimeError) as error:
    raise ConfigError(f"libtpu could not describe {topo.libtpu_name} ({error}); install the "
                      "TPU compiler with pip install 'libtpu==0.0.42.*' (the version jax "
                      "0.10.2's [tpu] extra pins)") from None
  return list(desc.devices)
