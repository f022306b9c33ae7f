"""A pod on one machine: P processes x D simulated CPU devices joined over 127.0.0.1.

``LocalPod`` starts the processes of a multi-process JAX run on this machine: each gets
``XLA_FLAGS=--xla_force_host_platform_device_count=D`` and ``JAX_PLATFORMS=cpu``, they meet at
a coordinator on a free loopback port (``jax.distributed.initialize``, gloo collectives for
XLA:CPU; https://jax.readthedocs.io/en/latest/multi_process.html) and each writes its combined
stdout and stderr to its own log file. It is the one process starter of the rehearsal
(``contrastive_jax.tools.rehearse``), the local launcher (``launch/local_multiprocess.sh``) and
the multi-process tests. A pod fails fast: ``wait`` returns as soon as one process fails, and
``stop`` ends the others with SIGTERM (a trainer's preemption path saves a checkpoint) and then
SIGKILL after a grace, since a process blocked in a collective with a dead peer never reaches
its SIGTERM check. Used as a context manager, a pod never leaves a process behind.

The command line runs the trainer (``contrastive_jax.main``) as such a pod:

  python -m contrastive_jax.tools.local_pod [--timeout_s 900 --grace_s 10 --port P \
      --python PY] NUM_PROCESSES DEVICES_PER_PROCESS WORKDIR CONFIG [trainer flags ...]

Logs: ``WORKDIR/process_I.log``. Exit status: 0 when every process exited 0; else the first
failing process's (128 + N for signal N), 124 when ``--timeout_s`` passed first. SIGTERM or
SIGINT to the launcher is passed on to every process as SIGTERM (a preemption notice).

Standard library only (the launcher script runs it with any Python 3); the package's
multi-process code is in ``contrastive_jax.distributed``.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Mapping, Sequence

from contrastive_jax.errors import UserError

LOCALHOST = "127.0.0.1"
GRACE_S = 10.0    # SIGTERM -> SIGKILL
TIMEOUT_S = 900.0  # the command line's bound on the whole pod
TIMEOUT_EXIT_CODE = 124  # as coreutils' timeout(1)


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago (the OS's choice of an ephemeral one)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((LOCALHOST, 0))
    return s.getsockname()[1]


def distributed_flags(process_id: int, processes: int, port: int) -> list[str]:
  """The flags of ``contrastive_jax.main`` (and of the rehearsal's worker) that make a process
  ``process_id`` of a ``processes``-process pod whose coordinator listens on ``port``."""
  return [f"--coordinator_address={LOCALHOST}:{port}", f"--num_processes={processes}",
          f"--process_id={process_id}", "--cpu_collectives=gloo"]


class LocalPod:
  """``processes`` processes started at construction, one per ``argv_for(process_id, port)``.

  Args:
    argv_for: the command line of process ``i`` (``[python, ...]``), given the coordinator's
      port (every process shares it; ``distributed_flags`` builds the trainer's flags).
    processes: P >= 1.
    devices: D >= 1 simulated CPU devices per process (``XLA_FLAGS``), or None when the
      processes set ``XLA_FLAGS`` themselves (the inherited value is dropped either way).
    log_dir: where ``log_name.format(i)`` is written; None: a temporary folder removed by
      ``close()`` (read the logs before).
    env: the processes' environment (default ``os.environ``), updated with ``extra_env``.
    cwd: their working directory (default this process's).
    port: the coordinator's port (default a free one).
    grace_s: seconds between SIGTERM and SIGKILL in ``stop()`` and ``close()``.

  Each process leads its own process group, and ``stop`` signals the group, so that whatever
  a process started ends with it; ``send_signal`` reaches the process alone (a rehearsed kill).
  """

  def __init__(self, argv_for: Callable[[int, int], Sequence[str]], processes: int, *,
               devices: int | None, log_dir: str | os.PathLike | None = None,
               log_name: str = "process_{}.log", env: Mapping[str, str] | None = None,
               extra_env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None,
               port: int | None = None, grace_s: float = GRACE_S):
    if processes < 1:
      raise UserError(f"a pod needs at least 1 process, got {processes}")
    if devices is not None and devices < 1:
      raise UserError(f"a pod needs at least 1 device per process, got {devices}")
    self.processes, self.devices, self.grace_s = processes, devices, grace_s
    self.port = free_port() if port is None else int(port)
    self._tmp = None
    if log_dir is None:
      self._tmp = tempfile.TemporaryDirectory(prefix="local_pod_")
      log_dir = self._tmp.name
    os.makedirs(log_dir, exist_ok=True)
    self.log_paths = [os.path.join(log_dir, log_name.format(i)) for i in range(processes)]
    self.env = dict(os.environ if env is None else env, JAX_PLATFORMS="cpu")
    self.env.pop("XLA_FLAGS", None)
    if devices is not None:
      self.env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    self.env.update(extra_env or {})
    self.procs: list[subprocess.Popen] = []
    try:
      for i, path in enumerate(self.log_paths):
        with open(path, "wb") as log:  # the child keeps its own descriptor
          self.procs.append(subprocess.Popen(
              [str(a) for a in argv_for(i, self.port)], env=self.env, cwd=cwd, stdout=log,
              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True))
    except BaseException:
      self.close()
      raise

  def __enter__(self) -> LocalPod:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # ------------------------------------------------------------------------- state and logs

  def returncodes(self) -> list[int | None]:
    """Each process's exit code (negative: killed by that signal), None while it runs."""
    return [p.poll() for p in self.procs]

  def running(self) -> bool:
    return any(rc is None for rc in self.returncodes())

  def failed(self) -> int | None:
    """The index of a process that exited non-zero (the first one to be seen), else None."""
    for i, rc in enumerate(self.returncodes()):
      if rc not in (None, 0):
        return i
    return None

  def log(self, i: int) -> str:
    """Process ``i``'s output so far."""
    with open(self.log_paths[i], errors="replace") as f:
      return f.read()

  def logs(self) -> list[str]:
    return [self.log(i) for i in range(len(self.log_paths))]

  def tails(self, chars: int = 2500) -> str:
    """The last ``chars`` characters of every log, each under its path and exit code."""
    return "\n".join(f"--- {path} (rc={rc}) ---\n{self.log(i)[-chars:]}"
                     for i, (path, rc) in enumerate(zip(self.log_paths, self.returncodes())))

  # ------------------------------------------------------------------------- waiting

  def wait(self, timeout_s: float | None, poll_s: float = 0.2,
           fail_fast: bool = True) -> list[int | None]:
    """Waits until every process has exited, one has failed (with ``fail_fast``: the others
    would only wait for it) or ``timeout_s`` passed; returns ``returncodes()`` then. Stops
    nothing."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while self.running() and not (fail_fast and self.failed() is not None):
      if deadline is not None and time.monotonic() >= deadline:
        break
      time.sleep(poll_s)
    return self.returncodes()

  def wait_process(self, i: int, timeout_s: float) -> int | None:
    """Process ``i``'s exit code once it exits, None if it runs ``timeout_s`` longer."""
    try:
      return self.procs[i].wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
      return None

  def wait_for(self, predicate: Callable[[], Any], timeout_s: float,
               poll_s: float = 0.05) -> Any:
    """Polls ``predicate()`` until it is true and returns its value; returns it falsy once a
    process has exited (after a last look) or ``timeout_s`` passed."""
    deadline = time.monotonic() + timeout_s
    while True:
      ended = not all(rc is None for rc in self.returncodes())
      value = predicate()
      if value or ended or time.monotonic() >= deadline:
        return value
      time.sleep(poll_s)

  # ------------------------------------------------------------------------- signals

  def send_signal(self, i: int, sig: int = signal.SIGKILL) -> int | None:
    """Sends ``sig`` to process ``i`` alone; after SIGKILL, waits for it and returns its exit
    code (else None)."""
    proc = self.procs[i]
    if proc.poll() is None:
      proc.send_signal(sig)
    return proc.wait() if sig == signal.SIGKILL else None

  def terminate_all(self) -> None:
    """SIGTERM to every running process's group (a preemption notice); waits for nothing."""
    self._signal_groups(signal.SIGTERM)

  def stop(self, grace_s: float | None = None) -> list[int | None]:
    """Ends every running process: SIGTERM, then SIGKILL to those still running ``grace_s``
    later (default the pod's; 0: SIGKILL at once). Returns the exit codes, all set."""
    grace_s = self.grace_s if grace_s is None else grace_s
    if grace_s > 0 and self.running():
      self._signal_groups(signal.SIGTERM)
      deadline = time.monotonic() + grace_s
      while self.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    self._signal_groups(signal.SIGKILL)
    return [p.wait() for p in self.procs]

  def close(self) -> None:
    """``stop()`` and remove a temporary log folder; safe to call twice."""
    self.stop()
    if self._tmp is not None:
      self._tmp.cleanup()
      self._tmp = None

  def _signal_groups(self, sig: int) -> None:
    for p in self.procs:
      if p.poll() is None:  # not reaped: its pid (and group id) is still its own
        try:
          os.killpg(p.pid, sig)
        except ProcessLookupError:
          pass


# ----------------------------------------------------------------------------- loopback

# Delayed ACKs on loopback and gloo's send buffers: at several processes x several devices, a
# reduce-scatter's small first message locks a gloo socket's SO_SNDBUF at the kernel's 4.5 KiB
# minimum, and a one-way ring link then moves one segment per delayed ACK (40 ms): ~1.6 MB/s,
# about 120 s a SimCLR ResNet-50 step. ``quickack 1`` on the loopback route removes the wait
# (tcp(7) TCP_QUICKACK, ip-route(8); docs/rehearsals_gloo.md, benchmarks/gloo_loopback.py).
QUICKACK_COMMAND = ("ip route change table local local 127.0.0.1 dev lo proto kernel scope host "
                    "src 127.0.0.1 quickack 1")


def loopback_route() -> str | None:
  """What ``ip route get 127.0.0.1`` prints (the route the pod's sockets use); None without
  the ``ip`` command."""
  try:
    return subprocess.run(["ip", "route", "get", LOCALHOST], capture_output=True, text=True,
                          timeout=10, check=False).stdout
  except (OSError, subprocess.SubprocessError):
    return None


def loopback_quickack(route: str | None) -> bool:
  """Whether ``route`` (``loopback_route()``'s text) turns delayed ACKs off."""
  return route is not None and re.search(r"\bquickack 1\b", route) is not None


def loopback_warning(processes: int, devices: int, route: str | None) -> str | None:
  """A warning when a P x D pod (P, D > 1) will stall on delayed ACKs over loopback, else None.

  ``route``: ``loopback_route()``'s text. One device per process does not stall (each gloo
  link then carries data both ways, so ACKs ride on the data), nor does one process.
  """
  if processes < 2 or devices < 2 or loopback_quickack(route):
    return None
  seen = ("the loopback route could not be read (no `ip` command)" if route is None else
          "delayed ACKs are on for 127.0.0.1 (its route has no `quickack 1`)")
  return (f"WARNING: {seen}: at {processes} processes x {devices} devices a gloo link whose "
          "send buffer a small reduce-scatter locked at 4.5 KiB moves one segment per 40 ms "
          "delayed ACK, about 120 s a ResNet-50 step (docs/rehearsals_gloo.md). As root: "
          f"`{QUICKACK_COMMAND}` (until reboot), or rehearse with --devices 1.")


# ----------------------------------------------------------------------------- command line


def _exit_status(rc: int) -> int:
  return 128 - rc if rc < 0 else rc  # as a shell reports a process killed by signal -rc


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="python -m contrastive_jax.tools.local_pod", description=__doc__.split("\n\n")[0],
      epilog="Options go before NUM_PROCESSES; everything after CONFIG is passed to "
             "contrastive_jax.main.")
  p.add_argument("--timeout_s", type=float, default=TIMEOUT_S,
                 help="bound on the pod; then SIGTERM, SIGKILL after the grace, exit 124")
  p.add_argument("--grace_s", type=float, default=GRACE_S, help="SIGTERM -> SIGKILL")
  p.add_argument("--port", type=int, default=None, help="coordinator port; default a free one")
  p.add_argument("--python", default=sys.executable, help="the processes' interpreter")
  p.add_argument("num_processes", type=int)
  p.add_argument("devices_per_process", type=int)
  p.add_argument("workdir")
  p.add_argument("config")
  p.add_argument("flags", nargs=argparse.REMAINDER, help="flags of contrastive_jax.main")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  name = "local_pod"
  n = args.num_processes

  def argv_for(i: int, port: int) -> list[str]:
    return [args.python, "-m", "contrastive_jax.main", f"--config={args.config}",
            f"--workdir={args.workdir}", *distributed_flags(i, n, port), *args.flags]

  try:
    pod = LocalPod(argv_for, n, devices=args.devices_per_process, log_dir=args.workdir,
                   port=args.port, grace_s=args.grace_s)
  except UserError as e:
    print(f"{name}: {e}", file=sys.stderr)
    return 2
  # A preemption notice to the launcher is one to every process: they save and exit 0.
  forward = lambda *_: pod.terminate_all()
  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  status = 0
  try:
    rcs = pod.wait(args.timeout_s)
    failed = pod.failed()
    if failed is not None:
      status = _exit_status(rcs[failed])
      print(f"{name}: process {failed} exited with code {status}; stopping the others",
            file=sys.stderr, flush=True)
    elif None in rcs:
      status = TIMEOUT_EXIT_CODE
      print(f"{name}: still running after --timeout_s={args.timeout_s:g} s; stopping every "
            "process", file=sys.stderr, flush=True)
  finally:
    pod.close()
    for s, handler in previous.items():
      signal.signal(s, handler)
  for i, log in enumerate(pod.logs()):
    print(f"--- process {i} (tail) ---")
    print("\n".join(log.splitlines()[-5:]))
  return status


if __name__ == "__main__":
  sys.exit(main())
