#!/usr/bin/env python3
"""Rehearses a config as a pod on this machine (``python -m contrastive_jax.tools.rehearse``):

  python launch/rehearse.py configs/clip_vit_b32.py [--processes 2 --devices 2 --steps 6 \
      --image_size 64 --batch 8 --workdir /tmp/rehearsal_clip]

Prints what is real, what was shrunk and what cannot be rehearsed on CPUs, then runs the
config's real architecture, optimizer, loss and data format on P processes x D simulated
devices: uninterrupted, then with kill -9 of one process after a checkpoint and a restart of
all, and checks that the restarted run logs the uninterrupted run's losses. Exit 0: passed.
Run it from the checkout's root, or with the package installed.
"""

import runpy

if __name__ == "__main__":
  runpy.run_module("contrastive_jax.tools.rehearse", run_name="__main__", alter_sys=True)
