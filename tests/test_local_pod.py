"""LocalPod and its launcher (``launch/local_multiprocess.sh``) with stand-in processes (bash
scripts, no trainer): what tests/test_launchers.py's fail-fast test does not cover. A bound is
not a timing: each wait ends as soon as its condition holds."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

from contrastive_jax.tools import local_pod

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gone(pid: int) -> bool:
  """Whether ``pid`` has ended (a zombie waiting for its new parent to reap it counts)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] == "Z"
  except FileNotFoundError:
    return True


def _wait(condition, what, bound_s=30.0):
  deadline = time.monotonic() + bound_s
  while not condition():
    assert time.monotonic() < deadline, what
    time.sleep(0.02)


def _stand_in(tmp_path, body: str):
  """An executable that stands in for the trainer's python; ``$ID`` is its --process_id."""
  path = tmp_path / "python"
  path.write_text("#!/usr/bin/env bash\nID=$(printf '%s\\n' \"$@\" | sed -n "
                  "'s/^--process_id=//p')\n" + body)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return str(path)


def _launch(tmp_path, stand_in, **env):
  return subprocess.Popen(
      ["bash", os.path.join(ROOT, "launch", "local_multiprocess.sh"), "2", "1",
       str(tmp_path / "run"), "configs/simclr_mnist.py:quick"],
      env=dict(os.environ, PYTHON=stand_in, PORT="1", **env), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)


def test_launcher_passes_sigterm_on_to_every_process(tmp_path):
  """A preemption notice to the launcher reaches every process, which saves and exits 0; the
  launcher then exits 0. (The bash launcher died of the SIGTERM, exit 143, and left the
  processes running.)"""
  stand_in = _stand_in(tmp_path, f"""echo $$ > {tmp_path}/pid_$ID
trap 'echo saved > {tmp_path}/saved_$ID; exit 0' TERM
touch {tmp_path}/ready_$ID
for i in $(seq 600); do sleep 0.1; done
exit 9
""")
  launcher = _launch(tmp_path, stand_in)
  try:
    _wait(lambda: all((tmp_path / f"ready_{i}").exists() for i in range(2)), "start")
    launcher.send_signal(signal.SIGTERM)
    out, err = launcher.communicate(timeout=60)
  finally:
    if launcher.poll() is None:
      launcher.kill()
      launcher.wait()
  pids = [int((tmp_path / f"pid_{i}").read_text()) for i in range(2)]
  for pid in pids:  # never left behind, whatever the launcher did
    if not _gone(pid):
      os.kill(pid, signal.SIGKILL)
  assert launcher.returncode == 0, out + err
  for i in range(2):
    assert (tmp_path / f"saved_{i}").read_text().strip() == "saved"
  assert all(_gone(pid) for pid in pids)


def test_launcher_timeout_stops_processes_that_ignore_sigterm(tmp_path):
  """TIMEOUT_S bounds the pod: a process deaf to SIGTERM is killed GRACE_S later, with what
  it started, and the launcher exits 124."""
  stand_in = _stand_in(tmp_path, f"""trap '' TERM
sleep 300 &
echo $! > {tmp_path}/child_$ID
wait
""")
  launcher = _launch(tmp_path, stand_in, TIMEOUT_S="2", GRACE_S="0.5")
  try:
    out, err = launcher.communicate(timeout=60)
  finally:
    if launcher.poll() is None:
      launcher.kill()
      launcher.wait()
  children = [int((tmp_path / f"child_{i}").read_text()) for i in range(2)]
  try:
    assert launcher.returncode == local_pod.TIMEOUT_EXIT_CODE, out + err
    assert "still running after --timeout_s=2 s" in err
    _wait(lambda: all(_gone(pid) for pid in children), "the processes' children ended")
  finally:
    for pid in children:
      if not _gone(pid):
        os.kill(pid, signal.SIGKILL)


def test_pod_closes_and_reports_exit_codes(tmp_path):
  """``wait`` returns at the first failure without stopping anything; ``close`` ends the rest
  (SIGKILL after the grace for a process deaf to SIGTERM); the logs stay readable."""
  script = ("import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('process', sys.argv[1], 'port', sys.argv[2], flush=True)\n"
            "sys.exit(5) if sys.argv[1] == '1' else time.sleep(300)\n")
  with local_pod.LocalPod(lambda i, port: [sys.executable, "-c", script, i, port], 2, devices=3,
                          log_dir=tmp_path, grace_s=0.5) as pod:
    assert pod.wait(60) == [None, 5] and pod.failed() == 1
    assert pod.wait_process(0, 0.01) is None  # fail-fast stops nothing by itself
  assert pod.returncodes() == [-signal.SIGKILL, 5]
  assert pod.log(1).strip() == f"process 1 port {pod.port}"
  assert pod.env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=3"

