"""Fault injection: every fault is real (signals, damaged files, a full disk, NaN, dead peers).

What is guaranteed, and tested here:

* ``kill -9`` at any moment (between steps or during an asynchronous checkpoint write): the
  next start of the same command resumes from the newest complete checkpoint, and the run
  ends with the same parameters and per-step losses as an uninterrupted run.
* SIGTERM (a preemption notice): the run saves a checkpoint at the current step, logs it and
  exits 0; on two processes SIGTERM to one stops both at the same step.
* A damaged newest checkpoint is logged, moved to ``checkpoints/damaged/`` and training resumes
  from the newest good one, which is never deleted.
* Restoring a run while it trains (``restore.restore_run``: the standalone evaluator and
  ``launch/results_table.py``) is read-only: the trainer's in-progress save completes and
  every checkpoint stays where it was.
* A non-finite loss stops the run naming the step and metric, without checkpointing the bad
  state; ``skip_nonfinite=True`` skips such steps instead.
* A full disk fails with a clear error and leaves earlier checkpoints restorable; an
  unwritable ``--workdir`` fails before anything compiles. A user error's message is the last
  line of the process's output (resuming with another model: before any array is read).
* A process that dies on a multi-process run makes the others exit non-zero in bounded time.
* Wrong configs fail before compiling, naming the key; bad images and captions are decoded
  correctly, skipped and counted, or refused naming the file.
* A checkpoint written by 8 devices continues on 4 and 1 with the same losses.

Every subprocess is bounded by a timeout and killed on failure. Runs use the quick SimCLR
config at 16x16 with evaluation off, and one run serves several assertions.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from contrastive_jax.configs import common, mocov2_mnist, simclr_mnist
from contrastive_jax import checkpoint, configs, restore, train
from contrastive_jax.data import pipeline, records
from contrastive_jax.data import sources as S
from contrastive_jax.data import tokenizer as T
from contrastive_jax.tools import local_pod
from test_checkpoint import hold_commits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
TOTAL_STEPS = 10
RUN_FLAGS = ("--config=configs/simclr_mnist.py:quick", "--config.data.image_size=16",
             "--config.eval.enabled=False", "--config.log_every=1",
             "--config.checkpoint.every_steps=1")
STEP_TIMEOUT_S = 120      # from start-up to a given step; start-up is most of it
EXIT_TIMEOUT_S = 60       # from a signal (or the last step) to the process's exit
DEAD_PEER_TIMEOUT_S = 120  # a survivor of a dead peer must have exited within this


# ----------------------------------------------------------------------------- helpers


def _config(**overrides):
  """The quick SimCLR config at 16x16, evaluation off, a log and a checkpoint every step."""
  c = simclr_mnist.get_config("quick")
  c.eval.enabled = False
  c.data.image_size = 16
  c.log_every = 1
  c.checkpoint.every_steps = 1
  c.checkpoint.async_save = False
  for key, value in overrides.items():
    configs.set_value(c, key, value)
  return c



def _main_argv(workdir, *extra):
  return [PYTHON, "-m", "contrastive_jax.main", *RUN_FLAGS, f"--workdir={workdir}", *extra]


# Imported at start-up by a subprocess that has ``_slow_commit_env``: delays orbax's commit (the
# rename of a written step directory) by CJ_TEST_COMMIT_DELAY_S seconds, so that an asynchronous
# checkpoint write stays in flight long enough to be seen and killed.
_SLOW_COMMIT_SITECUSTOMIZE = """
import asyncio, importlib.abc, importlib.util, os, sys

_MODULE = "orbax.checkpoint._src.path.atomicity"


class _DelayCommit(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name != _MODULE:
      return None
    sys.meta_path.remove(self)
    spec = importlib.util.find_spec(name)
    run = spec.loader.exec_module

    def exec_module(module):
      run(module)
      cls = module.AtomicRenameTemporaryPath
      finalize = cls.finalize

      async def slow_finalize(self, *args, **kwargs):
        await asyncio.sleep(float(os.environ["CJ_TEST_COMMIT_DELAY_S"]))
        return await finalize(self, *args, **kwargs)
      cls.finalize = slow_finalize
    spec.loader.exec_module = exec_module
    return spec


sys.meta_path.insert(0, _DelayCommit())
"""


def _slow_commit_env(hook_dir, delay_s=2.0):
  """The environment of a subprocess whose checkpoint commits each wait ``delay_s`` seconds."""
  os.makedirs(hook_dir, exist_ok=True)
  with open(os.path.join(hook_dir, "sitecustomize.py"), "w") as f:
    f.write(_SLOW_COMMIT_SITECUSTOMIZE)
  path = os.pathsep.join(p for p in (str(hook_dir), os.environ.get("PYTHONPATH")) if p)
  return dict(os.environ, PYTHONPATH=path, CJ_TEST_COMMIT_DELAY_S=str(delay_s))


class Proc:
  """A subprocess whose combined output goes to ``log_path``; always killed by ``stop()``."""

  def __init__(self, argv, log_path, env=None):
    self.log_path = str(log_path)
    self._log = open(self.log_path, "w")
    self.popen = subprocess.Popen(argv, cwd=ROOT, env=env or dict(os.environ),
                                  stdout=self._log, stderr=subprocess.STDOUT)

  def text(self) -> str:
    with open(self.log_path) as f:
      return f.read()

  def tail(self, n=3000) -> str:
    return f"--- {self.log_path} (rc={self.popen.poll()}) ---\n" + self.text()[-n:]

  def wait_until(self, predicate, timeout, what):
    """Polls ``predicate()`` every few ms; fails (and kills) on exit or timeout first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
      value = predicate()
      if value:
        return value
      if self.popen.poll() is not None:
        value = predicate()
        if value:
          return value
        raise AssertionError(f"process exited before {what}\n{self.tail()}")
      time.sleep(0.005)
    self.stop()
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{self.tail()}")

  def logged_step(self, step) -> bool:
    return f"] step {step}: " in self.text()

  def wait_exit(self, timeout) -> int:
    try:
      return self.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.stop()
      raise AssertionError(f"did not exit within {timeout} s\n{self.tail()}") from None

  def stop(self):
    if self.popen.poll() is None:
      self.popen.kill()
      self.popen.wait()
    self._log.close()


def _logged_losses(log: str) -> dict[int, float]:
  """``{step: loss}`` from the metric writer's lines (6 significant digits)."""
  return {int(m.group(1)): float(m.group(2))
          for m in re.finditer(r"\[(\d+)\] train/.*?train/loss=([-+\w.]+)", log)}


def _committed_steps(workdir) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _tmp_checkpoints(workdir) -> list[str]:
  d = os.path.join(workdir, "checkpoints")
  try:
    return [n for n in os.listdir(d) if "orbax-checkpoint-tmp" in n]
  except FileNotFoundError:
    return []


def _resumed_step(log: str) -> int | None:
  m = re.search(r"resumed from checkpoint step (\d+)", log)
  return int(m.group(1)) if m else None


def _assert_trees_equal(got, want, rtol=0.0):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    name = jax.tree_util.keystr(path)
    if rtol:
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=1e-7,
                                 err_msg=name)
    else:
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=name)


def _saved_state(workdir, step):
  """A checkpoint's whole saved state as numpy arrays (PRNG keys as their key data), read as
  stored: no model, mesh or config is built."""
  tree = ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step),
                                                       "state"))
  return jax.tree.map(lambda x: np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key) else x), tree)


def _writer(interrupted, step) -> str:
  """The name of the start that committed checkpoint ``step``."""
  order = interrupted["order"]
  for phase, after in zip(order, order[1:]):
    if step not in phase["committed_before"] and step in after["committed_before"]:
      return phase["name"]
  return order[-1]["name"]


def _all_finite(tree) -> bool:
  return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------------ 1, 2: kill -9, SIGTERM


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The reference: the same run as the subprocesses below, in one go, in this process."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  c = _config(total_steps=TOTAL_STEPS)
  c.checkpoint.async_save = True  # as the command line runs it
  c.checkpoint.max_to_keep = None  # every step, to compare with each checkpoint of the other
  summary = train.train_and_evaluate(c, str(workdir)).summary
  return {"workdir": str(workdir), "summary": summary,
          "losses": {h["step"]: h["loss"] for h in summary["train_history"]}}


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
  """One workdir, four starts of the same command: kill -9 after the log line of a random
  step; kill -9 while an asynchronous checkpoint is being written (twice when the first start
  missed the write); SIGTERM; run to the end."""
  root = tmp_path_factory.mktemp("interrupted")
  workdir = str(root / "run")
  # Every checkpoint is kept (no garbage collection), so each one written by any start can be
  # compared with the uninterrupted run's at the same step.
  argv = _main_argv(workdir, f"--config.total_steps={TOTAL_STEPS}",
                    "--config.checkpoint.max_to_keep=100")
  rng = random.Random(9)
  # From step 3 on, some checkpoint is complete when the step is logged: step 3's log line
  # comes after step 2's save started, and orbax starts a save only once the previous one
  # (step 1's) has committed.
  kill_step = rng.randint(3, 4)
  phases = []

  def start(name, env=None):
    proc = Proc(argv, root / f"{len(phases)}_{name}.log", env=env)
    phase = {"name": name, "proc": proc, "committed_before": _committed_steps(workdir)}
    phases.append(phase)
    return proc, phase

  try:
    # Phase 1: SIGKILL right after step `kill_step` is logged (its save is being issued).
    proc, phase = start("kill_after_log")
    proc.wait_until(lambda: proc.logged_step(kill_step), STEP_TIMEOUT_S, f"step {kill_step}")
    proc.popen.send_signal(signal.SIGKILL)
    phase.update(rc=proc.wait_exit(EXIT_TIMEOUT_S), signal_step=kill_step)
    proc.stop()

    # Phase 2: SIGKILL as soon as an uncommitted orbax temporary step directory exists,
    # i.e. during an asynchronous checkpoint write of a step after the resumed one. A write
    # can be too quick to be seen between two polls (a fast machine): that start is killed
    # after a later step's log line instead, and the phase is repeated with every commit
    # delayed (``_slow_commit_env``), where the write cannot be missed.
    for env in (None, _slow_commit_env(root / "slow_commit")):
      proc, phase = start("kill_during_save", env)
      resumed = proc.wait_until(lambda: _resumed_step(proc.text()), STEP_TIMEOUT_S, "resume")
      first = resumed + (rng.randint(1, 2) if env is None else 1)  # first write to hit
      give_up = first + 1 if env is None else TOTAL_STEPS - 2  # leave steps for phase 3

      def writing():
        names = [n for n in _tmp_checkpoints(workdir) if int(n.split(".")[0]) >= first]
        if names:
          return names[0]
        return "missed" if proc.logged_step(give_up) else None
      tmp_name = proc.wait_until(writing, STEP_TIMEOUT_S, "an asynchronous checkpoint write")
      proc.popen.send_signal(signal.SIGKILL)
      phase.update(rc=proc.wait_exit(EXIT_TIMEOUT_S), slow_commit=env is not None,
                   tmp_name=None if tmp_name == "missed" else tmp_name)
      proc.stop()
      if phase["tmp_name"] is not None or env is not None:
        break
      phase["name"] = "kill_during_save_missed"

    # Phase 3: SIGTERM (a preemption notice) after the first step this start computes.
    proc, phase = start("sigterm")
    resumed = proc.wait_until(lambda: _resumed_step(proc.text()), STEP_TIMEOUT_S, "resume")
    proc.wait_until(lambda: proc.logged_step(resumed + 1), STEP_TIMEOUT_S, "a step")
    t0 = time.time()
    proc.popen.send_signal(signal.SIGTERM)
    phase.update(rc=proc.wait_exit(EXIT_TIMEOUT_S), exit_seconds=time.time() - t0,
                 signal_step=resumed + 1)
    proc.stop()

    # Phase 4: the same command again runs to the end.
    proc, phase = start("finish")
    phase.update(rc=proc.wait_exit(STEP_TIMEOUT_S + 60))
    proc.stop()
  finally:
    for phase in phases:
      phase["proc"].stop()
      phase["log"] = phase["proc"].text()
  return {"workdir": workdir, "phases": {p["name"]: p for p in phases}, "order": phases}


@pytest.mark.slow
def test_kill9_resumes_from_latest_complete_checkpoint(interrupted):
  phases = interrupted["phases"]
  kills = [p for p in interrupted["order"] if p["name"].startswith("kill")]
  for phase in kills:
    assert phase["rc"] == -signal.SIGKILL, phase["log"][-2000:]
  # A fresh workdir starts from scratch; each restart resumes from the newest step that was
  # complete on disk when the process died (never from an uncommitted temporary directory).
  assert _resumed_step(phases["kill_after_log"]["log"]) is None
  for prev, cur in zip(interrupted["order"], interrupted["order"][1:]):
    committed = cur["committed_before"]
    assert committed, f"no checkpoint survived {prev['name']}"
    assert _resumed_step(cur["log"]) == committed[-1], (prev["name"], committed,
                                                        cur["log"][-2000:])
  # The first kill came after step k was logged; saves are asynchronous, so the newest
  # complete checkpoint may be older than k - 1, but never newer than k.
  k = phases["kill_after_log"]["signal_step"]
  assert interrupted["order"][1]["committed_before"][-1] <= k
  # The kill during the save hit an asynchronous write in flight: its temporary directory
  # was never listed as a step, and the next start removed it.
  tmp_name = phases["kill_during_save"]["tmp_name"]
  assert tmp_name is not None, "no asynchronous checkpoint write was caught in flight"
  assert phases["sigterm"]["committed_before"][-1] < int(tmp_name.split(".")[0])
  assert not _tmp_checkpoints(interrupted["workdir"])


@pytest.mark.slow
def test_sigterm_saves_current_step_and_exits_zero(interrupted):
  phase = interrupted["phases"]["sigterm"]
  assert phase["rc"] == 0, phase["log"][-3000:]
  assert phase["exit_seconds"] < EXIT_TIMEOUT_S
  m = re.search(r"stopped early \(preemption or config.stop_at_step\): saved a checkpoint at "
                r"step (\d+)", phase["log"])
  assert m, phase["log"][-3000:]
  stopped = int(m.group(1))
  assert stopped >= phase["signal_step"]  # the step being computed when the signal came
  finish = interrupted["phases"]["finish"]
  assert finish["committed_before"][-1] == stopped
  assert _resumed_step(finish["log"]) == stopped


@pytest.mark.slow
def test_interrupted_run_equals_uninterrupted_run(interrupted, uninterrupted):
  finish = interrupted["phases"]["finish"]
  assert finish["rc"] == 0, finish["log"][-3000:]
  # Every checkpoint any start committed holds the uninterrupted run's state at that step,
  # leaf by leaf (the first one that differs names the start that wrote it).
  for step in _committed_steps(interrupted["workdir"]):
    got = _saved_state(interrupted["workdir"], step)
    want = _saved_state(uninterrupted["workdir"], step)
    try:
      _assert_trees_equal(got, want)
    except AssertionError as error:
      raise AssertionError(f"checkpoint {step}, written by the {_writer(interrupted, step)!r} "
                           f"start, differs from the uninterrupted run's\n{error}") from None
  # The last process's steps, at full precision from summary.json.
  summary = json.loads(open(os.path.join(interrupted["workdir"], "summary.json")).read())
  resumed = _resumed_step(finish["log"])
  steps = [h["step"] for h in summary["train_history"]]
  assert steps == list(range(resumed + 1, TOTAL_STEPS + 1))
  np.testing.assert_allclose([h["loss"] for h in summary["train_history"]],
                             [uninterrupted["losses"][s] for s in steps], rtol=1e-6)
  # Every step any process logged (recomputed steps included) matches, to the 6 digits logged.
  seen = set()
  for phase in interrupted["order"]:
    for step, loss in _logged_losses(phase["log"]).items():
      np.testing.assert_allclose(loss, uninterrupted["losses"][step], rtol=2e-5,
                                 err_msg=f"{phase['name']} step {step}")
      seen.add(step)
  assert seen == set(range(1, TOTAL_STEPS + 1))
  # The final checkpoints hold the same state, leaf by leaf.
  got = restore.restore_run(interrupted["workdir"])
  want = restore.restore_run(uninterrupted["workdir"])
  assert got.step == want.step == TOTAL_STEPS
  _assert_trees_equal(got.state.params, want.state.params)
  _assert_trees_equal(got.state.batch_stats, want.state.batch_stats)
  _assert_trees_equal(got.state.opt_state, want.state.opt_state)


# ----------------------------------------------------------------------------- 2, 6: two processes


def _two_processes(workdir, log_prefix, total_steps, extra=()):
  """The run as a pod of 2 processes x 2 CPU devices, logs ``{log_prefix}_{i}.log``."""
  return local_pod.LocalPod(
      lambda i, port: _main_argv(workdir, f"--config.total_steps={total_steps}",
                                 *local_pod.distributed_flags(i, 2, port), *extra),
      2, devices=2, log_dir=os.path.dirname(log_prefix),
      log_name=os.path.basename(log_prefix) + "_{}.log", cwd=ROOT, grace_s=0)


def _pod_wait_until(pod, predicate, timeout, what):
  """Polls ``predicate()`` every few ms; fails on a process's exit or timeout first."""
  value = pod.wait_for(predicate, timeout, poll_s=0.005)
  if not value:
    raise AssertionError(f"a process exited or {timeout} s passed before {what}\n"
                         + pod.tails(3000))
  return value


def _pod_wait_exit(pod, i, timeout) -> int:
  rc = pod.wait_process(i, timeout)
  if rc is None:
    raise AssertionError(f"process {i} did not exit within {timeout} s\n{pod.tails(3000)}")
  return rc


def _pod_logged_step(pod, i, step) -> bool:
  return f"] step {step}: " in pod.log(i)


@pytest.fixture(scope="module")
def two_process_faults(tmp_path_factory):
  """Start 1: SIGTERM to process 1 after step 2. Start 2 (same workdir): kill -9 process 1
  after the first step it computes; process 0 must notice and exit."""
  root = tmp_path_factory.mktemp("two_processes")
  workdir = str(root / "run")
  out = {}
  with _two_processes(workdir, root / "term", 40) as pod:  # stops both on the way out
    _pod_wait_until(pod, lambda: _pod_logged_step(pod, 0, 2), STEP_TIMEOUT_S * 2, "step 2")
    t0 = time.time()
    pod.send_signal(1, signal.SIGTERM)
    out["term_rc"] = [_pod_wait_exit(pod, i, EXIT_TIMEOUT_S) for i in range(2)]
    out["term_seconds"] = time.time() - t0
  out["term_logs"] = pod.logs()
  with _two_processes(workdir, root / "kill", 40,
                      ["--heartbeat_timeout_s=10", "--shutdown_timeout_s=30"]) as pod:
    resumed = _pod_wait_until(pod, lambda: _resumed_step(pod.log(1)), STEP_TIMEOUT_S * 2,
                              "resume")
    out["restart_resumed"] = resumed
    _pod_wait_until(pod, lambda: _pod_logged_step(pod, 1, resumed + 1), STEP_TIMEOUT_S,
                    "a step")
    t0 = time.time()
    pod.send_signal(1, signal.SIGKILL)
    out["kill_rc0"] = _pod_wait_exit(pod, 0, DEAD_PEER_TIMEOUT_S)
    out["kill_seconds"] = time.time() - t0
  out["kill_logs"] = pod.logs()
  return out


@pytest.mark.slow
def test_two_processes_sigterm_to_one_stops_both_at_same_step(two_process_faults):
  out = two_process_faults
  logs = out["term_logs"]
  assert out["term_rc"] == [0, 0], "\n".join(log[-3000:] for log in logs)
  stops = [re.findall(r"saved a checkpoint at step (\d+)", log) for log in logs]
  assert stops[0] and stops[0] == stops[1], stops
  stopped = int(stops[0][0])
  assert stopped >= 2
  # Both processes computed exactly the steps up to the common one, and the restart of the
  # same command continues from it.
  for log in logs:
    assert max(int(s) for s in re.findall(r"\] step (\d+): ", log)) == stopped
  assert out["restart_resumed"] == stopped


@pytest.mark.slow
def test_dead_peer_makes_survivor_exit_nonzero_in_bounded_time(two_process_faults):
  out = two_process_faults
  log = out["kill_logs"][0]
  assert out["kill_rc0"] != 0, log[-3000:]
  assert out["kill_seconds"] < DEAD_PEER_TIMEOUT_S
  # It names the cause: the peer's missing heartbeats or its closed connection.
  assert re.search(r"heartbeat timeout|another task died|Connection reset by peer", log), \
      log[-3000:]


# ----------------------------------------------------------------------------- 3, 9: checkpoints


@pytest.fixture(scope="module")
def stopped_at_3(tmp_path_factory):
  """8 devices, 4 steps planned, stopped at step 3 (checkpoints 1, 2, 3), and the
  uninterrupted continuation of it on 8 devices."""
  root = tmp_path_factory.mktemp("stopped_at_3")
  source = root / "source"
  first = train.train_and_evaluate(_config(total_steps=4, stop_at_step=3), str(source))
  assert first.stopped_at_step == 3 and first.summary is None
  assert _committed_steps(str(source)) == [1, 2, 3]
  cont = root / "continued_8"
  shutil.copytree(source, cont)
  rest = train.train_and_evaluate(_config(total_steps=4), str(cont)).summary
  return {"root": root, "source": source,
          "losses": {h["step"]: h for h in first.train_history + rest["train_history"]}}


def _damage(step_dir, how):
  state_dir = os.path.join(step_dir, "state")
  files = [os.path.join(r, f) for r, _, fs in os.walk(state_dir) for f in fs]
  if how == "truncated_file":
    data = [f for f in files if os.path.basename(os.path.dirname(f)) == "d"]
    assert data, files
    for path in data:
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
  elif how == "deleted_shard":
    data = [f for f in files if os.path.basename(os.path.dirname(f)) == "d"]
    assert data, files
    for path in data:
      os.remove(path)
  elif how == "garbage_metadata":
    with open(os.path.join(state_dir, "_METADATA"), "w") as f:
      f.write("{not json")
  else:
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated_file", "deleted_shard", "garbage_metadata"])
def test_damaged_latest_checkpoint_at_trainer_level(stopped_at_3, tmp_path, caplog, how):
  workdir = tmp_path / "run"
  shutil.copytree(stopped_at_3["source"], workdir)
  _damage(workdir / "checkpoints" / "3", how)
  with caplog.at_level(logging.WARNING, logger=checkpoint.__name__):
    summary = train.train_and_evaluate(_config(total_steps=4), str(workdir)).summary
  messages = [r.getMessage() for r in caplog.records]
  assert any("step 3" in m and "damaged" in m for m in messages), messages
  assert any("resumed from step 2" in m for m in messages), messages
  # Resumed from step 2 and recomputed step 3 exactly as the original run did.
  assert [h["step"] for h in summary["train_history"]] == [3, 4]
  want = stopped_at_3["losses"]
  np.testing.assert_allclose([h["loss"] for h in summary["train_history"]],
                             [want[3]["loss"], want[4]["loss"]], rtol=1e-6)
  # The damaged step is kept aside, the good step 2 was not deleted, and the new saves did not
  # retire a good step in favour of the damaged one (max_to_keep=3).
  assert (workdir / "checkpoints" / "damaged" / "3").is_dir()
  assert _committed_steps(str(workdir)) == [2, 3, 4]
  run = restore.restore_run(str(workdir), step=2)
  assert _all_finite(run.state.params)


def test_resuming_with_another_model_fails_on_one_last_line(stopped_at_3, tmp_path):
  """Resuming a run with a config whose state does not fit its checkpoints (here a wider
  head) ends with one message naming the leaves that differ, as the last line of the output,
  before any array is read: no traceback, no TensorStore "Event loop is closed" after it."""
  workdir = tmp_path / "run"
  shutil.copytree(stopped_at_3["source"], workdir)
  proc = Proc(_main_argv(workdir, "--config.head.out_dim=128"), tmp_path / "resume.log")
  try:
    rc = proc.wait_exit(STEP_TIMEOUT_S)
  finally:
    proc.stop()
  log = proc.text()
  last = log.strip().splitlines()[-1]
  assert rc == 2, log[-3000:]
  assert last.startswith("error: no checkpoint in ") and "leaves differ" in last, log[-3000:]
  assert re.search(r"params\.head\.\S+: saved \(\d+(, \d+)?\), this config", last), last
  assert "Traceback" not in log and "Event loop is closed" not in log, log[-3000:]
  assert _committed_steps(str(workdir)) == [1, 2, 3]  # nothing moved aside


@pytest.mark.parametrize("num_devices", [4, 1])
def test_checkpoint_from_8_devices_continues_on_fewer(stopped_at_3, tmp_path, num_devices):
  workdir = tmp_path / "run"
  shutil.copytree(stopped_at_3["source"], workdir)
  summary = train.train_and_evaluate(_config(total_steps=4, num_devices=num_devices),
                                     str(workdir)).summary
  assert [h["step"] for h in summary["train_history"]] == [4]
  got, want = summary["train_history"][0], stopped_at_3["losses"][4]
  for key in ("loss", "grad_norm", "param_norm"):
    np.testing.assert_allclose(got[key], want[key], rtol=2e-5, err_msg=key)


def test_restoring_a_run_while_it_trains_leaves_its_saves_alone(tmp_path, monkeypatch):
  """The evaluator's restore (``restore.restore_run``) of a run whose trainer is writing its
  last step: it gets step 1, and the trainer's save of step 2 (held in flight until the
  restore is done) commits, the run finishes and every checkpoint is intact. A reader that
  cleans orbax's temporary directories deletes that save and the trainer fails at its commit."""
  import threading

  workdir = str(tmp_path / "run")
  release = hold_commits(monkeypatch, step=2)
  trained = threading.Event()
  seen = {}

  def evaluate_mid_save():
    try:
      while not trained.is_set():
        if any(n.startswith("2.") for n in _tmp_checkpoints(workdir)):
          seen["tmp_before"] = _tmp_checkpoints(workdir)
          seen["step"] = restore.restore_run(workdir).step
          seen["tmp_after"] = _tmp_checkpoints(workdir)
          return
        time.sleep(0.005)
    except BaseException as error:  # noqa: BLE001 -- reported by the main thread
      seen["error"] = error
    finally:
      release.set()

  reader = threading.Thread(target=evaluate_mid_save, daemon=True)
  reader.start()
  c = _config(total_steps=2)
  c.checkpoint.async_save = True  # as the command line runs it: the save is in flight
  try:
    summary = train.train_and_evaluate(c, workdir).summary
  finally:
    trained.set()
    release.set()
    reader.join()
  assert "step" in seen and "error" not in seen, seen
  assert seen["step"] == 1 and seen["tmp_after"] == seen["tmp_before"], seen
  assert summary["steps"] == 2 and _committed_steps(workdir) == [1, 2]
  assert not _tmp_checkpoints(workdir)
  assert not os.path.exists(os.path.join(workdir, "checkpoints", checkpoint.DAMAGED_SUBDIR))
  for step in (1, 2):
    assert restore.restore_run(workdir, step=step).step == step


# ----------------------------------------------------------------------------- 4: NaN / inf


def test_nonfinite_loss_stops_naming_step_and_metric_without_checkpointing(tmp_path):
  # Linear warmup from 0: step 1 runs at learning rate 0 (finite, checkpointed), step 2 at
  # ~1e29 overflows the parameters.
  c = _config(total_steps=6, **{"optim.base_lr": 1e30, "optim.warmup_fraction": 0.5})
  with pytest.raises(train.NonFiniteLossError) as info:
    train.train_and_evaluate(c, str(tmp_path))
  message = str(info.value)
  m = re.search(r"non-finite metric\(s\) in step (\d+): \{(.*)\}", message)
  assert m, message
  bad_step = int(m.group(1))
  assert re.search(r"'(loss|grad_norm|param_norm)'", m.group(2)), message
  assert bad_step >= 2
  steps = _committed_steps(str(tmp_path))
  assert steps and steps[-1] == bad_step - 1, (steps, bad_step)
  run = restore.restore_run(str(tmp_path))  # the newest checkpoint holds finite numbers
  assert run.step == bad_step - 1
  assert _all_finite(run.state.params) and _all_finite(run.state.opt_state)


def test_skip_nonfinite_finishes_with_finite_params_and_counts(tmp_path):
  c = _config(total_steps=4, skip_nonfinite=True,
              **{"optim.base_lr": 1e30, "optim.warmup_fraction": 0.5})
  summary = train.train_and_evaluate(c, str(tmp_path)).summary
  # Step 1 (learning rate 0) is finite; every later step overflows and is skipped.
  assert summary["nonfinite_skipped"] == 3
  assert summary["train_history"][0]["loss"] > 0
  assert np.isfinite(summary["final_train"]["loss"])
  run = restore.restore_run(str(tmp_path))
  assert run.step == 4 and _all_finite(run.state.params) and _all_finite(run.state.opt_state)


# ----------------------------------------------------------------------------- 5: disk


@pytest.fixture()
def tmpfs(tmp_path):
  """A small tmpfs mounted for the test, always unmounted; skipped where mount is refused."""
  mounts = []

  def mount(size="16m", read_only=False):
    target = tmp_path / f"mnt{len(mounts)}"
    target.mkdir()
    options = f"size={size}" + (",ro" if read_only else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                          capture_output=True, text=True, timeout=30)
    if proc.returncode:
      pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); needs root or "
                  "CAP_SYS_ADMIN")
    mounts.append(target)
    return target

  yield mount
  for target in mounts:
    subprocess.run(["umount", "-l", str(target)], capture_output=True, timeout=30)


def test_full_disk_fails_clearly_and_keeps_checkpoints_restorable(tmpfs):
  mnt = tmpfs("16m")  # about a dozen checkpoints of the quick model (~1 MB each)
  workdir = str(mnt / "run")
  proc = Proc(_main_argv(workdir, "--config.total_steps=60",
                         "--config.checkpoint.max_to_keep=100"), mnt.parent / "full_disk.log")
  try:
    proc.wait_until(lambda: proc.logged_step(3), STEP_TIMEOUT_S, "step 3")
    before = _committed_steps(workdir)
    fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)  # fill the disk to the last byte
    try:
      chunk = b"\0" * (1 << 16)
      while chunk:
        try:
          os.write(fd, chunk)
        except OSError:
          chunk = chunk[:len(chunk) // 2]
    finally:
      os.close(fd)
    t0 = time.time()
    rc = proc.wait_exit(EXIT_TIMEOUT_S)
    seconds = time.time() - t0
  finally:
    proc.stop()
  log = proc.text()
  assert rc != 0, log[-3000:]
  assert "No space left on device" in log, log[-3000:]
  assert f"error: [Errno 28] --workdir={workdir} is out of disk space" in log, log[-3000:]
  # A full disk is not a bug: the run ends on the message alone, its last line. (TensorStore's
  # failed writes still in flight used to print "Event loop is closed" tracebacks after it.)
  assert log.strip().splitlines()[-1].startswith("error: [Errno 28]"), log[-3000:]
  assert seconds < EXIT_TIMEOUT_S
  assert "] step 60: " not in log
  os.remove(mnt / "filler")
  after = _committed_steps(workdir)
  assert before and set(before) <= set(after), (before, after)
  for step in after:
    run = restore.restore_run(workdir, step=step)
    assert run.step == step and _all_finite(run.state.params)


_NOISY_EXIT = """
import atexit, sys, threading, time
from contrastive_jax import errors

atexit.register(time.sleep, 0.2)  # a library's exit handler (jax, orbax, absl have some)

def noise():  # a library thread that prints tracebacks until the process ends
  while True:
    print("Traceback (most recent call last):", file=sys.stderr, flush=True)
    time.sleep(0.0001)

threading.Thread(target=noise, daemon=True).start()
time.sleep(0.05)
errors.exit_process(errors.ConfigError("config.x=1 is wrong; use 2"))
"""


def test_exit_process_prints_the_message_last_while_other_threads_print():
  """``errors.exit_process`` (every entry point's user-error exit): the message is the last
  line and the status 2, even while another thread keeps printing to stderr (as TensorStore's
  do with "Event loop is closed" tracebacks). A print and ``sys.exit(2)`` fails this: the
  other thread prints while the exit handlers run."""
  for _ in range(3):
    proc = subprocess.run([PYTHON, "-c", _NOISY_EXIT], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1] == "error: config.x=1 is wrong; use 2", \
        proc.stderr[-2000:]


def test_workdir_that_is_a_file_fails_before_compiling(tmp_path, monkeypatch):
  _forbid_compiling(monkeypatch)
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  for workdir in (blocker, blocker / "run"):
    with pytest.raises(train.ConfigError, match=r"--workdir=.*not writable"):
      train.train_and_evaluate(_config(total_steps=2), str(workdir))
  assert blocker.read_text() == "not a directory"


def test_read_only_workdir_fails_before_compiling(tmpfs, monkeypatch):
  _forbid_compiling(monkeypatch)
  read_only = tmpfs("1m", read_only=True)
  with pytest.raises(train.ConfigError, match=r"--workdir=.*not writable"):
    train.train_and_evaluate(_config(total_steps=2), str(read_only / "run"))


# ----------------------------------------------------------------------------- 7: bad configs


def _forbid_compiling(monkeypatch):
  def no_jit(*args, **kwargs):
    raise AssertionError("jax.jit was reached: the bad config was not caught before compiling")
  monkeypatch.setattr(jax, "jit", no_jit)


def _moco(**overrides):
  c = mocov2_mnist.get_config("quick")
  c.eval.enabled = False
  c.data.image_size = 16
  for key, value in overrides.items():
    configs.set_value(c, key, value)
  return c


BAD_CONFIGS = [
    # (case, config, message regex: the key and the fix)
    ("unknown method", lambda: _config(method="simclr3"), r"config\.method.*use one of"),
    ("unknown model", lambda: _config(**{"model.name": "resnet7"}),
     r"config\.model\.name='resnet7' is unknown; use one of"),
    ("unknown data source", lambda: _config(**{"data.source": "s3"}),
     r"config\.data\.source.*use one of"),
    ("batch not divisible by devices", lambda: _config(global_batch=12),
     r"config\.global_batch of 12 is not divisible by the 8 devices.*multiple of 8"),
    ("batch not divisible by processes", lambda: _config(global_batch=32),
     r"config\.global_batch of 32 is not divisible by the 3 processes.*multiple of 3"),
    ("moco queue not a multiple of the batch", lambda: _moco(**{"moco.queue_size": 100}),
     r"config\.moco\.queue_size=100 must be a positive multiple.*set config\.moco\.queue_size="),
    ("moco momentum above 1", lambda: _moco(**{"moco.momentum": 1.5}),
     r"config\.moco\.momentum=1\.5 must be in \[0, 1\]"),
    ("negative temperature", lambda: _config(**{"loss.temperature": -0.1}),
     r"config\.loss\.temperature=-0\.1 must be positive"),
    ("image smaller than the ViT patch",
     lambda: _config(**{"model.name": "vit_ti16", "model.kwargs": {}, "data.image_size": 8}),
     r"config\.data\.image_size=8 must be a multiple of the ViT patch size 16"),
    ("image size too small", lambda: _config(**{"data.image_size": 4}),
     r"config\.data\.image_size=4 must be an integer >= 8"),
    ("unknown optimizer", lambda: _config(**{"optim.name": "adam3"}),
     r"config\.optim\.name='adam3' is unknown; use one of \['lars', 'sgd', 'adamw'\]"),
    ("negative learning rate", lambda: _config(**{"optim.base_lr": -0.1}),
     r"config\.optim\.base_lr=-0\.1 must be positive"),
    ("negative weight decay", lambda: _config(**{"optim.weight_decay": -1e-4}),
     r"config\.optim\.weight_decay=-0\.0001 must be >= 0"),
    ("zero log_every", lambda: _config(log_every=0), r"config\.log_every=0 must be >= 1"),
    ("zero checkpoint interval", lambda: _config(**{"checkpoint.every_steps": 0}),
     r"config\.checkpoint\.every_steps=0 must be >= 1"),
    ("zero preemption check interval",
     lambda: _config(**{"checkpoint.preemption_check_every": 0}),
     r"config\.checkpoint\.preemption_check_every=0 must be >= 1"),
    ("zero grad-cache micro-batches", lambda: _config(**{"grad_cache.micro_batches": 0}),
     r"config\.grad_cache\.micro_batches=0 must be an integer >= 1"),
    ("zero max_to_keep", lambda: _config(**{"checkpoint.max_to_keep": 0}),
     r"config\.checkpoint\.max_to_keep=0 must be >= 1"),
    ("both total_steps and total_epochs", lambda: _config(total_steps=4, total_epochs=1.0),
     r"exactly one of config\.total_steps and config\.total_epochs"),
    ("negative total_steps", lambda: _config(total_steps=-3),
     r"config\.total_steps=-3 must be positive"),
    ("unknown dtype", lambda: _config(dtype="float8"),
     r"config\.dtype='float8' is unknown; use one of"),
    ("unknown loss_impl", lambda: _config(loss_impl="ring2"),
     r"config\.loss_impl='ring2' is unknown; use one of \['all_gather', 'ring'\]"),
    ("loss_tile without the ring", lambda: _config(loss_tile=4),
     r"config\.loss_tile=4 tiles the ring loss only; set config\.loss_impl='ring'"),
    ("negative loss_tile", lambda: _config(loss_impl="ring", loss_tile=-1),
     r"config\.loss_tile=-1 must be an integer >= 0"),
    ("eval batch not divisible",
     lambda: _config(**{"eval.enabled": True, "eval.batch_size": 100}),
     r"config\.eval\.evaluators\.knn\.batch_size \(default config\.eval\.batch_size\) of 100 "
     r"is not divisible by the 8 devices"),
    ("zero kNN k", lambda: _config(**{"eval.enabled": True,
                                      "eval.evaluators": {"knn": {"type": "knn", "k": 0}}}),
     r"config\.eval\.evaluators\.knn\.k=0 must be >= 1"),
    ("tfds without a name", lambda: _config(**{"data.source": "tfds", "data.name": ""}),
     r"config\.data\.name must name a tfds dataset"),
    ("folder without a path", lambda: _config(**{"data.source": "folder", "data.path": None}),
     r"config\.data\.path must be set"),
    ("more devices than visible", lambda: _config(num_devices=16),
     r"config\.num_devices=16 but 8 devices are visible; use a number in 1\.\.8"),
]


@pytest.mark.parametrize("case,make,pattern", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_fails_fast_naming_key(case, make, pattern, tmp_path, monkeypatch):
  config = make()
  if case == "batch not divisible by processes":
    monkeypatch.setattr(jax, "process_count", lambda: 3)
  _forbid_compiling(monkeypatch)
  t0 = time.time()
  with pytest.raises(ValueError, match=pattern):  # ConfigError is a ValueError
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert time.time() - t0 < 10, "a config check should take well under a second"
  assert not (tmp_path / "run" / "checkpoints").exists()


# ----------------------------------------------------------------------------- 8: bad data


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  image.save(buf, fmt, **kw)
  return buf.getvalue()


def _photo(i: int) -> np.ndarray:
  from skimage import data as skdata
  photo = (skdata.chelsea(), skdata.coffee(), skdata.astronaut())[i % 3]
  return np.ascontiguousarray(photo[5 * i:5 * i + 24, 7 * i:7 * i + 30])


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory):
  """A folder of valid images in unusual modes, plus files that are not valid images."""
  root = tmp_path_factory.mktemp("odd_images")
  rgb = [Image.fromarray(_photo(i)) for i in range(6)]
  alpha = np.linspace(0, 255, 24 * 30).reshape(24, 30).astype(np.uint8)
  good = {
      "a/0_rgb.jpg": _encode(rgb[0], "JPEG", quality=95),
      "a/1_gray.jpg": _encode(rgb[1].convert("L"), "JPEG", quality=95),
      "a/2_cmyk.jpg": _encode(rgb[2].convert("CMYK"), "JPEG", quality=95),
      "b/3_rgba.png": _encode(Image.fromarray(np.dstack([_photo(3), alpha]), "RGBA"), "PNG"),
      "b/4_gray.png": _encode(rgb[4].convert("L"), "PNG"),
      "b/5_palette.png": _encode(rgb[5].convert("P"), "PNG"),
  }
  full_jpeg, full_png = _encode(rgb[0], "JPEG"), _encode(rgb[1], "PNG")
  bad = {
      "a/6_truncated.jpg": full_jpeg[:len(full_jpeg) // 2],
      "b/7_truncated.png": full_png[:len(full_png) // 2],
      "b/8_zero_bytes.png": b"",
      "a/9_text.jpg": b"filepath,caption\nthis is not an image\n",
  }
  for name, data in {**good, **bad}.items():
    os.makedirs(root / os.path.dirname(name), exist_ok=True)
    (root / name).write_bytes(data)
  clean = tmp_path_factory.mktemp("good_images")
  for name, data in good.items():
    os.makedirs(clean / os.path.dirname(name), exist_ok=True)
    (clean / name).write_bytes(data)
  return {"mixed": str(root), "clean": str(clean), "good": sorted(good), "bad": sorted(bad)}


def _data_config(source="mnist", recipe="simclr", image_size=16, **kw):
  """``config.data`` as the configs build it (configs/common.py), no blur."""
  return common.data_config(source, recipe=recipe, image_size=image_size,
                            augment=dict(strength=0.5, blur=False), **kw)


def test_unusual_image_modes_decode_to_rgb(odd_images):
  import tensorflow as tf
  src = S.folder_source(odd_images["clean"])
  assert len(src) == 6
  for path in src.columns["path"]:
    # The pipeline's decoder against PIL's conversion to RGB (grey replicated, CMYK converted,
    # alpha dropped, palette expanded).
    got = records.decode_record({"path": tf.constant(path)}).numpy()
    ref = np.asarray(Image.open(path).convert("RGB"))
    assert got.shape == ref.shape == (24, 30, 3) and got.dtype == np.uint8, path
    diff = np.abs(got.astype(int) - ref.astype(int))
    if path.endswith(".jpg"):
      # TF's fast integer IDCT vs PIL's: ~1 level on average, a dozen at a few CMYK pixels (a
      # wrong conversion, e.g. uninverted CMYK or a dropped channel, is off by ~100).
      assert diff.max() <= 16 and diff.mean() < 2.0, (path, diff.max(), diff.mean())
    else:
      assert diff.max() == 0, path
    if "gray" in path:
      np.testing.assert_array_equal(got[..., 0], got[..., 2])
  # Through the training and evaluation pipelines: 3 channels, finite.
  c = _data_config(source="folder", path=odd_images["clean"])
  batch = next(pipeline.train_iterator(c, mode="views", global_batch=6, seed=0, process_index=0,
                                process_count=1))
  assert batch["view1"].shape == (6, 16, 16, 3) and np.all(np.isfinite(batch["view1"]))
  ev = pipeline.eval_arrays(c, "train")
  assert ev["image"].shape == (6, 16, 16, 3) and np.all(np.isfinite(ev["image"]))


def test_broken_image_files_named_or_skipped_and_counted(odd_images, tmp_path):
  c = _data_config(source="folder", path=odd_images["mixed"])
  it = pipeline.train_iterator(c, mode="views", global_batch=10, seed=0, process_index=0,
                        process_count=1)
  with pytest.raises(records.CorruptImageError) as info:
    next(it)
  message = str(info.value)
  assert "4 image(s)" in message and "skip_corrupt" in message, message
  for name in odd_images["bad"]:
    assert os.path.basename(name) in message, (name, message)
  c.skip_corrupt = True
  it = pipeline.train_iterator(c, mode="views", global_batch=6, seed=0, process_index=0,
                        process_count=1)
  assert it.stats["corrupt_skipped"] == 4
  assert sorted(os.path.relpath(f, odd_images["mixed"]) for f in it.stats["corrupt_files"]) \
      == odd_images["bad"]
  batch = next(it)
  assert batch["view1"].shape == (6, 16, 16, 3) and np.all(np.isfinite(batch["view1"]))
  src = S.folder_source(odd_images["mixed"])
  good_ids = {i for i, p in enumerate(src.columns["path"])
              if os.path.relpath(p, odd_images["mixed"]) in odd_images["good"]}
  assert set(batch["index"].tolist()) == good_ids
  # Evaluation arrays skip them as well (and refuse them, naming a file, without the flag).
  assert len(pipeline.eval_arrays(c, "train")["label"]) == 6
  c.skip_corrupt = False
  with pytest.raises(records.CorruptImageError, match="truncated"):
    pipeline.eval_arrays(c, "train")
  # The trainer reports what its input skipped, in summary.json.
  run = _config(total_steps=1, global_batch=6, num_devices=2)
  run.data = _data_config(source="folder", path=odd_images["mixed"], skip_corrupt=True)
  summary = train.train_and_evaluate(run, str(tmp_path / "run")).summary
  assert summary["data"]["corrupt_skipped"] == 4
  assert len(summary["data"]["corrupt_files"]) == 4


def test_empty_and_overlong_captions(tmp_path):
  length = 12
  captions = ["", "x" * 500, "ok", "é" * 40]
  lines = ["filepath,caption"]
  for i, caption in enumerate(captions):
    Image.fromarray(_photo(i)).save(tmp_path / f"{i}.png")
    lines.append(f'{i}.png,"{caption}"')
  (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
  c = _data_config(source="csv", path=str(tmp_path / "pairs.csv"), recipe="clip",
                   context_length=length)
  it = pipeline.train_iterator(c, mode="image_text", global_batch=4, seed=0, process_index=0,
                        process_count=1)
  batch = next(it)
  assert batch["tokens"].shape == (4, length) and batch["tokens"].dtype == np.int32
  for idx, tokens in zip(batch["index"], batch["tokens"]):
    raw = np.frombuffer(captions[int(idx)].encode("utf-8"), np.uint8).astype(np.int32)
    content = (raw + T.NUM_SPECIAL)[:length - 2]
    want = np.zeros(length, np.int32)
    want[0], want[1:1 + len(content)], want[1 + len(content)] = T.SOT_ID, content, T.EOT_ID
    np.testing.assert_array_equal(tokens, want, err_msg=repr(captions[int(idx)][:20]))
    assert (tokens == T.EOT_ID).sum() == 1  # the pooling position always exists
