#!/usr/bin/env python3
"""Rehearses a config as a pod on this machine (see contrastive_jax/rehearsal.py):

  python launch/rehearse.py configs/clip_vit_b32.py [--processes 2 --devices 2 --steps 6 \
      --image_size 64 --batch 8 --workdir /tmp/rehearsal_clip]

Prints what is real, what was shrunk and what cannot be rehearsed on CPUs, then runs the
config's real architecture, optimizer, loss and data format on P processes x D simulated
devices: uninterrupted, then with kill -9 of one process after a checkpoint and a restart of
all, and checks that the restarted run logs the uninterrupted run's losses. Exit 0: passed.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from contrastive_jax import rehearsal  # noqa: E402

if __name__ == "__main__":
  sys.exit(rehearsal.main())
