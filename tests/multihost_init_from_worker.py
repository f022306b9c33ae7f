"""One process of the 2-process ``init_from`` test (run by test_multihost.py, not pytest).

usage: python multihost_init_from_worker.py PROCESS_ID NUM_PROCESSES PORT DIR
A tiny CLIP under FSDP over 2 processes x 2 devices: process pair saves a checkpoint of a
seed-123 state (the source run), then loads it through ``init_from`` from the run directory and
from DIR/pretrained.safetensors (written by the test), and writes DIR/out_<i>.json: whether
every local shard equals the source bit for bit, and the sizes of the slices it read.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_threefry_partitionable", True)

import numpy as np  # noqa: E402

from contrastive_jax import checkpoint, runs  # noqa: E402
from contrastive_jax.configs import clip_mnist  # noqa: E402
from contrastive_jax.convert import init as init_lib, tensor_io  # noqa: E402


def config():
  c = clip_mnist.get_config("quick")
  c.global_batch = 16
  c.data.image_size = 16
  c.total_steps = 4
  c.sharding.strategy = "fsdp"
  c.sharding.min_size = 0
  return c


def compare(state, want) -> list[str]:
  """Leaves whose local shards differ from ``want`` (flat path -> full numpy array)."""
  bad = []
  for k, x in init_lib.model_leaves(state).items():
    for s in x.addressable_shards:
      if not np.array_equal(np.asarray(s.data), want[k][s.index]):
        bad.append(k)
  return bad


def main():
  process_id, num_processes, port, work = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                           sys.argv[4])
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=60, heartbeat_timeout_seconds=30)
  c = config()
  run = runs.build_run(c)
  source = run.init_state(seed=123)
  with checkpoint.Checkpointer(os.path.join(work, "src"), async_save=False) as ckpt:
    ckpt.save(1, source, data_state={"step": 1}, config=c)
  leaves = init_lib.model_leaves(run.abstract_state)
  sharded = sorted(k for k, a in leaves.items() if not a.sharding.is_fully_replicated)
  file_values, _ = tensor_io.read_safetensors(os.path.join(work, "pretrained.safetensors"))

  slices = []
  read_slice = tensor_io.read_slice

  def spy(path, name, index=(), **kw):
    out = read_slice(path, name, index, **kw)
    slices.append([name, int(out.size), int(np.prod(leaves[name].shape))])
    return out

  tensor_io.read_slice = spy
  result = {"sharded": sharded}
  for name, path in (("run", os.path.join(work, "src")),
                     ("file", os.path.join(work, "pretrained.safetensors"))):
    c.init_from.path = path
    target = runs.build_run(c)
    state = init_lib.init_state(target)
    if name == "run":  # the source's own shards, gathered here only to compare
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      want = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
              for k, v in init_lib.model_leaves(source).items()}
    else:
      want = file_values
    result[name] = {"mismatched": compare(state, want),
                    "spread": [k for k, x in init_lib.model_leaves(state).items()
                               if not x.is_fully_addressable]}
  result["slices"] = slices
  with open(os.path.join(work, f"out_{process_id}.json"), "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  main()
