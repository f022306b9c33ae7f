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

Layer: above the run builder (``runs.py``); it does not import the trainer.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import ml_collections
import orbax.checkpoint as ocp

from contrastive_jax import checkpoint, distributed, runs


class RestoredRun(NamedTuple):
  """A run rebuilt from its checkpoint: unpack as ``config, method, state, mesh, step``."""
  config: ml_collections.ConfigDict
  method: Any
  state: Any
  mesh: jax.sharding.Mesh
  step: int


# ----------------------------------------------------------------------------- configs


def _tuples(node: Any) -> Any:
  if isinstance(node, Mapping):
    return {k: _tuples(v) for k, v in node.items()}
  if isinstance(node, (list, tuple)):
    return tuple(_tuples(v) for v in node)
  return node


def config_from_json(data: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A checkpoint's JSON config (plain dicts and lists) as a ConfigDict, lists as tuples."""
  if not isinstance(data, Mapping):
    raise ValueError(f"a saved config must be a JSON object, got {type(data).__name__}")
  return ml_collections.ConfigDict(_tuples(data))


def load_config(spec: str) -> ml_collections.ConfigDict:
  """``"configs/x.py[:arg]"`` -> ``get_config(arg)`` of that file (as ``--config`` does).

  The current directory goes on ``sys.path`` first so that a config's ``from configs import
  common`` works when run from the repository root.
  """
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ValueError(f"config file {path!r} does not exist; pass --config=configs/<name>.py[:arg]")
  if os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())
  repo_root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if repo_root not in sys.path:
    sys.path.insert(0, repo_root)
  name = "_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path!r} has no get_config(arg) function")
  return module.get_config(arg or None)


def parse_value(text: str) -> Any:
  """A command-line value: a Python literal (``0.1``, ``True``, ``(16, 32)``, ``None``) or text."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def set_value(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """Sets dotted ``key`` (e.g. ``"loss.temperature"``) in place; the key must already exist.

  Lists become tuples; an int given for a float setting is converted (ConfigDict's own type
  check rejects other mismatches, e.g. a string for a number).
  """
  *path, last = key.split(".")
  node = config
  for i, part in enumerate(path):
    if part not in node or not isinstance(node[part], (ml_collections.ConfigDict, dict)):
      raise ValueError(f"config key {key!r}: {'.'.join(path[:i + 1])!r} is not a section of "
                       "the config; check the spelling against the config file")
    node = node[part]
  if last not in node:
    raise ValueError(f"config key {key!r} does not exist (known in this section: "
                     f"{sorted(node.keys())}); check the spelling against the config file")
  value = _tuples(value)
  if isinstance(node[last], float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  with config.unlocked():  # a config from main.py's flags is locked against new keys only
    node[last] = value


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Sequence[str] | Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Applies ``["a.b=1", ...]`` (values parsed by ``parse_value``) or ``{"a.b": 1}`` in place."""
  if isinstance(overrides, Mapping):
    items = list(overrides.items())
  else:
    items = []
    for text in overrides:
      key, sep, value = text.partition("=")
      if not sep or not key:
        raise ValueError(f"override {text!r} must look like key=value, e.g. loss.temperature=0.1")
      items.append((key.strip(), parse_value(value.strip())))
  for key, value in items:
    set_value(config, key, value)
  return config


# ----------------------------------------------------------------------------- state


def initial_state(method: Any, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """The step-0 ``TrainState`` of a run (same seed, same init as the trainer): the random-init
  baseline that every evaluation should be compared with. ``method`` must be the one
  ``methods.build_method(config, mesh)`` builds (the run builder rebuilds it)."""
  del method  # the run builder rebuilds the same method from config and mesh
  return runs.build_run(config, mesh).init_state()


def saved_config(workdir: str | os.PathLike, step: int | None = None
                 ) -> tuple[ml_collections.ConfigDict, int]:
  """The config stored with checkpoint ``step`` (default: the newest) and that step."""
  directory = checkpoint.run_directory(workdir) / checkpoint.CHECKPOINT_SUBDIR
  if not directory.exists():
    raise ValueError(f"{workdir} has no {checkpoint.CHECKPOINT_SUBDIR}/ directory; pass the "
                     "--workdir of a training run")
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  with ocp.CheckpointManager(directory, options=options,
                             item_names=("state", "data_state", "config")) as manager:
    steps = sorted(manager.all_steps())
    if not steps:
      raise ValueError(f"no checkpoint in {directory}; train first (or pass another --workdir)")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise ValueError(f"--step={step} has no checkpoint in {directory}; available: {steps}")
    restored = manager.restore(int(step), args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return config_from_json(dict(restored.config)), int(step)


def restore_run(workdir: str | os.PathLike, step: int | None = None,
                config: ml_collections.ConfigDict | None = None,
                mesh: jax.sharding.Mesh | None = None) -> RestoredRun:
  """Rebuilds method and TrainState from ``workdir``'s checkpoint.

  Args:
    workdir: a training run's directory (holds ``checkpoints/``).
    step: a specific checkpoint step; ``None`` restores the newest good one (damaged newer
      steps are moved aside by ``Checkpointer.restore_latest_good``, as a resumed run does).
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
  run = runs.build_run(config, mesh)
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=None, async_save=False)
  try:
    if step is None:
      restored = ckpt.restore_latest_good(run.abstract_state)
      if restored is None:
        raise ValueError(f"no checkpoint in {workdir}")
    else:
      restored = ckpt.restore(run.abstract_state, step)
  finally:
    ckpt.close()
  state, _, _, restored_step = restored
  return RestoredRun(config, run.method, state, mesh, restored_step)
