"""One process of the 2-process restore tests (run by test_multihost.py, not pytest).

usage: python multihost_restore_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.json WORKDIR...
Each process restores from its own copy of each run's checkpoints (each WORKDIR in turn, one
scenario each), as hosts whose views of a shared filesystem differ, and writes, per WORKDIR,
the step it restored, the value it read and the steps it found damaged.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from contrastive_jax import checkpoint, distributed  # noqa: E402


def main():
  process_id, num_processes, port, out = (
      int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
  workdirs = sys.argv[5:]
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=60, heartbeat_timeout_seconds=30)
  mesh = distributed.make_mesh()
  abstract = {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=distributed.replicated(mesh))}
  results = {}
  for workdir in workdirs:
    ckpt = checkpoint.Checkpointer(workdir, async_save=False)
    state, data_state, _, step = ckpt.restore_latest_good(abstract)
    ckpt.close()
    results[workdir] = {"step": step, "data_step": data_state["step"],
                        "w": np.asarray(state["w"].addressable_data(0)).tolist(),
                        "damaged": sorted(ckpt.damaged_steps)}
  with open(out, "w") as f:
    json.dump(results, f)


if __name__ == "__main__":
  main()
