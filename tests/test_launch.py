"""launch/local_multiprocess.sh: the pod code path with 2 processes on this machine."""

from __future__ import annotations

import os
import re
import subprocess

import numpy as np

from contrastive_jax.configs import simclr_mnist
from contrastive_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _logged_losses(log: str) -> dict[int, float]:
  return {int(m.group(1)): float(m.group(2))
          for m in re.finditer(r"step (\d+): .*?\bloss=([-\d.e+]+)", log)}


def test_two_processes_agree_and_checkpoint_restores_in_one(tmp_path):
  workdir = tmp_path / "run"
  flags = ["--config.eval.enabled=False", "--config.data.image_size=16",
           "--config.log_every=1", "--config.checkpoint.async_save=False"]
  env = dict(os.environ, TIMEOUT_S="300")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      ["bash", os.path.join(ROOT, "launch", "local_multiprocess.sh"), "2", "2", str(workdir),
       "configs/simclr_mnist.py:quick", *flags],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=360)
  logs = [(workdir / f"process_{i}.log").read_text() for i in range(2)]
  assert proc.returncode == 0, proc.stdout[-3000:] + "\n".join(log[-3000:] for log in logs)
  losses = [_logged_losses(log) for log in logs]
  assert sorted(losses[0]) == [1, 2, 3, 4], logs[0][-2000:]
  assert losses[0] == losses[1]          # both processes computed the same global step
  assert "4 global devices" in logs[0] or "4 devices" in logs[0]

  # The 2-process checkpoint (4 devices) restores in this single process (8 devices) and
  # training continues from step 4.
  c = simclr_mnist.get_config("quick")
  c.eval.enabled = False
  c.data.image_size = 16
  c.log_every = 1
  c.total_steps = 6
  c.checkpoint.async_save = False
  summary = train.train_and_evaluate(c, str(workdir)).summary
  assert [h["step"] for h in summary["train_history"]] == [5, 6]
  assert np.isfinite(summary["final_train"]["loss"])
