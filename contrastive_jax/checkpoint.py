"""Checkpoints: orbax ``CheckpointManager`` under ``workdir/checkpoints``, resume, preemption.

One step directory ``checkpoints/<step>/`` holds three items:

* ``state``: the whole ``TrainState`` (params, batch_stats, opt_state, rng, EMA, MoCo queue and
  pointer) through ``ocp.args.StandardSave``; restored with the shardings of an abstract state,
  so a checkpoint written by 8 devices restores onto 1, 4 or 512;
* ``data_state``: the input position as JSON (e.g. ``{"step": s}``), so the pipeline resumes
  with the same order;
* ``config``: the run's config as JSON, for provenance and for checking a resumed run.

Atomicity and damaged steps. orbax writes a step into a temporary directory and commits it
(atomic rename, or a ``commit_success.txt`` marker on object stores) only after every item
is written; an interrupted save leaves an uncommitted temporary directory that is never listed
and is removed at the trainer's next start (``cleanup_tmp_directories=True``). Older steps beyond
``max_to_keep`` are deleted only after the new step has committed. A committed step can still
be damaged afterwards (a truncated or deleted file, a disk or copy fault, garbage metadata).
``restore_latest_good`` tries steps from the newest down; when an older step restores with the
same abstract state, every newer step that failed is proven damaged (not a mismatch of the
abstract state) and its directory is *moved*, never deleted, to ``checkpoints/damaged/<step>``
(not a step name, so orbax ignores it). Without the move, the damaged step would stay the
newest and later saves' garbage collection would delete good steps while keeping it, and a
re-save of that step number would collide with it. When every step fails, nothing is moved
and a ``CheckpointMismatchError`` (a ``RuntimeError``) lists the reasons (most often the abstract
state does not match the checkpoint, e.g. after a change of model config).

Readers. Only the trainer writes under ``checkpoints/``. Everything else that reads a run (the
standalone evaluator, ``restore.py``, ``launch/results_table.py``) opens it with
``Checkpointer(workdir, read_only=True)``: orbax's ``CheckpointManagerOptions(read_only=True)``
(no directory creation, no temporary-directory cleanup, no save, no deletion) and no moving
aside here, so a reader never touches a live run. A cleanup by a reader would delete the
trainer's in-progress save (an uncommitted temporary directory looks the same whether its
writer died or is still writing) and make the trainer fail at its commit. A read-only
``restore_latest_good`` skips a damaged step (logged, recorded in ``damaged_steps``) and leaves
it where it is: moving it is the trainer's job at its next start.

Hosts agree on the step before reading any array: the candidates are the steps that *every*
process lists. A newly committed step can be missing from one host's listing for a while (a
shared or object-store filesystem lists with a lag); such a step is not a candidate, so all
hosts restore the step before it, and nothing is moved aside (the step is not damaged, only
not yet visible everywhere).

Preemption. ``install_preemption_handler`` records SIGTERM in a flag (the handler does no
other work: it may run between any two bytecodes of the training loop); the loop calls
``reached_preemption(step, preempted)`` each step and, when True, saves with ``force=True``,
waits and exits. On a multi-process run every process must agree on the step (orbax saves are
collective), so there it defers to jax's preemption service:
``jax.experimental.multihost_utils.reached_preemption_sync_point(step)``, which returns True on
all processes at the same step once any of them has been notified (the service installs its
own SIGTERM notifier; see the functions' docstrings).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from contrastive_jax.errors import CheckpointMismatchError, require

logger = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
DAMAGED_SUBDIR = "damaged"
_ITEMS = ("state", "data_state", "config")


def check_config(config: Any) -> None:
  """``config.checkpoint``'s intervals and ``max_to_keep``; a ``ConfigError`` naming the key."""
  for key in ("every_steps", "preemption_check_every"):
    value = config.checkpoint[key]
    require(isinstance(value, int) and value > 0,
            f"config.checkpoint.{key}={value!r} must be >= 1")
  keep = config.checkpoint.max_to_keep
  require(keep is None or keep >= 1, f"config.checkpoint.max_to_keep={keep} must be >= 1 "
          "(or None to keep every checkpoint)")


def run_directory(workdir: str | os.PathLike) -> epath.Path:
  """``workdir`` as an absolute path (orbax rejects relative ones); ``gs://...`` unchanged."""
  text = os.fspath(workdir)
  return epath.Path(text if "://" in text else os.path.abspath(text))


def checkpoint_directory(workdir: str | os.PathLike) -> epath.Path:
  """``workdir/checkpoints``: the one place that names where a run's checkpoints live (the
  trainer, ``restore.py`` and the standalone evaluator all ask here)."""
  return run_directory(workdir) / CHECKPOINT_SUBDIR


class _QuietOrbax(logging.Filter):
  """Drops orbax's per-save INFO chatter; its warnings and errors still show."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def quiet_orbax_logs() -> None:
  """Drops orbax's per-save INFO lines from absl's log; idempotent."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logger = absl_logging.get_absl_logger()
  if not any(isinstance(f, _QuietOrbax) for f in absl_logger.filters):
    absl_logger.addFilter(_QuietOrbax())


def show_progress_logs() -> None:
  """For tools that train in-process without ``absl.app`` (which hides INFO): shows the
  training progress (steps/s, ETA, evaluations, logged through absl at INFO) without orbax's
  per-save INFO lines. ``main.py`` leaves the level to absl's ``--verbosity`` flag."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.INFO)
  quiet_orbax_logs()


def _json_default(obj: Any) -> Any:
  if isinstance(obj, (np.generic, np.ndarray)) or hasattr(obj, "tolist"):
    return np.asarray(obj).tolist()
  if isinstance(obj, (set, frozenset)):
    return sorted(obj)
  return str(obj)  # e.g. a dtype or a callable in a config: kept for provenance only


def to_jsonable(config: Any) -> dict[str, Any]:
  """A ConfigDict or mapping as plain JSON types (tuples become lists, unknowns strings)."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  if not isinstance(config, Mapping):
    raise ValueError(f"config must be a dict or ConfigDict, got {type(config).__name__}")
  return json.loads(json.dumps(dict(config), default=_json_default))


def _state_summary(error: BaseException) -> str:
  text = f"{type(error).__name__}: {error}"
  return text if len(text) <= 500 else text[:500] + "..."


class Checkpointer:
  """orbax ``CheckpointManager`` for TrainState + data position + config in ``workdir/checkpoints``.

  Args:
    workdir: the run directory (local path or ``gs://...``).
    max_to_keep: how many most recent steps to keep.
    save_interval_steps: ``save`` writes only at multiples of this (unless ``force``); the
      first save of a run with no checkpoint yet is always written (orbax's
      ``InitialSavePolicy``), and so is a save at a preemption sync point.
    async_save: write in a background thread; ``save`` returns once the arrays are copied to
      host memory, so the caller may donate the state's buffers to the next step right away.
    read_only: open the run for reading only (every reader of a run that may be training):
      nothing is created, cleaned, written, deleted or moved under ``checkpoints/``; ``save``
      raises and ``restore_latest_good`` skips damaged steps without moving them.

  Attributes:
    damaged_steps: ``{step: reason}`` of steps that ``restore_latest_good`` found damaged.
  """

  def __init__(self, workdir: str | epath.PathLike, *, max_to_keep: int | None = 3,
               save_interval_steps: int = 1, async_save: bool = True, read_only: bool = False):
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep={max_to_keep} must be >= 1 (or None to keep all)")
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps={save_interval_steps} must be >= 1")
    self.directory = checkpoint_directory(workdir)
    self.read_only = read_only
    self.damaged_steps: dict[int, str] = {}
    if read_only:
      # Every option that writes is off here already (orbax's read_only=True would reset
      # them itself, with a warning for each).
      options = ocp.CheckpointManagerOptions(
          read_only=True, create=False, cleanup_tmp_directories=False, max_to_keep=None,
          save_interval_steps=0, enable_async_checkpointing=False)
    else:
      options = ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep,
          save_interval_steps=save_interval_steps,
          enable_async_checkpointing=async_save,
          cleanup_tmp_directories=True,
          create=True,
      )
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

  # -------------------------------------------------------------------------- saving

  def save(self, step: int, state: Any, *, data_state: Mapping[str, Any], config: Any,
           force: bool = False) -> bool:
    """Saves ``state`` (StandardSave), ``data_state`` and ``config`` (JSON) at ``step``.

    Returns whether a save was started (False between save intervals unless ``force``).
    Collective on multi-process runs: every process calls it with the same step.
    """
    if self.read_only:
      raise ValueError(f"this Checkpointer of {self.directory} is read-only (read_only=True); "
                       "only the trainer saves")
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data_state=ocp.args.JsonSave(to_jsonable(data_state)),
        config=ocp.args.JsonSave(to_jsonable(config)),
    )
    return self._manager.save(int(step), args=args, force=force)

  def wait(self) -> None:
    """Blocks until pending async saves have committed (raises their errors)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager's threads."""
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -------------------------------------------------------------------------- restoring

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore(self, abstract_state: Any, step: int | None = None
              ) -> tuple[Any, dict[str, Any], dict[str, Any], int]:
    """Restores ``step`` (default: the latest) into the shapes/shardings of ``abstract_state``.

    Args:
      abstract_state: the TrainState as a pytree of ``jax.ShapeDtypeStruct`` with
        ``.sharding`` (e.g. ``jax.eval_shape(init)`` with shardings attached); the restored
        arrays get these shardings, whatever the device count that wrote the checkpoint.
      step: which step; ``None`` for the latest.

    Returns:
      ``(state, data_state, config_dict, step)``.

    Raises:
      FileNotFoundError: when there is no checkpoint (or not that step).
      CheckpointMismatchError: when the step's saved state has other leaves or shapes than
        ``abstract_state`` (checked on the metadata, before any array is read).
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no checkpoint in {self.directory}")
    elif step not in self._manager.all_steps():
      raise FileNotFoundError(
          f"no checkpoint for step {step} in {self.directory}; available: {self.all_steps()}")
    mismatch = self._mismatch(step, abstract_state)
    if mismatch:
      raise CheckpointMismatchError(
          f"checkpoint step {step} in {self.directory} does not fit the state this config "
          f"builds ({mismatch}); restore with the run's original config")
    return self._restore_step(abstract_state, step)

  def _restore_step(self, abstract_state: Any, step: int
                    ) -> tuple[Any, dict[str, Any], dict[str, Any], int]:
    restored = self._manager.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data_state=ocp.args.JsonRestore(),
        config=ocp.args.JsonRestore(),
    ))
    return restored.state, dict(restored.data_state), dict(restored.config), int(step)

  def restore_config(self, step: int) -> dict[str, Any]:
    """The config saved with ``step`` (JSON), without reading the state."""
    restored = self._manager.restore(int(step), args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))
    return dict(restored.config)

  def restore_latest_good(self, abstract_state: Any
                          ) -> tuple[Any, dict[str, Any], dict[str, Any], int] | None:
    """Restores the newest step that reads back cleanly; ``None`` when there is no checkpoint.

    Every process restores the same step, agreed before any array is read: the candidates are
    the steps that every process lists, and a step is tried only when its metadata reads back
    on every process (``_unreadable``, a cheap check of the JSON and manifest files) and its
    saved leaves and shapes are those of ``abstract_state`` (``_mismatch``). Checking the
    shapes first means that a changed model fails without reading any array: a failing orbax
    restore leaves TensorStore reads in flight that report into its closed event loop (a
    traceback each, after our error). A step that fails these checks on any process is
    skipped by all of them, so a host whose view of the newest step is damaged cannot restore
    a different step from the others or wait alone at orbax's restore barrier. On one
    process, a step whose arrays then fail to restore is skipped too. Damaged newer steps
    (proven damaged because an older step restores with the same ``abstract_state``) are
    logged, recorded in ``damaged_steps`` and moved to ``checkpoints/damaged/<step>``; a
    ``read_only`` Checkpointer only skips them. If no step restores, nothing is moved and a
    ``CheckpointMismatchError`` reports each step's error.
    """
    self._manager.reload()  # see steps written or moved by others since construction
    steps = _common_steps(sorted(self._manager.all_steps(), reverse=True))
    if not steps:
      return None
    failures: dict[int, str] = {}
    for step in steps:
      reason = self._unreadable(step)
      if reason is None:
        try:
          reason = self._mismatch(step, abstract_state)
        except Exception as error:  # noqa: BLE001 -- unreadable array metadata
          reason = _state_summary(error)
      bad = _processes_where(reason is not None)
      if bad:
        failures[step] = reason or f"damaged as seen from process(es) {bad}"
        where = f" as seen from process(es) {bad}" if jax.process_count() > 1 else ""
        logger.warning("checkpoint step %d in %s is damaged or does not fit%s: %s",
                       step, self.directory, where, failures[step])
        continue
      try:
        result = self._restore_step(abstract_state, step)
      except Exception as error:  # noqa: BLE001 -- any read/parse failure marks the step
        if jax.process_count() > 1:
          # The other processes may be inside orbax's collective restore: no safe way on.
          raise RuntimeError(
              f"checkpoint step {step} in {self.directory} passed the metadata check on every "
              f"process but failed to restore here ({_state_summary(error)}); move "
              f"{self.directory / str(step)} into {self.directory / DAMAGED_SUBDIR} and rerun "
              "to resume from the step before it") from error
        failures[step] = _state_summary(error)
        logger.warning("checkpoint step %d in %s is damaged or unreadable: %s",
                       step, self.directory, failures[step])
        continue
      if failures and self.read_only:
        self.damaged_steps.update(failures)
        logger.warning("restored step %d, the newest good checkpoint; damaged steps %s left in "
                       "place (read-only)", step, sorted(failures))
      elif failures:
        self._quarantine(failures)
        logger.warning("resumed from step %d, the newest good checkpoint; damaged steps %s "
                       "moved to %s", step, sorted(failures), self.directory / DAMAGED_SUBDIR)
      return result
    details = "; ".join(f"step {s}: {r}" for s, r in failures.items())
    raise CheckpointMismatchError(
        f"no checkpoint in {self.directory} could be restored ({details}). If every step "
        "fails the same way, the abstract state probably does not match the checkpoint "
        "(changed model/optimizer config?): restore with the run's original config.")

  def _unreadable(self, step: int) -> str | None:
    """Why ``step``'s metadata does not read back on this process, or ``None`` if it does.

    Reads the step's small files only (orbax's step metadata, the state's tree metadata and
    OCDBT manifest, the JSON items), never the arrays.
    """
    root = self.directory / str(step)
    try:
      json.loads((root / "_CHECKPOINT_METADATA").read_text())
      json.loads((root / "state" / "_METADATA").read_text())
      if not (root / "state" / "manifest.ocdbt").read_bytes():
        raise ValueError("state/manifest.ocdbt is empty")
      for item in ("data_state", "config"):
        json.loads((root / item / "metadata").read_text())
    except Exception as error:  # noqa: BLE001 -- missing, truncated or garbage files
      return _state_summary(error)
    return None

  def _mismatch(self, step: int, abstract_state: Any) -> str | None:
    """How ``step``'s saved state differs from ``abstract_state``, or ``None`` if it does not.

    Compares leaf names (orbax's dotted parameter names) and global shapes from the state's
    array metadata, never the arrays; dtypes are not compared (orbax casts on restore) and
    PRNG keys only by name (saved as their ``uint32`` key data). The first few differences,
    e.g. ``params.head.kernel: saved (32, 32), this config (32, 16)``.
    """
    metadata = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state")
    saved = {leaf.name: tuple(leaf.shape)
             for leaf in jax.tree.leaves(getattr(metadata, "tree", metadata))
             if hasattr(leaf, "name") and hasattr(leaf, "shape")}
    wanted = {".".join(ocp.tree.str_keypath(path)): leaf
              for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state)}
    differences = [
        f"{name}: saved {saved[name]}, this config {tuple(leaf.shape)}"
        for name, leaf in wanted.items()
        if name in saved and saved[name] != tuple(leaf.shape)
        and not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)]
    differences += [f"{name}: not in the checkpoint" for name in wanted if name not in saved]
    differences += [f"{name}: not in this config" for name in saved if name not in wanted]
    if not differences:
      return None
    shown = "; ".join(differences[:4])
    more = f"; and {len(differences) - 4} more" if len(differences) > 4 else ""
    return f"{len(differences)} leaves differ: {shown}{more}"

  def _quarantine(self, failures: Mapping[int, str]) -> None:
    """Moves damaged step directories aside (process 0), then reloads the step list."""
    self.damaged_steps.update(failures)
    if jax.process_index() == 0:
      target_root = self.directory / DAMAGED_SUBDIR
      target_root.mkdir(parents=True, exist_ok=True)
      for step in failures:
        source = self.directory / str(step)
        target = target_root / str(step)
        suffix = 1
        while target.exists():  # keep every damaged copy, never overwrite one
          target = target_root / f"{step}.{suffix}"
          suffix += 1
        try:
          source.rename(target)
        except Exception as error:  # noqa: BLE001 -- e.g. directory rename on an object store
          logger.error("could not move damaged step %d aside (%s); it stays in %s and may be "
                       "kept instead of a good step by max_to_keep: move it by hand",
                       step, _state_summary(error), self.directory)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("contrastive_jax_checkpoint_quarantine")
    self._manager.reload()


def _common_steps(steps: list[int], limit: int = 64) -> list[int]:
  """The steps (newest first) that every process lists, of each one's newest ``limit``."""
  if jax.process_count() == 1:
    return steps
  mine = np.full([limit], -1, np.int32)
  mine[:min(limit, len(steps))] = steps[:limit]
  every = np.asarray(multihost_utils.process_allgather(mine))  # [processes, limit]
  common = set(every[0].tolist()).intersection(*(set(row.tolist()) for row in every[1:]))
  return sorted((s for s in common if s >= 0), reverse=True)


def _processes_where(flag: bool) -> list[int]:
  """The indices of the processes whose ``flag`` is True (collective on multi-process runs)."""
  if jax.process_count() == 1:
    return [0] if flag else []
  flags = np.asarray(multihost_utils.process_allgather(np.asarray(flag, np.int32)))
  return [int(i) for i in np.flatnonzero(flags.reshape(-1))]


# ---------------------------------------------------------------------------- preemption


def _preemption_service_active() -> bool:
  """Whether jax's coordination service runs a preemption sync manager (multi-process runs).

  Reads jax's private ``jax._src.distributed.global_state`` (there is no public query in
  jax 0.10); any failure to read it counts as "not active".
  """
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    state = distributed.global_state
    return state.client is not None and state.preemption_sync_manager is not None
  except Exception:  # noqa: BLE001
    return False


def install_preemption_handler() -> Callable[[], bool]:
  """Records SIGTERM in a flag; returns a function that says whether it arrived.

  Call it from the main thread before the training loop. The handler only sets a
  ``threading.Event``. When jax's preemption service is active (multi-process runs after
  ``jax.distributed.initialize``), SIGTERM is left to the service's own notifier, which a
  Python handler would replace, and the returned function reports False;
  ``reached_preemption`` then asks the service instead.
  """
  flag = threading.Event()
  if _preemption_service_active():
    return flag.is_set
  if threading.current_thread() is not threading.main_thread():
    raise ValueError("install_preemption_handler must be called from the main thread "
                     "(Python delivers signals there); call it in main()/train() before the loop")

  def handler(signum, frame):  # noqa: ARG001
    flag.set()

  signal.signal(signal.SIGTERM, handler)
  return flag.is_set


def reached_preemption(step: int, preempted: Callable[[], bool] | None = None, *,
                       every: int = 1) -> bool:
  """Whether the loop should save now and exit because the job is being preempted.

  * Multi-process with jax's preemption service: ``reached_preemption_sync_point(step)``,
    True on every process at the same step. Must be called at every step by all processes.
  * Multi-process without the service (it raises RuntimeError): the local flags are combined
    over processes with ``process_allgather`` at steps that are multiples of ``every`` (False
    at the others), so all processes agree. The gather is a host round trip that stalls the
    step pipeline, hence not every step: at ~1 s per step, ``every=10`` answers a SIGTERM
    within ~10 s, inside the 30 s notice of Cloud TPU and GCE spot VMs.
  * Single process: the local SIGTERM flag from ``install_preemption_handler``.
  """
  if every < 1:
    raise ValueError(f"every={every} must be >= 1 (config.checkpoint.preemption_check_every)")
  local = bool(preempted()) if preempted is not None else False
  if jax.process_count() == 1:
    return local
  try:
    return bool(multihost_utils.reached_preemption_sync_point(int(step)))
  except RuntimeError:
    if int(step) % every:
      return False
    flags = multihost_utils.process_allgather(np.asarray(local, np.int32))
    return bool(np.any(flags))
