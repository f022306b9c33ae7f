"""Rebuild a run from its directory: config files, overrides, method and state of a checkpoint.

Used by the standalone evaluator (``python -m contrastive_jax.evaluate``) and the launch tools
(``launch/sweep.py``, ``launch/results_table.py``). A checkpoint step holds the run's config as
JSON (``checkpoint.Checkpointer.save``), so a checkpoint can be evaluated without the config
file that trained it:

  run = restore_run("/tmp/simclr_mnist")          # newest good step, config read from it
  feats = run.method.encode(run.state, images)

JSON has no tuples, so ``config_from_json`` turns every list back into a tuple (model widths,
crop ranges, few-label shots): flax module fields and ``AugmentConfig`` expect hashable tuples.

The state is restored the way ``train.train_and_evaluate`` resumes: ``runs.build_run`` gives
the abstract ``TrainState`` with the shardings of ``config.sharding`` (replicated or FSDP) on a
mesh over all devices, and orbax reads the arrays straight into those shardings, whatever the
device count and strategy that wrote the checkpoint.

Read-only: every function here opens the checkpoints with ``read_only=True`` (see
``checkpoint.Checkpointer``), so a run can be evaluated while it trains: nothing under
``checkpoints/`` is created, cleaned, moved or written, and the trainer's in-progress save is
left alone.

Layer: above the run builder (``runs.py``); it does not import the trainer.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import ml_collections

from contrastive_jax import checkpoint, distributed, runs
# The config helpers live with the configs; re-exported for the tools that restore runs.
from contrastive_jax.configs import (  # noqa: F401
    apply_overrides, config_from_json, load_config, parse_value, set_value)
from contrastive_jax.errors import RunDirectoryError


class RestoredRun(NamedTuple):
  """A run rebuilt from its checkpoint: unpack as ``config, method, state, mesh, step``."""
  config: ml_collections.ConfigDict
  method: Any
  state: Any
  mesh: jax.sharding.Mesh
  step: int


# ----------------------------------------------------------------------------- state


def initial_state(method: Any, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """The step-0 ``TrainState`` of a run (same seed, same init as the trainer): the random-init
  baseline that every evaluation should be compared with. ``method`` must be the one
  ``methods.build_method(config, mesh)`` builds (the run builder rebuilds it)."""
  del method  # the run builder rebuilds the same method from config and mesh
  return runs.build_run(config, mesh, check=False).init_state()


def saved_config(workdir: str | os.PathLike, step: int | None = None
                 ) -> tuple[ml_collections.ConfigDict, int]:
  """The config stored with checkpoint ``step`` (default: the newest) and that step."""
  directory = checkpoint.checkpoint_directory(workdir)
  if not directory.exists():
    raise RunDirectoryError(f"{workdir} has no {checkpoint.CHECKPOINT_SUBDIR}/ directory; pass the "
                     "--workdir of a training run")
  with checkpoint.Checkpointer(workdir, read_only=True) as ckpt:
    steps = ckpt.all_steps()
    if not steps:
      raise RunDirectoryError(f"no checkpoint in {directory}; train first (or pass another "
                              "--workdir)")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise RunDirectoryError(f"--step={step} has no checkpoint in {directory}; available: {steps}")
    config = ckpt.restore_config(step)
  return config_from_json(config), int(step)


def restore_run(workdir: str | os.PathLike, step: int | None = None,
                config: ml_collections.ConfigDict | None = None,
                mesh: jax.sharding.Mesh | None = None) -> RestoredRun:
  """Rebuilds method and TrainState from ``workdir``'s checkpoint.

  Args:
    workdir: a training run's directory (holds ``checkpoints/``).
    step: a specific checkpoint step; ``None`` restores the newest good one (damaged newer
      steps are skipped and left where they are: only the trainer moves them aside).
    config: use this config instead of the one saved with the checkpoint (it must describe the
      same model and optimizer, or the restore fails with the checkpoint's shapes; its
      ``sharding`` may differ: a replicated run's checkpoint restores into FSDP and back).
    mesh: the mesh to restore onto; default all devices.

  Returns:
    ``RestoredRun(config, method, state, mesh, step)``; every state leaf is placed on ``mesh``
    as ``config.sharding`` says (replicated when the config has no ``sharding``).
  """
  if config is None:
    # The newest step's config; with restore_latest_good an older step may end up restored,
    # and its config is the same run's (a resumed run keeps its model and optimizer).
    config, _ = saved_config(workdir, step)
  mesh = distributed.make_mesh(None) if mesh is None else mesh
  run = runs.build_run(config, mesh, check=False)  # no training checks: any mesh restores
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  try:
    if step is None:
      restored = ckpt.restore_latest_good(run.abstract_state)
      if restored is None:
        raise RunDirectoryError(f"no checkpoint in {workdir}; train first (or pass another "
                                "--workdir)")
    elif step not in ckpt.all_steps():
      raise RunDirectoryError(f"--step={step} has no checkpoint in {ckpt.directory}; "
                              f"available: {ckpt.all_steps()}")
    else:
      restored = ckpt.restore(run.abstract_state, step)
  finally:
    ckpt.close()
  state, _, _, restored_step = restored
  return RestoredRun(config, run.method, state, mesh, restored_step)
