"""One process of the 1-vs-2-process evaluation test (run by test_eval_runner.py, not pytest).

usage: python multihost_eval_worker.py PROCESS_ID NUM_PROCESSES DEVICES_PER_PROCESS PORT OUT.json
    [KARPATHY.json IMAGES_DIR]
Every process builds the same tiny CLIP run at its step-0 state, then runs every evaluator of
``evaluator_config()`` on tfds mock MNIST (and, given a Karpathy split file, retrieval on its
test split), reading and encoding only its shard; process 0 writes the results.
"""

import json
import os
import sys

if __name__ == "__main__":  # imported by a test for ``evaluator_config``: leave jax alone
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={int(sys.argv[3])}"
  os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

if __name__ == "__main__":
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_threefry_partitionable", True)

import tensorflow_datasets as tfds  # noqa: E402

from contrastive_jax import runs  # noqa: E402
from contrastive_jax.configs import clip_mnist  # noqa: E402
from contrastive_jax.evaluate import runner  # noqa: E402

NUM_EXAMPLES = 40  # per split; not a multiple of the eval batch: padded last batches


def evaluator_config():
  c = clip_mnist.get_config("quick")
  c.data.source, c.data.name, c.data.cache = "tfds", "mnist", True
  c.data.image_size = 16
  c.data.context_length = 16
  c.model.name = "convnet"
  c.model.kwargs = dict(widths=(8, 8), strides=(2, 2))
  c.text.kwargs = dict(width=16, depth=1, num_heads=2)
  c.clip.embed_dim = 16
  c.total_steps = 1
  c.eval.evaluators = {
      "knn": dict(type="knn", k=5, batch_size=16),
      "linear": dict(type="linear_probe", batch_size=16, l2_grid=(1e-3, 1e-1)),
      "zero_shot": dict(type="zero_shot", batch_size=16),
      "zs_custom": dict(type="zero_shot", templates=("a digit {}.", "the number {}"),
                        batch_size=8),
      "retrieval": dict(type="retrieval", ks=(1, 5), batch_size=16),
  }
  return c


def karpathy_evaluator(path, images_dir, batch_size=16):
  """Retrieval on the test split of a Karpathy-format file (Flickr30k / COCO), 5 captions."""
  return dict(type="retrieval", ks=(1, 5, 10), batch_size=batch_size,
              data=dict(source="karpathy_json", path=path, images_dir=images_dir,
                        eval_split="test", captions_per_image=5, cache=True))


def main():
  process_id, num_processes, port, out = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[4],
                                          sys.argv[5])
  if num_processes > 1:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=60)
  config = evaluator_config()
  if len(sys.argv) > 7:
    config.eval.evaluators["flickr"] = karpathy_evaluator(sys.argv[6], sys.argv[7])
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    run = runs.build_run(config)
    state = run.init_state()
    evaluators = runner.Runner(config, run.method, run.mesh)
    results = evaluators.run(state, list(evaluators.specs))
  if jax.process_index() == 0:
    with open(out, "w") as f:
      json.dump({"devices": jax.device_count(), "processes": jax.process_count(),
                 "results": results}, f)


if __name__ == "__main__":
  main()
