"""Named GPU nodes to compile for without a GPU: XLA:GPU target descriptions and peak figures.

jax's CUDA PJRT plugin compiles for a GPU that is not there when it is given a description of
the device (``stream_executor.GpuTargetConfigProto`` in text format: SM count, memory size and
bandwidth, cache and shared-memory sizes, compute capability):
``jax.experimental.topologies.get_topology_desc("", platform="cuda", topology="1x1x8",
target_config=TEXT)`` returns devices for a ``Mesh``, and ``jit(...).lower(abstract
args).compile()`` then gives the compiled program's ``memory_analysis()`` and HLO from the real
XLA:GPU compiler, as ``libtpu`` does for TPU slices. No CUDA library is needed; the plugin is
the two wheels in ``PLUGIN_PIP`` (installable with ``pip install --target DIR`` next to a CPU
jax: jax finds it through the ``jax_plugins`` namespace package on ``sys.path``).

Without a device XLA cannot autotune, and Triton GEMM fusions may fail to tile: compile with
``compiled = lowered.compile(compiler_options=COMPILER_OPTIONS)`` (Triton GEMMs off, so GEMMs
go to cuBLAS). XLA reads ``XLA_FLAGS`` once per process, so setting
``--xla_gpu_enable_triton_gemm=false`` there only works before jax first compiles anything;
the per-compile option always does.

Each target is built from the GPU's published figures (sources per entry below), and
``GPU_SPECS[name]`` carries the per-GPU figures a roofline needs:

* ``peak_bf16_flops``: dense bf16 tensor-core FLOP/s with float32 accumulation (the
  structured-sparsity figures of the datasheets are twice these and do not apply).
* ``hbm_bytes``, ``hbm_bw_bytes_s``: device memory and its bandwidth.
* ``interconnect_bw_bytes_s``: GPU-to-GPU bandwidth per GPU in one direction (NVLink's
  datasheet figure is both directions together: A100 600 GB/s -> 300e9 here); PCIe 4.0 x16
  for a workstation card (32 GB/s per direction, 31.5e9 after encoding).

None of these figures has been checked against a run on the GPU: a compile here tells whether
a program fits and what it computes and moves, not how fast a GPU runs it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import re
from typing import Any

from contrastive_jax.errors import ConfigError

PLUGIN_PIP = "pip install jax-cuda12-pjrt==0.10.2 jax-cuda12-plugin==0.10.2"
# For ``Lowered.compile(compiler_options=...)`` of a program on these devices.
COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


@dataclasses.dataclass(frozen=True)
class GpuModel:
  """One GPU model's published figures (per GPU)."""
  description: str           # device_description_str / device_kind
  sms: int                   # streaming multiprocessors
  fp32_cores_per_sm: int
  boost_clock_ghz: float
  compute_capability: tuple[int, int]
  hbm_bytes: int
  hbm_bw_bytes_s: float
  l2_bytes: int
  shared_memory_per_sm: int  # bytes
  shared_memory_per_block_optin: int  # bytes
  threads_per_sm: int
  peak_bf16_flops: float     # dense, fp32 accumulate
  interconnect_bw_bytes_s: float  # per GPU, one direction
  source: str                # where the figures come from
  link: str = "NVLink"       # the GPU-to-GPU link


GIB = 2**30

# NVIDIA A100 Tensor Core GPU datasheet (80GB SXM: 312 TFLOPS bf16 dense, 2,039 GB/s HBM2e,
# NVLink 600 GB/s) and "NVIDIA A100 Tensor Core GPU Architecture" whitepaper (108 SMs, 1,410
# MHz boost, 40 MB L2, 164 KB shared memory per SM, 163 KB per block, 2,048 threads per SM).
A100_80GB = GpuModel(
    description="NVIDIA A100-SXM4-80GB", sms=108, fp32_cores_per_sm=64, boost_clock_ghz=1.41,
    compute_capability=(8, 0), hbm_bytes=80 * GIB, hbm_bw_bytes_s=2.039e12,
    l2_bytes=40 * 2**20, shared_memory_per_sm=164 * 1024,
    shared_memory_per_block_optin=163 * 1024, threads_per_sm=2048, peak_bf16_flops=312e12,
    interconnect_bw_bytes_s=300e9,
    source="NVIDIA A100 datasheet (80GB SXM) and A100 architecture whitepaper")

# NVIDIA H100 Tensor Core GPU datasheet (H100 SXM: 989 TFLOPS bf16 dense (1,979 with
# sparsity), 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s) and "NVIDIA H100 Tensor Core GPU
# Architecture" whitepaper (132 SMs on SXM5, 1,980 MHz max boost, 50 MB L2, 228 KB shared
# memory per SM, 227 KB per block, 128 FP32 cores per SM).
H100_80GB = GpuModel(
    description="NVIDIA H100 80GB HBM3", sms=132, fp32_cores_per_sm=128, boost_clock_ghz=1.98,
    compute_capability=(9, 0), hbm_bytes=80 * GIB, hbm_bw_bytes_s=3.35e12,
    l2_bytes=50 * 2**20, shared_memory_per_sm=228 * 1024,
    shared_memory_per_block_optin=227 * 1024, threads_per_sm=2048, peak_bf16_flops=989.4e12,
    interconnect_bw_bytes_s=450e9,
    source="NVIDIA H100 datasheet (SXM) and H100 architecture whitepaper")

# "NVIDIA Ada GPU Architecture" whitepaper, GeForce RTX 4090 (128 SMs, 2,520 MHz boost, 24 GB
# GDDR6X at 1,008 GB/s, 72 MB L2, peak bf16 tensor 165.2 TFLOPS with FP32 accumulate (330.4
# sparse)); CUDA C Programming Guide, compute capability 8.9 (100 KB shared memory per SM, 99
# KB per block, 1,536 threads per SM); PCIe 4.0 x16.
RTX_4090 = GpuModel(
    description="NVIDIA GeForce RTX 4090", sms=128, fp32_cores_per_sm=128,
    boost_clock_ghz=2.52, compute_capability=(8, 9), hbm_bytes=24 * GIB,
    hbm_bw_bytes_s=1.008e12, l2_bytes=72 * 2**20, shared_memory_per_sm=100 * 1024,
    shared_memory_per_block_optin=99 * 1024, threads_per_sm=1536, peak_bf16_flops=165.2e12,
    interconnect_bw_bytes_s=31.5e9, link="PCIe",
    source="NVIDIA Ada GPU architecture whitepaper (RTX 4090), CUDA programming guide")

# name -> (GPU model, GPUs in the node)
TARGETS: dict[str, tuple[GpuModel, int]] = {
    "8xa100-80gb": (A100_80GB, 8),
    "8xh100-80gb": (H100_80GB, 8),
    "1xa100-80gb": (A100_80GB, 1),
    "1xh100-80gb": (H100_80GB, 1),
    "1xrtx4090": (RTX_4090, 1),
}


# vCPUs of the cloud machine that carries each node (Google Cloud GPU machine types:
# a2-ultragpu-1g/8g, a3-highgpu-1g/8g; transcribed 2026-12-04 without internet, check
# https://cloud.google.com/compute/docs/gpus before quoting). A workstation's CPU is the
# owner's choice: 0, unknown.
HOST_VCPUS = {"8xa100-80gb": 96, "8xh100-80gb": 208, "1xa100-80gb": 12, "1xh100-80gb": 26,
              "1xrtx4090": 0}

# Spellings ``canonical_name`` accepts for each GPU model (lower case, before "-80gb").
_MODEL_NAMES = {"a100": "a100-80gb", "a100-80gb": "a100-80gb", "h100": "h100-80gb",
                "h100-80gb": "h100-80gb", "rtx4090": "rtx4090", "4090": "rtx4090"}
def canonical_name(name: str) -> str | None:
  """The ``TARGETS`` key ``name`` spells, or None when it names no GPU model.

  ``8xa100-80gb``, ``8xA100``, ``a100x8``, ``8x-a100``, ``8xh100``, ``H100-80GB x8``,
  ``rtx4090``, ``1x4090``: a count (default 1) and a model. A known model with a count no
  target has raises ``ConfigError`` naming the targets.
  """
  text = re.sub(r"[\s_]+", "", str(name).lower()).replace("x-", "x").replace("nvidia-", "")
  text = re.sub(r"-?sxm[45]?$", "", text)
  for pattern in (r"(?P<model>.+)", r"(?P<count>\d+)x(?P<model>.+)",
                  r"(?P<model>.+)x(?P<count>\d+)"):
    m = re.fullmatch(pattern, text)
    if m and m["model"] in _MODEL_NAMES:
      break
  else:
    return None
  count = int(m.groupdict().get("count") or 1)
  key = f"{count}x{_MODEL_NAMES[m['model']]}"
  if key not in TARGETS:
    raise ConfigError(f"--topology={name!r}: no {count}-GPU {_MODEL_NAMES[m['model']]} target;"
                      f" GPU targets are {', '.join(TARGETS)} (add one to TARGETS in "
                      "contrastive_jax/gpu_targets.py)")
  return key


def chip_spec(name: str):
  """``hardware.ChipSpec`` of one GPU of target ``name`` (its NVLink or PCIe bandwidth as the
  interconnect; the node's GPUs and its host's vCPUs as one host)."""
  from contrastive_jax import hardware  # pylint: disable=g-import-not-at-top
  model, count = _check_name(name)
  return hardware.ChipSpec.from_figures(
      model.description, _spec(model, count), kind="gpu", chips_per_host=count,
      host_vcpus=HOST_VCPUS.get(name, 0), source=model.source, link=model.link)


def _spec(model: GpuModel, count: int) -> dict[str, Any]:
  return dict(peak_bf16_flops=model.peak_bf16_flops, hbm_bytes=model.hbm_bytes,
              hbm_bw_bytes_s=model.hbm_bw_bytes_s,
              interconnect_bw_bytes_s=model.interconnect_bw_bytes_s, num_gpus=count,
              device_kind=model.description, source=model.source)


# Per-GPU figures of each target (see the module docstring for their units and sources).
GPU_SPECS: dict[str, dict[str, Any]] = {n: _spec(m, c) for n, (m, c) in TARGETS.items()}


def target_config(model: GpuModel) -> str:
  """``model`` as a ``stream_executor.GpuTargetConfigProto`` in text format.

  Fields not published per model are CUDA's limits for every compute capability >= 7.0
  (1,024 threads and 48 KB static shared memory per block, warps of 32, 64K 32-bit registers
  per SM and per block, grid limits 2^31 - 1 x 65,535 x 65,535). The cuDNN (9.8) and CUDA
  runtime (12.8) versions are an assumed current CUDA 12 stack, not a measured one: XLA reads
  them to decide which library features it may call.
  """
  major, minor = model.compute_capability
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {model.shared_memory_per_sm}
  threads_per_core_limit: {model.threads_per_sm}
  core_count: {model.sms}
  fpus_per_core: {model.fp32_cores_per_sm}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(model.hbm_bw_bytes_s)}
  l2_cache_size: {model.l2_bytes}
  clock_rate_ghz: {model.boost_clock_ghz}
  device_memory_size: {model.hbm_bytes}
  shared_memory_per_block_optin: {model.shared_memory_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{model.description}"
"""


def plugin_available() -> bool:
  """Whether jax's CUDA plugin is importable (it need not find a GPU)."""
  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ModuleNotFoundError:  # no jax_plugins namespace package at all
    return False


def _check_name(name: str) -> tuple[GpuModel, int]:
  if name not in TARGETS:
    raise ConfigError(f"GPU target {name!r} is unknown; use one of {sorted(TARGETS)} "
                      "(or add a GpuModel to contrastive_jax/gpu_targets.py)")
  return TARGETS[name]


def _register_topology() -> None:
  """Makes ``get_topology_desc(platform="cuda")`` available without CUDA libraries.

  jax imports the plugin when it first sets up its backends. With ``JAX_PLATFORMS`` naming
  cuda or unset, the plugin's ``initialize()`` checks the CUDA libraries' versions first and,
  without them, gives up (jax logs "Jax plugin configuration error") before registering its
  topology factory. Compiling needs none of those libraries, so the factory is registered
  here from the plugin's own library, without a CUDA backend (which could not start).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  from jax._src.lib import xla_client  # pylint: disable=g-import-not-at-top
  jax.devices()  # plugin discovery runs with the backends' set-up
  if "cuda" in xla_bridge._topology_factories:  # pylint: disable=protected-access
    return
  from jax_plugins import xla_cuda12  # pylint: disable=g-import-not-at-top
  path = xla_cuda12._get_library_path()  # pylint: disable=protected-access
  if path is None:
    raise ConfigError(f"jax's CUDA plugin has no library; reinstall it: `{PLUGIN_PIP}`")
  c_api = xla_client.load_pjrt_plugin_dynamically("cuda", str(path))
  xla_bridge._topology_factories["cuda"] = functools.partial(  # pylint: disable=protected-access
      xla_client.make_c_api_device_topology, c_api)


def gpu_devices(name: str) -> list:
  """The devices of GPU target ``name`` (e.g. ``"8xa100-80gb"``) for a ``Mesh``.

  They compile (``jit(...).lower(...).compile(compiler_options=COMPILER_OPTIONS)``) but
  cannot run anything. Raises ``ConfigError`` for an unknown name or when the CUDA plugin is
  not importable (the message names the pip command).
  """
  model, count = _check_name(name)
  if not plugin_available():
    raise ConfigError(
        f"compiling for GPU target {name!r} needs jax's CUDA plugin (no GPU or CUDA libraries "
        f"needed): `{PLUGIN_PIP}`, or `pip install --target DIR ...` and DIR on PYTHONPATH")
  _register_topology()
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  topology = topologies.get_topology_desc("", platform="cuda", topology=f"1x1x{count}",
                                          target_config=target_config(model))
  return list(topology.devices)
