"""How often float32 rounding alone flips the trajectory of ``simclr_mnist:quick``.

``tests/test_launch.py`` compares 4 steps of a 2-process x 2-device SimCLR run with a 1-process
x 4-device run at ``rtol=2e-5``. The two round differently (gloo's all-reduce adds the devices
in another order than XLA:CPU's in-process one), and after two LARS steps their states differ by
about 1e-6 relative per leaf. This script trains the test's config (16 px, batch 32, 4 devices)
for 2 steps, then runs steps 3 and 4 from that state and from copies whose parameters and BN
statistics are multiplied by ``1 + eps N(0, 1)``, and prints the relative change of each step's
gradient norm. A draw over ``2e-5`` moved a ReLU pre-activation across zero (its derivative
jumps from 0 to 1): the jump is one fixed size per kink, whatever ``eps``.

  python benchmarks/relu_kink.py [--eps 1e-6] [--draws 12]     # about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from contrastive_jax import distributed, runs  # noqa: E402
from contrastive_jax.configs import simclr_mnist  # noqa: E402
from contrastive_jax.data import pipeline  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--eps", type=float, default=1e-6)
  parser.add_argument("--draws", type=int, default=12)
  args = parser.parse_args()
  jax.config.update("jax_threefry_partitionable", True)

  config = simclr_mnist.get_config("quick")  # as tests/test_launch.py's flags set it
  config.eval.enabled = False
  config.data.image_size = 16
  config.num_devices = 4
  mesh = distributed.make_mesh(4)
  run = runs.build_run(config, mesh)
  it = pipeline.train_iterator(config.data, mode=run.method.input_mode,
                               global_batch=config.global_batch, seed=config.seed, start_step=0)
  batches = [distributed.host_local_to_global(next(it), mesh) for _ in range(4)]
  state = run.init_state()
  for b in batches[:2]:
    state, _ = run.train_step(state, b)
  state2 = jax.device_get(state)

  def steps_3_4(s):
    s = jax.device_put(jax.tree.map(lambda x: jnp.copy(x) if isinstance(x, jax.Array) else x, s),
                       run.state_sharding)   # the step donates its state: copy the key too
    norms = []
    for b in batches[2:]:
      s, m = run.train_step(s, b)
      norms.append(float(m["grad_norm"]))
    return np.array(norms)

  ref = steps_3_4(state2)
  rng = np.random.RandomState(0)

  def perturb(x):
    x = np.asarray(x)
    return (x * (1 + args.eps * rng.randn(*x.shape))).astype(x.dtype)

  print(f"simclr_mnist:quick, 16 px, batch 32, 4 CPU devices; grad norm at steps 3, 4 from the "
        f"step-2 state: {ref[0]:.7g}, {ref[1]:.7g}")
  print(f"| draw (eps={args.eps:g}) | step 3: relative change | step 4: relative change | "
        f"over 2e-5 |")
  print("|---|---|---|---|")
  over = 0
  for d in range(args.draws):
    s = state2.replace(params=jax.tree.map(perturb, state2.params),
                       batch_stats=jax.tree.map(perturb, state2.batch_stats))
    rel = np.abs(steps_3_4(s) - ref) / ref
    over += bool(np.any(rel > 2e-5))
    print(f"| {d} | {rel[0]:.2e} | {rel[1]:.2e} | {'yes' if np.any(rel > 2e-5) else 'no'} |")
  print(f"{over} of {args.draws} draws over rtol 2e-5")


if __name__ == "__main__":
  main()
