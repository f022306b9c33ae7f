"""What one chip and one host hold when the zero-shot command loads open_clip's ViT-bigG/14.

  python benchmarks/weights_memory.py [--devices 4,64,256] [--chips_per_host 4]

Shapes only (nothing is allocated or compiled): the run that
``python -m contrastive_jax.evaluate.zero_shot_imagenet`` builds for a converted bigG/14
(FSDP, every parameter frozen, so no optimizer state), on simulated CPU meshes of each size.
``init_from`` reads exactly the shards a host's chips hold, so the "per host" column is also
what each host reads from the weights file. Prints a table.
"""

from __future__ import annotations

import argparse
import os
import sys


# open_clip's ViT-bigG-14 (its model_configs/ViT-bigG-14.json): image 1664 wide, 48 blocks,
# head width 104, MLP 8192, patch 14 at 224 px; text 1280 wide, 32 blocks, 20 heads; E 1280.
BIGG_SPEC = dict(
    kind="clip", image_model="vit", embed_dim=1280, image_size=224, logit_scale_shape=[],
    image_kwargs=dict(patch_size=14, width=1664, depth=48, num_heads=16, mlp_dim=8192,
                      pool="cls", posemb="learn", ln_pre=True, patch_bias=False, ln_eps=1e-5,
                      activation="gelu"),
    text_kwargs=dict(vocab_size=49_408, context_length=77, width=1280, depth=32, num_heads=20,
                     mlp_dim=5120, eot_id=None, ln_eps=1e-5, activation="gelu"))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--devices", default="4,64,256")
  p.add_argument("--chips_per_host", type=int, default=4)
  a = p.parse_args(argv)
  sizes = [int(x) for x in a.devices.split(",")]
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={max(sizes)}"
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from contrastive_jax import runs  # pylint: disable=g-import-not-at-top
  from contrastive_jax.convert import init as init_lib  # pylint: disable=g-import-not-at-top
  from contrastive_jax.evaluate import zero_shot_imagenet  # pylint: disable=g-import-not-at-top

  print("| chips | params (GiB) | per chip (MiB) | per host (MiB) | replicated leaves (GiB) |")
  print("|---|---|---|---|---|")
  for n in sizes:
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ("data",))
    config = zero_shot_imagenet.weights_config(BIGG_SPEC, "bigg.safetensors", batch_size=n)
    run = runs.build_run(config, mesh, num_steps=1)
    leaves = init_lib.model_leaves(run.abstract_state)
    nbytes = {k: int(np.prod(x.shape)) * x.dtype.itemsize for k, x in leaves.items()}
    replicated = sum(b for k, b in nbytes.items() if leaves[k].sharding.is_fully_replicated)
    per_chip = run.state_bytes_per_device
    print(f"| {n} | {sum(nbytes.values()) / 2**30:.2f} | {per_chip / 2**20:.0f} | "
          f"{min(n, a.chips_per_host) * per_chip / 2**20:.0f} | {replicated / 2**30:.2f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
