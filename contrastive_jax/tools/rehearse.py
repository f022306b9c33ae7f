"""Rehearsal of a full-scale config as a pod on one CPU machine, before paying for the pod.

  python -m contrastive_jax.tools.rehearse configs/clip_vit_b32.py[:args] \
      [--processes 2 --devices 2 --steps 4 --image_size 32 --batch 8 --workdir DIR]

(``launch/rehearse.py`` is the same command.) The rehearsal config and its data come from
``rehearsal`` (``derive``, ``write_data``); this module runs them as a ``local_pod.LocalPod``
of P processes x D simulated devices joined by ``jax.distributed`` over 127.0.0.1 with gloo
collectives, three times: uninterrupted to step N; a second run in a fresh directory whose last
process gets SIGKILL once a checkpoint has committed; a restart of all processes, which must
resume from that checkpoint and log the same losses as the uninterrupted run. Each phase is
bounded by a timeout and every process is killed on failure. A persistent XLA compilation cache
per rehearsal (``<workdir>/xla_cache``) makes the second and third starts reuse the first one's
executables. Exit status 0: passed; 1: failed; 2: a bad command line or config.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import time
from typing import Any

from contrastive_jax import configs
from contrastive_jax.errors import ConfigError
from contrastive_jax.tools import local_pod, rehearsal

HEARTBEAT_S = 10  # a killed peer is noticed by the survivors within this
# The package whose copy the workers import: this one's, wherever they start.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class RehearsalError(RuntimeError):
  pass


def _committed_steps(workdir: str) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _summary_losses(workdir: str) -> dict[int, float]:
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  return {int(h["step"]): float(h["loss"]) for h in summary["train_history"]}


def _start_pod(plan: rehearsal.Plan, config_path: str, run_dir: str, log_dir: str,
               cache_dir: str) -> local_pod.LocalPod:
  """The P workers of one phase, writing ``log_dir/process_I.log``."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
  extra = dict(TF_CPP_MIN_LOG_LEVEL="2", JAX_COMPILATION_CACHE_DIR=cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", CUDA_VISIBLE_DEVICES="")
  argv_for = lambda i, port: [
      sys.executable, "-m", "contrastive_jax.tools.rehearse", "worker",
      f"--config_json={config_path}", f"--workdir={run_dir}",
      *local_pod.distributed_flags(i, plan.processes, port)]
  # grace_s=0: a failed phase's processes are killed at once (no preemption save wanted).
  return local_pod.LocalPod(argv_for, plan.processes, devices=plan.devices, log_dir=log_dir,
                            env=env, extra_env=extra, grace_s=0)


def rehearse(plan: rehearsal.Plan, workdir: str, *, timeout_s: float = 1800,
             rtol: float = 1e-5, log=print) -> dict[str, Any]:
  """Runs the three phases (see the module docstring); returns timings and the compared
  losses, or raises ``RehearsalError`` naming the phase with the workers' log tails."""
  from contrastive_jax import checkpoint  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(workdir)
  data_dir = os.path.join(workdir, "data")
  if plan.data_kind == "tfrecord" and not plan.config.data.path.startswith(data_dir):
    raise ConfigError(f"the plan's data paths are not under {data_dir}; derive it with "
                      f"data_dir={data_dir!r}")
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  written = rehearsal.write_data(plan, data_dir)
  config_path = os.path.join(workdir, "rehearsal_config.json")
  with open(config_path, "w") as f:
    json.dump(checkpoint.to_jsonable(plan.config), f, indent=1)
  cache_dir = os.path.join(workdir, "xla_cache")
  deadline = time.time() + timeout_s
  steps = int(plan.config.total_steps)
  result: dict[str, Any] = {"data": written, "seconds": {"data": time.time() - t0}}

  def phase(name: str, run_dir: str, kill=False):
    t = time.time()
    log(f"[rehearse] phase {name}: {plan.processes} processes ...")
    try:
      with _start_pod(plan, config_path, run_dir, os.path.join(workdir, "logs", name),
                      cache_dir) as pod:
        if kill:
          _kill_one_after_a_checkpoint(pod, name, run_dir, deadline, result, log)
        else:
          rcs = pod.wait(max(0.0, deadline - time.time()))
          if rcs != [0] * plan.processes:
            hint = (" -9 without our kill: the OS killed it, usually for memory; rehearse "
                    "with fewer --devices per process") if -9 in rcs else ""
            raise RehearsalError(f"phase {name}: exit codes {rcs} (None: still running at "
                                 f"the deadline;{hint})\n" + pod.tails())
        return pod.logs()
    finally:
      result["seconds"][name] = time.time() - t
      log(f"[rehearse] phase {name}: {result['seconds'][name]:.0f} s")

  reference_dir, resumed_dir = (os.path.join(workdir, "uninterrupted"),
                                os.path.join(workdir, "resumed"))
  phase("uninterrupted", reference_dir)
  reference = _summary_losses(reference_dir)
  # Only the losses are compared: the real architectures' checkpoints are gigabytes.
  shutil.rmtree(os.path.join(reference_dir, "checkpoints"), ignore_errors=True)
  if sorted(reference) != list(range(1, steps + 1)):
    raise RehearsalError(f"uninterrupted run logged steps {sorted(reference)}")
  phase("killed", resumed_dir, kill=True)
  logs = phase("restart", resumed_dir)
  m = re.search(r"resumed from checkpoint step (\d+)", logs[0])
  if not m:
    raise RehearsalError("the restart did not resume from a checkpoint\n" + logs[0][-3000:])
  resumed_from = int(m.group(1))
  got = _summary_losses(resumed_dir)
  if sorted(got) != list(range(resumed_from + 1, steps + 1)) or not got:
    raise RehearsalError(f"the restart from step {resumed_from} logged steps {sorted(got)}, "
                         f"expected {resumed_from + 1}..{steps}")
  worst = 0.0
  for step, loss in got.items():
    want = reference[step]
    if not (abs(loss - want) <= rtol * abs(want)):
      raise RehearsalError(f"step {step}: resumed loss {loss!r} != uninterrupted {want!r} "
                           f"(rtol {rtol})")
    worst = max(worst, abs(loss - want) / max(abs(want), 1e-30))
  result.update(resumed_from=resumed_from, reference_losses=reference, resumed_losses=got,
                max_rel_diff=worst, total_seconds=time.time() - t0)
  return result


def _kill_one_after_a_checkpoint(pod: local_pod.LocalPod, name: str, run_dir: str,
                                 deadline: float, result: dict[str, Any], log) -> None:
  """SIGKILL to the last process once a checkpoint has committed; the survivors must notice
  their dead peer and exit non-zero."""
  last = pod.processes - 1
  pod.wait_for(lambda: _committed_steps(run_dir), max(0.0, deadline - time.time()))
  committed = _committed_steps(run_dir)
  if not committed or pod.returncodes()[last] is not None:
    raise RehearsalError(f"phase {name}: no checkpoint committed while every process was "
                         f"running (committed: {committed}); raise --steps\n" + pod.tails())
  pod.send_signal(last)  # SIGKILL, reaped
  result["killed_after_committed"] = committed
  log(f"[rehearse] SIGKILL to process {last} (committed checkpoints: {committed})")
  # The survivors notice the dead peer (heartbeat) and exit; bounded here too.
  pod.wait(max(0.0, min(deadline - time.time(), HEARTBEAT_S + 120)), fail_fast=False)
  rcs = pod.returncodes()
  result["survivor_exit_codes"] = rcs[:-1]
  if any(rc is None for rc in rcs):
    log(f"[rehearse] survivors still running {HEARTBEAT_S + 120} s after the kill: killed")
  elif any(rc == 0 for rc in rcs[:-1]):
    raise RehearsalError(f"phase {name}: a survivor of the killed process exited 0 (it should "
                         "notice its dead peer)\n" + pod.tails())


# ----------------------------------------------------------------------------- worker


def _worker(args) -> None:
  """One process of the pod: distributed init, the mock tfds context, the trainer."""
  from contrastive_jax import checkpoint  # pylint: disable=g-import-not-at-top
  checkpoint.quiet_orbax_logs()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_threefry_partitionable", True)
  from absl import logging  # pylint: disable=g-import-not-at-top
  from contrastive_jax import distributed, train  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  logging.use_absl_handler()
  distributed.initialize_distributed(args.coordinator_address, args.num_processes,
                                     args.process_id, args.cpu_collectives,
                                     heartbeat_timeout_s=HEARTBEAT_S, shutdown_timeout_s=60)
  # Gloo creates a communicator at its first collective and gives up after 30 s if a peer is
  # not there yet. On a loaded CPU machine a restarted process can be that far behind (one
  # loads executables from the compilation cache while the other still imports): meet once
  # here, right after start-up, where the processes are together.
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  multihost_utils.sync_global_devices("rehearsal worker started")
  with open(args.config_json) as f:
    config = configs.config_from_json(json.load(f))
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  context = contextlib.nullcontext()
  if config.data.source == "tfds":
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    context = tfds.testing.mock_data(num_examples=rehearsal.TFDS_EXAMPLES)
  with context:
    result = train.train_and_evaluate(config, args.workdir)
  logging.info("finished: %s", result.summary is not None)


# ----------------------------------------------------------------------------- command line


def parse_args(argv):
  p = argparse.ArgumentParser(
      prog="python -m contrastive_jax.tools.rehearse", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("config", help="configs/NAME.py[:args] or the path of your own config")
  p.add_argument("--processes", type=int, default=2)
  p.add_argument("--devices", type=int, default=2, help="simulated CPU devices per process")
  p.add_argument("--steps", type=int, default=4)
  p.add_argument("--checkpoint_every", type=int, default=1)
  p.add_argument("--image_size", type=int, default=None, help="default 32")
  p.add_argument("--batch", type=int, default=None, help="global batch; default 2 per device")
  p.add_argument("--workdir", default=None, help="default /tmp/rehearsal_<config name>")
  p.add_argument("--timeout_s", type=float, default=1800)
  p.add_argument("--rtol", type=float, default=1e-5)
  p.add_argument("--plan_only", action="store_true", help="print the table and exit")
  return p.parse_args(argv)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv and argv[0] == "worker":
    p = argparse.ArgumentParser()
    for name in ("config_json", "workdir", "coordinator_address", "cpu_collectives"):
      p.add_argument(f"--{name}", required=True)
    p.add_argument("--num_processes", type=int, required=True)
    p.add_argument("--process_id", type=int, required=True)
    _worker(p.parse_args(argv[1:]))
    return 0
  args = parse_args(argv)
  name = os.path.basename(args.config.split(":")[0])[:-3]
  workdir = os.path.abspath(args.workdir or f"/tmp/rehearsal_{name}")
  try:
    plan = rehearsal.derive(configs.load_config(args.config), spec=args.config,
                            processes=args.processes, devices=args.devices, steps=args.steps,
                            checkpoint_every=args.checkpoint_every,
                            image_size=args.image_size, batch=args.batch,
                            data_dir=os.path.join(workdir, "data"))
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(rehearsal.format_table(plan), flush=True)
  warning = local_pod.loopback_warning(plan.processes, plan.devices, local_pod.loopback_route())
  if warning:
    print(warning, file=sys.stderr, flush=True)
  if args.plan_only:
    return 0
  if os.path.exists(workdir) and os.listdir(workdir):
    print(f"error: --workdir {workdir} is not empty; a rehearsal starts fresh", file=sys.stderr)
    return 2
  try:
    out = rehearse(plan, workdir, timeout_s=args.timeout_s, rtol=args.rtol,
                   log=lambda s: print(s, flush=True))
  except RehearsalError as e:
    print(f"REHEARSAL FAILED: {e}", file=sys.stderr)
    return 1
  secs = out["seconds"]
  print(f"\nREHEARSAL PASSED: {name} in {out['total_seconds']:.0f} s (uninterrupted "
        f"{secs['uninterrupted']:.0f} s, killed {secs['killed']:.0f} s, restart "
        f"{secs['restart']:.0f} s); killed after checkpoints {out['killed_after_committed']}, "
        f"resumed from step {out['resumed_from']}; losses of steps "
        f"{min(out['resumed_losses'])}..{max(out['resumed_losses'])} equal the uninterrupted "
        f"run's (max relative difference {out['max_rel_diff']:.1e}); logs: {workdir}/logs")
  return 0


if __name__ == "__main__":
  sys.exit(main())
