"""Mesh and multi-host helpers shared by the losses' tests, the trainer and the evaluators.

The whole codebase uses one 1-D mesh with a single axis, ``"data"``, over all devices of all
processes. The device order comes from ``jax.experimental.mesh_utils.create_device_mesh``: on a
TPU torus it puts physical neighbours next to each other, so the ring of ``ppermute`` steps
(``losses/ring.py``) and the all-gathers/reduce-scatters of FSDP travel over direct links; on CPU
and GPU it is the ``jax.devices()`` order (GPU: sorted by id). The input pipeline and the
evaluators take the order from the mesh, so it is the one canonical order. Axes are ``Auto`` so
that the model runs in the global view under ``jit`` (BatchNorm statistics over the sharded
batch are then global: sync BN) while the contrastive losses run per shard under
``jax.shard_map``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D ``("data",)`` mesh over ``devices`` (default: the first ``num_devices`` of all hosts).

  Args:
    num_devices: how many devices to use; ``None`` means all of ``jax.devices()``.
    devices: explicit device list; overrides ``num_devices``.
  """
  if devices is None:
    all_devices = jax.devices()
    if num_devices is None:
      num_devices = len(all_devices)
    if not 0 < num_devices <= len(all_devices):
      raise ValueError(
          f"mesh of {num_devices} devices requested but {len(all_devices)} are visible; "
          "set num_devices to at most jax.device_count()")
    devices = all_devices[:num_devices]
  return Mesh(device_order(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def device_order(devices: Sequence[jax.Device]) -> np.ndarray:
  """``devices`` as a 1-D array in ring order for the physical topology.

  Multi-slice TPU runs (devices with several ``slice_index`` values) get the hybrid mesh, slices
  outermost, so only one hop of the ring crosses the data-centre network per slice. A device
  subset that ``mesh_utils`` cannot lay out (e.g. 3 chips of a 2x2 torus) keeps the given order.
  """
  devices = list(devices)
  slices = {getattr(d, "slice_index", 0) for d in devices}
  try:
    if len(slices) > 1:
      per_slice = len(devices) // len(slices)
      order = mesh_utils.create_hybrid_device_mesh((per_slice,), (len(slices),), devices)
    else:
      order = mesh_utils.create_device_mesh((len(devices),), devices)
  except (ValueError, NotImplementedError, AssertionError) as error:
    logging.warning("mesh_utils could not lay out %d devices (%s); using the given order",
                    len(devices), error)
    return np.asarray(devices)
  return np.asarray(order).reshape(-1)


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over ``"data"``, the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_divisible(global_batch: int, mesh: Mesh, what: str = "global batch") -> int:
  """Returns the per-device batch; raises a clear error when it is not a whole number.

  Called on static shapes before anything is compiled.
  """
  n = mesh.size
  if global_batch <= 0 or global_batch % n:
    raise ValueError(
        f"{what} of {global_batch} is not divisible by the {n} devices of the mesh; "
        f"use a multiple of {n} (e.g. {max(n, (global_batch // n) * n) or n}) or fewer devices")
  procs = jax.process_count()
  if global_batch % procs:
    raise ValueError(
        f"{what} of {global_batch} is not divisible by the {procs} processes; "
        f"use a multiple of {procs}")
  return global_batch // n


def host_local_to_global(local_batch: Any, mesh: Mesh) -> Any:
  """Turns this process's numpy batch (a pytree) into global ``jax.Array``s sharded on "data".

  Every leaf's leading dimension is this host's share of the global batch; the global leading
  dimension is ``process_count`` times it.
  """
  sharding = data_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           cpu_collectives: str | None = None,
                           heartbeat_timeout_s: int | None = None,
                           shutdown_timeout_s: int | None = None) -> None:
  """Calls ``jax.distributed.initialize`` when a multi-process run is asked for or detected.

  On Cloud TPU pods and SLURM, jax detects the cluster itself (all arguments ``None``). On a
  CPU machine (the local multi-process launcher and tests) pass the coordinator, count and id,
  and ``cpu_collectives="gloo"`` so that cross-process collectives work on CPU.

  ``heartbeat_timeout_s``: a process that sent no heartbeat for this long counts as dead and
  the survivors abort (jax's default 100 s; a survivor of a dead peer otherwise blocks in a
  collective or in the shutdown barrier until then). ``shutdown_timeout_s``: how long a
  finishing process waits at exit for the others (jax's default 300 s). ``None`` keeps jax's
  defaults.
  """
  if cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  timeouts = {}
  if heartbeat_timeout_s is not None:
    timeouts["heartbeat_timeout_seconds"] = int(heartbeat_timeout_s)
  if shutdown_timeout_s is not None:
    timeouts["shutdown_timeout_seconds"] = int(shutdown_timeout_s)
  for name, value in timeouts.items():
    if value <= 0:
      raise ValueError(f"{name}={value} must be a positive number of seconds")
  if coordinator_address is None and num_processes is None and process_id is None:
    # auto-detection (TPU pod, SLURM, ...); raises if none found.
    jax.distributed.initialize(**timeouts)
    return
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes,
      process_id=process_id, **timeouts)


def sum_over_processes(value: int) -> int:
  """The sum of an integer over all processes (e.g. the corrupt records each host skipped).

  A collective: every process must call it at the same point (the trainer does at its log
  steps). One process: ``value`` itself, no communication.
  """
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(np.sum(multihost_utils.process_allgather(np.asarray(value, np.int64))))
