"""Checkpoint round trips, resume, retention, cross-topology restore and damaged steps."""

from __future__ import annotations

import logging
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from contrastive_jax import checkpoint as ckpt
from contrastive_jax import train_state as ts
from contrastive_jax.distributed import make_mesh


def _state(value: float = 1.0, queue_rows: int = 16) -> ts.TrainState:
  params = {"Dense_0": {"kernel": jnp.full((4, 3), value), "bias": jnp.arange(3.0) * value}}
  tx = optax.sgd(0.1, momentum=0.9)
  opt_state = tx.init(params)
  # A non-trivial momentum buffer, so that the optimizer state is checked too.
  _, opt_state = tx.update(jax.tree.map(lambda x: x + 1.0, params), opt_state, params)
  return ts.TrainState(
      step=jnp.asarray(int(value), jnp.int32),
      params=params,
      batch_stats={"BatchNorm_0": {"mean": jnp.full((3,), value), "var": jnp.ones(3)}},
      opt_state=opt_state,
      rng=jax.random.fold_in(jax.random.key(0), int(value)),
      ema_params=jax.tree.map(lambda x: 0.5 * x, params),
      ema_batch_stats={"BatchNorm_0": {"mean": jnp.zeros(3), "var": jnp.full((3,), value)}},
      queue=ts.init_queue(jax.random.key(int(value)), queue_rows, 2),
      queue_ptr=jnp.asarray(int(value) % queue_rows, jnp.int32),
  )


def _abstract(state, mesh):
  """ShapeDtypeStructs on ``mesh``: the queue split over "data", the rest replicated."""
  def spec(path, x):
    name = "/".join(str(getattr(k, "name", getattr(k, "key", k))) for k in path)
    sharded = name.startswith("queue") and x.ndim == 2
    return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                sharding=NamedSharding(mesh, P("data") if sharded else P()))
  return jax.tree_util.tree_map_with_path(spec, state)


def _place(state, mesh):
  return jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), state, _abstract(state, mesh))


def _assert_state_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    if jnp.issubdtype(w.dtype, jax.dtypes.prng_key):
      assert g.dtype == w.dtype
      g, w = jax.random.key_data(g), jax.random.key_data(w)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def _config():
  return ml_collections.ConfigDict({"method": "moco_v2", "optim": {"name": "sgd", "base_lr": 0.03},
                                    "crop": (0.2, 1.0)})


def test_round_trip_with_ema_queue_data_and_config(tmp_path):
  mesh = make_mesh(1)
  state = _place(_state(3.0), mesh)
  with ckpt.Checkpointer(tmp_path, async_save=False) as ck:
    assert ck.restore_latest_good(_abstract(state, mesh)) is None  # nothing yet
    assert ck.save(3, state, data_state={"step": 3, "epoch": 0}, config=_config())
    restored, data_state, config, step = ck.restore(_abstract(state, mesh))
  assert step == 3
  _assert_state_equal(restored, state)
  assert int(restored.queue_ptr) == 3 and restored.queue.shape == (16, 2)
  assert data_state == {"step": 3, "epoch": 0}
  assert config == {"method": "moco_v2", "optim": {"name": "sgd", "base_lr": 0.03},
                    "crop": [0.2, 1.0]}
  assert os.path.isdir(tmp_path / "checkpoints" / "3")


def test_simclr_state_without_momentum_fields(tmp_path):
  mesh = make_mesh(1)
  state = _state(1.0).replace(ema_params=None, ema_batch_stats=None, queue=None, queue_ptr=None,
                              batch_stats={})
  state = _place(state, mesh)
  with ckpt.Checkpointer(tmp_path, async_save=False) as ck:
    ck.save(1, state, data_state={"step": 1}, config={})
    restored, _, _, _ = ck.restore(_abstract(state, mesh))
  assert restored.queue is None and restored.ema_params is None and restored.batch_stats == {}
  _assert_state_equal(restored, state)


def test_resume_latest_max_to_keep_and_async(tmp_path):
  mesh = make_mesh(1)
  ck = ckpt.Checkpointer(tmp_path, max_to_keep=2, async_save=True)
  for step in (1, 2, 3, 4):
    state = _place(_state(float(step)), mesh)
    assert ck.save(step, state, data_state={"step": step}, config={"s": step})
    # An async save has copied the arrays to host when it returns: freeing the device
    # buffers (as donation to the next jitted step does) must not change what is written.
    for leaf in jax.tree.leaves(state):
      leaf.delete()
  ck.wait()
  assert ck.all_steps() == [3, 4] and ck.latest_step() == 4
  ck.close()
  # A fresh manager (a restarted job) resumes from the latest step.
  ck = ckpt.Checkpointer(tmp_path, max_to_keep=2)
  restored, data_state, config, step = ck.restore_latest_good(_abstract(_state(4.0), mesh))
  ck.close()
  assert step == 4 and data_state == {"step": 4} and config == {"s": 4}
  _assert_state_equal(restored, _state(4.0))


def test_save_interval_and_force(tmp_path):
  mesh = make_mesh(1)
  with ckpt.Checkpointer(tmp_path, save_interval_steps=5, async_save=False) as ck:
    state = _place(_state(1.0), mesh)
    # orbax always writes the first save of a run (its InitialSavePolicy), then every 5 steps.
    assert ck.save(2, state, data_state={"step": 2}, config={})
    assert not ck.save(3, state, data_state={"step": 3}, config={})
    assert ck.save(5, state, data_state={"step": 5}, config={})
    assert not ck.save(6, state, data_state={"step": 6}, config={})
    assert ck.save(7, state, data_state={"step": 7}, config={}, force=True)
    assert ck.all_steps() == [2, 5, 7]


@pytest.mark.parametrize("num_devices", [1, 4])
def test_cross_topology_restore(tmp_path, num_devices):
  state8 = _place(_state(2.0), make_mesh(8))
  assert len(state8.queue.sharding.device_set) == 8
  with ckpt.Checkpointer(tmp_path, async_save=False) as ck:
    ck.save(2, state8, data_state={"step": 2}, config={})
  target = make_mesh(num_devices)
  with ckpt.Checkpointer(tmp_path) as ck:
    restored, _, _, step = ck.restore(_abstract(state8, target))
  assert step == 2
  assert restored.queue.sharding == NamedSharding(target, P("data"))
  assert len(restored.params["Dense_0"]["kernel"].sharding.device_set) == num_devices
  _assert_state_equal(restored, _state(2.0))


def _damage(step_dir, how):
  state_dir = step_dir / "state"
  if how == "truncate":
    data_files = [os.path.join(r, f) for r, _, fs in os.walk(state_dir) for f in fs
                  if os.path.basename(r) == "d"]
    assert data_files
    for path in data_files:
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
  elif how == "delete":
    for root, _, files in os.walk(state_dir):
      for f in files:
        os.remove(os.path.join(root, f))
  elif how == "garbage_metadata":
    (state_dir / "_METADATA").write_text("{not json")
  else:
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncate", "delete", "garbage_metadata"])
def test_damaged_latest_falls_back_to_previous(tmp_path, caplog, how):
  mesh = make_mesh(1)
  with ckpt.Checkpointer(tmp_path, max_to_keep=3, async_save=False) as ck:
    for step in (1, 2, 3):
      ck.save(step, _place(_state(float(step)), mesh), data_state={"step": step}, config={})
  _damage(tmp_path / "checkpoints" / "3", how)

  ck = ckpt.Checkpointer(tmp_path, max_to_keep=3, async_save=False)
  with caplog.at_level(logging.WARNING, logger=ckpt.__name__):
    restored, data_state, _, step = ck.restore_latest_good(_abstract(_state(1.0), mesh))
  assert step == 2 and data_state == {"step": 2}
  _assert_state_equal(restored, _state(2.0))
  assert list(ck.damaged_steps) == [3]
  assert any("step 3" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
  # Moved aside, not deleted; the good steps stay and later saves retire only good ones.
  assert (tmp_path / "checkpoints" / "damaged" / "3").is_dir()
  assert ck.all_steps() == [1, 2]
  for step in (3, 4):  # step 3 can be written again after the damaged one was moved away
    ck.save(step, _place(_state(float(step)), mesh), data_state={"step": step}, config={})
  assert ck.all_steps() == [2, 3, 4]
  ck.close()


def test_all_steps_failing_moves_nothing(tmp_path):
  """A wrong abstract state fails every step: that is not damage, so nothing is moved. It
  fails on the saved shapes, before any array is read: an orbax restore that fails part-way
  leaves TensorStore reads in flight, whose callbacks each print a traceback ("Event loop is
  closed") after the error, up to the end of the process."""
  mesh = make_mesh(1)
  with ckpt.Checkpointer(tmp_path, async_save=False) as ck:
    for step in (1, 2):
      ck.save(step, _place(_state(float(step)), mesh), data_state={"step": step}, config={})
    wrong = _abstract(_state(1.0, queue_rows=8), mesh).replace(params={"other": jnp.zeros(2)})
    reads = []
    manager = ck._manager  # pylint: disable=protected-access
    restore = manager.restore
    manager.restore = lambda *a, **k: reads.append(a) or restore(*a, **k)
    with pytest.raises(ckpt.CheckpointMismatchError, match="could be restored") as info:
      ck.restore_latest_good(wrong)
    assert "queue: saved (16, 2), this config (8, 2)" in str(info.value)
    assert "params.other: not in the checkpoint" in str(info.value)
    assert "params.Dense_0.kernel: not in this config" in str(info.value)
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"step 2 .* does not fit"):
      ck.restore(wrong, 2)
    assert reads == []
    assert ck.all_steps() == [1, 2]
  assert not (tmp_path / "checkpoints" / "damaged").exists()


def hold_commits(monkeypatch, step: int | None = None):
  """Holds orbax's commit (the rename of a written temporary step directory) of ``step`` (of
  every step when None) until the returned ``threading.Event`` is set: an asynchronous save
  stays in flight, its temporary directory on disk, for as long as a test needs."""
  import asyncio
  import threading

  from orbax.checkpoint._src.path import atomicity

  release = threading.Event()
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def held_finalize(self, *args, **kwargs):
    if step is None or self._final_path.name == str(step):  # pylint: disable=protected-access
      await asyncio.to_thread(release.wait, 900)
    return await finalize(self, *args, **kwargs)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", held_finalize)
  return release


@pytest.fixture()
def held_commits(monkeypatch):
  release = hold_commits(monkeypatch)
  yield release
  release.set()


def _tmp_dirs(tmp_path):
  return sorted(p.name for p in (tmp_path / "checkpoints").iterdir()
                if "orbax-checkpoint-tmp" in p.name)


def test_read_only_reader_leaves_a_live_save_and_damaged_steps_alone(tmp_path, held_commits):
  """A reader opened while the trainer is writing a step restores the newest good committed
  step and leaves everything as it was: the trainer's uncommitted temporary directory (a
  cleaning reader deletes it and the trainer's commit fails), its commit, and a damaged step
  (skipped, not moved: only the trainer moves steps aside)."""
  import time

  mesh = make_mesh(1)
  writer = ckpt.Checkpointer(tmp_path, max_to_keep=None, async_save=True)
  held_commits.set()
  for step in (1, 2):
    writer.save(step, _place(_state(float(step)), mesh), data_state={"step": step}, config={})
  writer.wait()
  held_commits.clear()
  writer.save(3, _place(_state(3.0), mesh), data_state={"step": 3}, config={})
  deadline = time.time() + 60
  while not _tmp_dirs(tmp_path) and time.time() < deadline:
    time.sleep(0.01)
  in_flight = _tmp_dirs(tmp_path)
  assert in_flight, "the held save of step 3 never wrote its temporary directory"
  _damage(tmp_path / "checkpoints" / "2", "garbage_metadata")

  reader = ckpt.Checkpointer(tmp_path, read_only=True)
  restored, data_state, _, step = reader.restore_latest_good(_abstract(_state(1.0), mesh))
  assert step == 1 and data_state == {"step": 1}
  _assert_state_equal(restored, _state(1.0))
  assert list(reader.damaged_steps) == [2]
  with pytest.raises(ValueError, match="read-only"):
    reader.save(4, restored, data_state={"step": 4}, config={})
  reader.close()
  assert _tmp_dirs(tmp_path) == in_flight                       # the live save is untouched
  assert (tmp_path / "checkpoints" / "2").is_dir()              # skipped, not moved aside
  assert not (tmp_path / "checkpoints" / ckpt.DAMAGED_SUBDIR).exists()

  held_commits.set()
  writer.wait()                                                 # the trainer's commit succeeds
  assert writer.all_steps() == [1, 2, 3] and not _tmp_dirs(tmp_path)
  writer.close()


def test_preemption_flag_records_sigterm():
  previous = signal.getsignal(signal.SIGTERM)
  try:
    preempted = ckpt.install_preemption_handler()
    assert not preempted() and not ckpt.reached_preemption(0, preempted)
    os.kill(os.getpid(), signal.SIGTERM)
    assert preempted() and ckpt.reached_preemption(1, preempted)
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_multihost_fallback_gathers_the_flags_every_n_steps(monkeypatch):
  """Without jax's preemption service, the cross-host gather runs only every N steps."""
  gathers = []

  def no_service(step):
    raise RuntimeError("preemption sync manager is not initialized")

  def allgather(flag):
    gathers.append(int(flag))
    return np.stack([np.asarray(flag), np.asarray(0, np.int32)])   # this host, a quiet peer

  monkeypatch.setattr(ckpt.jax, "process_count", lambda: 2)
  monkeypatch.setattr(ckpt.multihost_utils, "reached_preemption_sync_point", no_service)
  monkeypatch.setattr(ckpt.multihost_utils, "process_allgather", allgather)
  sigterm = lambda: True
  assert [ckpt.reached_preemption(s, sigterm, every=10) for s in (7, 9, 10, 11, 20)] == [
      False, False, True, False, True]
  assert gathers == [1, 1]                       # steps 10 and 20 only
  assert not ckpt.reached_preemption(10, lambda: False, every=10) and gathers == [1, 1, 0]
  assert ckpt.reached_preemption(3, sigterm) and len(gathers) == 4   # every=1: each step
  with pytest.raises(ValueError, match="preemption_check_every"):
    ckpt.reached_preemption(3, sigterm, every=0)
