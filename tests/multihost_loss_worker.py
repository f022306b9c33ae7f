"""One process of the 2-process x 2-device loss test (run by test_multihost.py, not pytest).

usage: python multihost_loss_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz
Each process feeds only its half of the global batch; process 0 writes the global losses and
the gathered gradients.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from contrastive_jax import distributed, losses  # noqa: E402


GROUPED = ("nt_xent_supcon_ring", "clip_multi_ring")


def main():
  process_id, num_processes, port, out = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                          sys.argv[4])
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=60)
  mesh = distributed.make_mesh()
  assert mesh.size == 2 * num_processes, mesh

  data = np.load(os.path.join(os.path.dirname(out), "inputs.npz"))
  a, b, queue = data["a"], data["b"], data["queue"]
  per_host = a.shape[0] // num_processes
  mine = slice(process_id * per_host, (process_id + 1) * per_host)
  ga, gb = distributed.host_local_to_global({"a": a[mine], "b": b[mine]}, mesh).values()
  # Group ids (labels, caption ids) are split over the processes like the embeddings.
  groups = distributed.host_local_to_global({"g": data["groups"][mine]}, mesh)["g"]
  hard = losses.NegativeOptions(debias_tau_plus=0.1, hard_beta=1.0)
  multi = losses.NegativeOptions(multi_positive=True)

  cases = {
      "nt_xent": (losses.nt_xent, (0.1,)),
      "clip": (losses.clip_loss, (jnp.float32(14.3),)),
      "moco": (losses.moco_loss, (jnp.asarray(queue), 0.2)),
      "moco_v3": (losses.moco_v3_loss, (0.2,)),
      "siglip": (losses.siglip_loss, (jnp.float32(10.0), jnp.float32(-10.0))),
      "nt_xent_hard": (losses.get_loss("nt_xent", options=hard), (0.1,)),
      "nt_xent_supcon_ring": (losses.get_loss("nt_xent", "ring", options=multi), (0.1,)),
      "clip_multi_ring": (losses.get_loss("clip", "ring", options=multi),
                          (jnp.float32(14.3),)),
  }
  results = {}
  for name, (fn, extra) in cases.items():
    f = losses.sharded(fn, mesh)
    grouped = name in GROUPED

    def loss(x, y, g, f=f, extra=extra, grouped=grouped):
      return f(x, y, *extra, **({"groups": g} if grouped else {}))

    value, (da, db) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(ga, gb, groups)
    results[f"{name}/loss"] = np.asarray(value.addressable_data(0))  # replicated
    results[f"{name}/da"] = np.asarray(multihost_utils.process_allgather(da, tiled=True))
    results[f"{name}/db"] = np.asarray(multihost_utils.process_allgather(db, tiled=True))
  # A host-side count (e.g. corrupt records skipped) summed over the hosts: 1 + 2.
  results["sum_over_processes"] = np.asarray(distributed.sum_over_processes(process_id + 1))
  if process_id == 0:
    np.savez(out, **results)
  multihost_utils.sync_global_devices("done")
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
