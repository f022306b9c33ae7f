"""The pod and cluster launchers: the commands they print, and those commands run for real.

``launch/tpu_pod.sh`` cannot reach a TPU here, so its dry run is checked for every gcloud flag,
and the remote command it would send is executed on this machine (a fake venv python stands in
for the trainer): detached start, argument quoting, pid file, status and SIGTERM on stop.
``launch/slurm.sh``'s batch script is run with a fake ``srun`` that starts one process per
"node" on loopback with SLURM's variables, so the trainer's ``--multihost`` path is jax's own
SLURM auto-detection, and a fake ``scontrol`` records the requeue.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_ENV = {"PROJECT": "my-project", "ZONE": "us-central2-b", "TPU_NAME": "pod-1",
           "DRY_RUN": "1"}


def _tpu(action, *args, **env):
  full = dict(os.environ, **{**TPU_ENV, **env})
  return subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), action, *args],
                        env=full, capture_output=True, text=True, timeout=60)


def _printed(proc) -> list[list[str]]:
  """The commands a dry run printed (``+ cmd ...`` lines), each split as the shell would."""
  assert proc.returncode == 0, proc.stderr
  return [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]


def _remote(cmd: list[str]) -> str:
  """The ``--command=`` that a gcloud ssh call would run on the workers."""
  assert cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], cmd
  for flag in ("--zone=us-central2-b", "--project=my-project", "--worker=all"):
    assert flag in cmd, (flag, cmd)
  return next(a for a in cmd if a.startswith("--command="))[len("--command="):]


def _write_exe(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_tpu_pod_requires_project_zone_and_name():
  for var in ("PROJECT", "ZONE", "TPU_NAME"):
    env = {k: v for k, v in os.environ.items() if k not in TPU_ENV}
    env.update({k: v for k, v in TPU_ENV.items() if k != var})
    proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "create"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and f"set {var}" in proc.stderr, proc.stderr
  proc = _tpu("reboot")
  assert proc.returncode == 2 and "unknown action" in proc.stderr


def test_tpu_pod_create_and_delete_pass_project_zone_and_spot():
  (create,) = _printed(_tpu("create", ACCELERATOR="v4-64", SPOT="1"))
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod-1"]
  for flag in ("--zone=us-central2-b", "--project=my-project", "--accelerator-type=v4-64",
               "--version=tpu-ubuntu2204-base", "--spot"):
    assert flag in create, (flag, create)
  (delete,) = _printed(_tpu("delete"))
  assert delete[4:6] == ["delete", "pod-1"] and "--project=my-project" in delete


def test_tpu_pod_setup_ships_this_checkout_and_builds_a_python_311_venv():
  archive, scp, ssh = _printed(_tpu("setup"))
  assert archive[:3] == ["git", "archive", "--format=tar.gz"] and archive[-1] == "HEAD"
  tarball = archive[archive.index("-o") + 1]
  assert scp[4] == "scp" and scp[5] == tarball and scp[6] == "pod-1:contrastive_jax.tar.gz"
  assert "--worker=all" in scp and "--project=my-project" in scp
  remote = _remote(ssh)
  assert "tar -xzf ~/contrastive_jax.tar.gz" in remote
  assert "uv venv" in remote and "--python 3.11" in remote
  assert "'jax[tpu]==0.10.2'" in remote and "-r requirements.txt" in remote
  assert "sys.version_info >= (3, 11)" in remote  # the setup fails loudly otherwise
  # With REPO_URL the workers clone it instead (the ref quoted).
  (ssh,) = _printed(_tpu("setup", REPO_URL="https://example.com/x.git", REF="v1 2"))
  assert "git clone --quiet https://example.com/x.git" in _remote(ssh)
  assert "git checkout --quiet v1\\ 2" in _remote(ssh)


def test_tpu_pod_image_follows_the_accelerator_generation():
  """Cloud TPU runtime images per generation (cloud.google.com/tpu/docs/runtimes); v5e slices
  are named v5litepod-N by the API."""
  for accelerator, api_name, image in [
      ("v4-64", "v4-64", "tpu-ubuntu2204-base"),
      ("v5e-64", "v5litepod-64", "v2-alpha-tpuv5-lite"),
      ("v5litepod-16", "v5litepod-16", "v2-alpha-tpuv5-lite"),
      ("v5p-128", "v5p-128", "v2-alpha-tpuv5"),
      ("v6e-256", "v6e-256", "v2-alpha-tpuv6e")]:
    for env in ({}, {"QUEUED": "1"}):
      create = _printed(_tpu("create", ACCELERATOR=accelerator, **env))[0]
      assert f"--accelerator-type={api_name}" in create, (accelerator, create)
      version_flag = "--runtime-version" if env else "--version"
      assert f"{version_flag}={image}" in create, (accelerator, create)
  (create,) = _printed(_tpu("create", ACCELERATOR="v5e-8", TPU_SOFTWARE_VERSION="my-image"))
  assert "--version=my-image" in create and "--accelerator-type=v5litepod-8" in create
  unknown = _tpu("create", ACCELERATOR="v9x-8")
  assert unknown.returncode == 2 and "set TPU_SOFTWARE_VERSION" in unknown.stderr
  (create,) = _printed(_tpu("create", ACCELERATOR="v9x-8", TPU_SOFTWARE_VERSION="v2-alpha-x"))
  assert "--accelerator-type=v9x-8" in create and "--version=v2-alpha-x" in create
  malformed = _tpu("create", ACCELERATOR="v5e")
  assert malformed.returncode == 2 and "GENERATION-SIZE" in malformed.stderr
  both = _tpu("create", SPOT="1", RESERVED="1")
  assert both.returncode == 2 and "exclude each other" in both.stderr


def test_tpu_pod_queued_resource_create_wait_and_delete_dry_run():
  create, describe = _printed(_tpu("create", ACCELERATOR="v5e-64", QUEUED="1", RESERVED="1",
                                   VALID_UNTIL="6h", INTERNAL_IPS="1"))
  assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "pod-1-qr"]
  for flag in ("--node-id=pod-1", "--zone=us-central2-b", "--project=my-project",
               "--accelerator-type=v5litepod-64", "--runtime-version=v2-alpha-tpuv5-lite",
               "--reserved", "--valid-until-duration=6h", "--internal-ips"):
    assert flag in create, (flag, create)
  assert "--spot" not in create
  assert describe[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "pod-1-qr"]
  assert "--format=value(state.state)" in describe
  (create,) = _printed(_tpu("create", ACCELERATOR="v6e-16", QUEUED="1", SPOT="1",
                            QUEUED_RESOURCE="my-request"))[:1]
  assert create[5] == "my-request" and "--spot" in create and "--reserved" not in create
  (delete,) = _printed(_tpu("delete", QUEUED="1"))
  assert delete[3:6] == ["queued-resources", "delete", "pod-1-qr"]
  assert "--force" in delete and "--quiet" in delete  # the slice goes with the request
  refused = _tpu("wait")
  assert refused.returncode == 2 and "QUEUED=1" in refused.stderr


def _stand_in_gcloud(tmp_path, states):
  """A gcloud on PATH that records its arguments and answers `describe` with the next state."""
  bindir = tmp_path / "bin"
  bindir.mkdir(exist_ok=True)
  (tmp_path / "states").write_text("".join(f"{s}\n" for s in states))
  _write_exe(bindir / "gcloud", f"""#!/usr/bin/env bash
echo "$*" >> {tmp_path}/gcloud_calls
if [ "$4" = describe ]; then head -n 1 {tmp_path}/states; sed -i 1d {tmp_path}/states; fi
""")
  return dict(DRY_RUN="0", PATH=f"{bindir}:{os.environ['PATH']}", POLL_S="0")


def test_tpu_pod_queued_create_polls_until_active(tmp_path):
  env = _stand_in_gcloud(tmp_path, ["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
  proc = _tpu("create", ACCELERATOR="v5p-8", QUEUED="1", SPOT="1", **env)
  assert proc.returncode == 0, proc.stderr
  calls = (tmp_path / "gcloud_calls").read_text().splitlines()
  assert calls[0].startswith("compute tpus queued-resources create pod-1-qr --node-id=pod-1")
  assert [c.split()[3] for c in calls[1:]] == ["describe"] * 3
  assert "PROVISIONING" in proc.stdout and "is ACTIVE" in proc.stdout


@pytest.mark.parametrize("states,code,message", [
    (["ACCEPTED", "FAILED"], 4, "is FAILED"),
    (["WAITING_FOR_RESOURCES"] * 3, 5, "still WAITING_FOR_RESOURCES after 0 s")])
def test_tpu_pod_queued_wait_is_bounded(tmp_path, states, code, message):
  """A failed request stops the wait; an unserved one stops it after QUEUE_WAIT_S (here 0:
  one look) and stays queued."""
  env = _stand_in_gcloud(tmp_path, states)
  proc = _tpu("wait", QUEUED="1", QUEUE_WAIT_S="0" if code == 5 else "60", **env)
  assert proc.returncode == code and message in proc.stderr, proc.stderr
  n = len((tmp_path / "gcloud_calls").read_text().splitlines())
  assert n == (2 if code == 4 else 1)


def test_tpu_pod_setup_without_internet():
  """WHEELHOUSE: the workers copy it from gs:// and install with pip --no-index; the
  interpreter is the wheelhouse's CPython (or the image's python3). No PyPI, no astral.sh."""
  (ssh,) = _printed(_tpu("setup", REPO_URL="https://example.com/x.git",
                         WHEELHOUSE="gs://b/wheelhouse/", INTERNAL_IPS="1"))
  assert "--internal-ip" in ssh
  remote = _remote(ssh)
  assert "gcloud storage cp -r gs://b/wheelhouse/\\* ~/contrastive_jax_wheelhouse/" in remote
  assert "tar -xzf ~/contrastive_jax_wheelhouse/python.tar.gz" in remote
  assert "--no-index --find-links ~/contrastive_jax_wheelhouse/wheels" in remote
  assert "-r requirements.txt 'jax[tpu]==0.10.2'" in remote
  for online in ("astral.sh", "uv venv", "curl"):
    assert online not in remote, online
  (ssh,) = _printed(_tpu("setup", REPO_URL="u", WHEELHOUSE="gs://b/w", PYTHON_FROM="image"))
  assert "python3 -m venv" in _remote(ssh) and "--no-index" in _remote(ssh)
  bad = _tpu("setup", PYTHON_FROM="wheelhouse")
  assert bad.returncode == 2 and "needs WHEELHOUSE" in bad.stderr
  _, scp, _ = _printed(_tpu("setup", INTERNAL_IPS="1"))
  assert "--internal-ip" in scp


def test_tpu_pod_setup_image_python_too_old_fails_clearly(tmp_path):
  """PYTHON_FROM=image on an image whose python3 is 3.10: the remote command stops with a
  message naming the fixes, before it makes a venv."""
  (ssh,) = _printed(_tpu("setup", REPO_URL="u", PYTHON_FROM="image"))
  remote = _remote(ssh)
  step = remote[remote.index("python3 -c"):remote.index(" && python3 -m venv")]
  bindir = tmp_path / "bin"
  bindir.mkdir()
  _write_exe(bindir / "python3", "#!/usr/bin/env bash\n"
             "[ \"$1\" = -V ] && { echo Python 3.10.12; exit 0; }; exit 1\n")
  proc = subprocess.run(["bash", "-c", step], env=dict(os.environ, PATH=f"{bindir}:/usr/bin:/bin"),
                        capture_output=True, text=True, timeout=30)
  assert proc.returncode == 4
  assert "Python 3.10.12 is older than 3.11: use PYTHON_FROM=uv" in proc.stderr


def test_tpu_pod_wheelhouse_is_built_for_the_workers(tmp_path):
  pip, uv, tar, cp = _printed(_tpu("wheelhouse", "gs://b/wheelhouse"))
  assert pip[:4] == ["python3", "-m", "pip", "download"]
  for flag in ("--only-binary=:all:", "--python-version=3.11", "--implementation=cp",
               "--platform=manylinux_2_17_x86_64", "--platform=manylinux_2_35_x86_64",
               "-r", "requirements.txt", "jax[tpu]==0.10.2"):
    assert flag in pip, (flag, pip)
  wheels = next(a for a in pip if a.startswith("--dest="))[len("--dest="):]
  assert uv[-4:] == ["uv", "python", "install", "3.11"]
  assert tar[:2] == ["tar", "-czf"] and tar[2].endswith("/python.tar.gz")
  assert cp[:4] == ["gcloud", "storage", "cp", "-r"]
  assert cp[4:] == [wheels, tar[2], "gs://b/wheelhouse/"]
  bad = _tpu("wheelhouse", "/local/dir")
  assert bad.returncode == 2 and "gs://" in bad.stderr


def test_tpu_pod_run_refuses_a_local_workdir():
  proc = _tpu("run", "configs/simclr_mnist.py", "/tmp/run")
  assert proc.returncode == 2 and "gs://" in proc.stderr


def test_tpu_pod_run_is_detached_quoted_and_stoppable(tmp_path):
  """Runs the remote commands of `run`, `status`, `stop` and `logs` on this machine."""
  home = tmp_path / "home"
  (home / "contrastive_jax").mkdir(parents=True)
  (home / "contrastive_jax_venv" / "bin").mkdir(parents=True)
  # The fake trainer records its argv, then waits; SIGTERM makes it write a marker and exit 0.
  _write_exe(home / "contrastive_jax_venv" / "bin" / "python", f"""#!/usr/bin/env bash
printf '%s\\n' "$PWD" "$@" > {home}/argv
trap 'echo saved > {home}/got_term; echo "saved a checkpoint"; exit 0' TERM
echo training
for i in $(seq 300); do sleep 0.1; done
""")
  # The workers' gcloud, standing in for `gcloud storage cp SRC gs://b/...` with a local bucket.
  bucket = tmp_path / "bucket"
  (home / "bin").mkdir()
  _write_exe(home / "bin" / "gcloud", f"""#!/usr/bin/env bash
[ "$1 $2 $3" = "storage cp --quiet" ] || exit 64
dst={bucket}/${{5#gs://}}; mkdir -p "$(dirname "$dst")"; cp "$4" "$dst.tmp" && mv "$dst.tmp" "$dst"
""")
  flags = ["--config.note=two words", "--config.quote=it's", "--config.glob=*"]
  (ssh,) = _printed(_tpu("run", "configs/simclr_mnist.py:quick", "gs://b/run", *flags,
                         LOG_SYNC_S="0.2"))
  env = dict(os.environ, HOME=str(home), PATH=f"{home / 'bin'}:{os.environ['PATH']}")
  copied = bucket / "b" / "run" / "worker_logs" / f"{socket.gethostname()}.log"

  def wait_for(condition):
    for _ in range(300):  # a bound, not a timing: each check is immediate
      if condition():
        return True
      time.sleep(0.1)
    return False
  sh = lambda remote: subprocess.run(["bash", "-c", remote], env=env, capture_output=True,
                                     text=True, timeout=30)
  t0 = time.time()
  started = sh(_remote(ssh))
  assert started.returncode == 0, started.stderr
  assert time.time() - t0 < 10  # returned at once: the job runs on without the ssh session
  assert "started pid" in started.stdout
  pid = int((home / "contrastive_jax_logs" / "run.pid").read_text())
  try:
    for _ in range(100):
      if (home / "argv").exists():
        break
      time.sleep(0.1)
    argv = (home / "argv").read_text().splitlines()
    assert argv == [str(home / "contrastive_jax"), "-m", "contrastive_jax.main", "--multihost",
                    "--config=configs/simclr_mnist.py:quick", "--workdir=gs://b/run", *flags]
    assert os.getsid(pid) == pid  # its own session: a closed ssh connection does not hang it up
    # The log reaches the bucket while the job runs (a preempted worker's disk is gone).
    assert wait_for(lambda: copied.exists() and "training" in copied.read_text())

    again = sh(_remote(_printed(_tpu("run", "configs/simclr_mnist.py", "gs://b/run"))[0]))
    assert again.returncode == 3 and "already running" in again.stderr

    (status,) = _printed(_tpu("status"))
    assert "running (pid" in sh(_remote(status)).stdout
    (logs,) = _printed(_tpu("logs", "5"))
    assert "training" in sh(_remote(logs)).stdout
    (stop,) = _printed(_tpu("stop"))
    assert "sent SIGTERM" in sh(_remote(stop)).stdout
    for _ in range(100):
      if (home / "got_term").exists():
        break
      time.sleep(0.1)
    assert (home / "got_term").read_text().strip() == "saved"
    # ... and once more after it ended, with its last lines.
    assert wait_for(lambda: "saved a checkpoint" in copied.read_text()), copied.read_text()
    time.sleep(0.3)
    assert "not running" in sh(_remote(status)).stdout
  finally:
    try:
      os.kill(pid, 9)
    except ProcessLookupError:
      pass


# ----------------------------------------------------------------------------- SLURM


def _slurm_script(tmp_path, workdir, *flags, **env):
  full = dict(os.environ, DRY_RUN="1", LOG_DIR=str(tmp_path / "logs"), **env)
  proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm.sh"),
                         "configs/simclr_mnist.py:quick", str(workdir), *flags],
                        env=full, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  return proc.stdout


def test_slurm_batch_script_directives(tmp_path):
  script = _slurm_script(tmp_path, "/shared/run", "--config.note=a b", NODES="4",
                         GPUS_PER_NODE="8", PARTITION="gpu", TIME="2:00:00")
  directives = re.findall(r"^#SBATCH (\S+)$", script, re.M)
  for d in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--time=2:00:00",
            "--requeue", "--signal=TERM@300", "--partition=gpu"):
    assert d in directives, (d, directives)
  assert not any(d.startswith("--account") for d in directives)
  assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in script
  (srun,) = [shlex.split(line) for line in script.splitlines() if line.startswith("srun ")]
  assert srun[-1] == "&"  # in the background, so that the shell's SIGTERM trap runs at once
  # SLURM >= 22.05: srun does not inherit sbatch's --cpus-per-task; it is passed explicitly.
  assert "--cpus-per-task=${SLURM_CPUS_PER_TASK:-32}" in srun[:srun.index("-m")]
  assert srun[srun.index("-m") + 1:-1] == [
      "contrastive_jax.main", "--multihost", "--config=configs/simclr_mnist.py:quick",
      "--workdir=/shared/run", "--config.note=a b"]
  assert "#SBATCH --signal=TERM@90" in _slurm_script(tmp_path, "/r", SIGNAL_S="90")
  bad = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm.sh"), "c.py", "/r"],
                       env=dict(os.environ, DRY_RUN="1", SIGNAL_S="2m"), capture_output=True,
                       text=True, timeout=60)
  assert bad.returncode == 2 and "SIGNAL_S=2m must be whole seconds" in bad.stderr


_FAKE_SRUN = """#!{python}
# Stands in for srun on one machine: one process per task, SLURM's variables set as on a node;
# records its options in $FAKE_SRUN_OPTS and, like srun, forwards SIGTERM to the tasks.
import os, signal, subprocess, sys
args = sys.argv[1:]
opts = []
while args[0].startswith("--"):
  opts.append(args.pop(0))
with open(os.environ.get("FAKE_SRUN_OPTS", os.devnull), "a") as f:
  f.write(" ".join(opts) + "\\n")
log = dict(o[2:].split("=", 1) for o in opts if "=" in o)["output"]
procs = []
signal.signal(signal.SIGTERM, lambda *_: [p.send_signal(signal.SIGTERM) for p in procs])
for i in range(int(os.environ["SLURM_NTASKS"])):
  env = dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID="0", SLURM_NODEID=str(i))
  path = log.replace("%x", "job").replace("%j", os.environ["SLURM_JOB_ID"]).replace("%n", str(i))
  procs.append(subprocess.Popen(args, env=env, stdout=open(path, "a"), stderr=subprocess.STDOUT))
codes = [p.wait(timeout=400) for p in procs]
sys.exit(max(codes))
"""


def _fake_slurm(tmp_path):
  """A bin directory with the stand-in srun and an scontrol that records its arguments."""
  bindir = tmp_path / "bin"
  bindir.mkdir()
  (tmp_path / "logs").mkdir()
  _write_exe(bindir / "srun", _FAKE_SRUN.format(python=sys.executable))
  _write_exe(bindir / "scontrol", f"#!/usr/bin/env bash\necho \"$@\" >> {tmp_path}/scontrol\n")
  return bindir


def test_slurm_preemption_sigterm_saves_then_requeues(tmp_path):
  """Preemption as SLURM does it: SIGTERM to every process of the job, the batch shell included.
  The shell must outlive the trainer's save (here a stand-in that takes 1 s to "save" and exits
  0), then requeue. srun gets the job's CPUs per task. (The old script's shell died of the
  SIGTERM at once, exit 143, and never requeued; its srun had no --cpus-per-task.)"""
  bindir = _fake_slurm(tmp_path)
  trainer = tmp_path / "python"
  _write_exe(trainer, f"""#!/usr/bin/env bash
[ "$1" = -c ] && exec {sys.executable} "$@"   # the script's summary.json check
trap 'sleep 1; echo saved >> {tmp_path}/saved_$SLURM_PROCID; exit 0' TERM
touch {tmp_path}/ready_$SLURM_PROCID
for i in $(seq 600); do sleep 0.1; done
exit 9
""")
  script = _slurm_script(tmp_path, tmp_path / "run", GPUS_PER_NODE="2", PYTHON=str(trainer))
  env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", SLURM_JOB_ID="4242",
             SLURM_NTASKS="2", SLURM_CPUS_PER_TASK="32",
             FAKE_SRUN_OPTS=str(tmp_path / "srun_opts"))
  job = subprocess.Popen(["bash", "-c", script], env=env, cwd=tmp_path, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True)
  try:
    for _ in range(300):
      if all((tmp_path / f"ready_{i}").exists() for i in range(2)):
        break
      time.sleep(0.1)
    os.killpg(job.pid, signal.SIGTERM)  # the batch shell, srun and the tasks, as SLURM does
    out, _ = job.communicate(timeout=60)
  finally:
    if job.poll() is None:
      os.killpg(job.pid, signal.SIGKILL)
  assert job.returncode == 0, out
  for i in range(2):  # every task saved (once per SIGTERM it got) before the shell moved on
    assert "saved" in (tmp_path / f"saved_{i}").read_text(), out
  assert "SIGTERM (preemption or scancel)" in out and "requeueing job 4242" in out
  assert (tmp_path / "scontrol").read_text().split() == ["requeue", "4242"]
  assert "--cpus-per-task=32" in (tmp_path / "srun_opts").read_text().split()


def _free_slurm_job_id() -> int:
  """A job id whose derived coordinator port (jax: 61440 + id % 4096) is free on loopback."""
  for job_id in range(4096, 8192):
    port = job_id % 4096 + 61440
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", port))
      except OSError:
        continue
      return job_id
  pytest.skip("no free port in jax's SLURM coordinator range")


@pytest.mark.slow
def test_slurm_job_runs_two_nodes_requeues_and_resumes(tmp_path):
  """The batch script, run as SLURM would: 2 'nodes' x 2 CPU devices on loopback, jax's SLURM
  auto-detection; a stop at step 2 requeues the job, the requeued job resumes and finishes."""
  workdir = tmp_path / "run"
  bindir = _fake_slurm(tmp_path)
  flags = ["--cpu_collectives=gloo", "--config.eval.enabled=False",
           "--config.data.image_size=16", "--config.log_every=1", "--config.total_steps=3",
           "--config.checkpoint.async_save=False"]
  job_id = _free_slurm_job_id()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(PATH=f"{bindir}:{env['PATH']}", SLURM_JOB_ID=str(job_id), SLURM_NTASKS="2",
             SLURM_STEP_NODELIST="127.0.0.1", JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")

  def run(*extra):
    script = _slurm_script(tmp_path, workdir, *flags, *extra, GPUS_PER_NODE="2",
                           PYTHON=sys.executable)
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                          timeout=500, cwd=tmp_path)

  logs = lambda: [(tmp_path / "logs" / f"job-{job_id}-node{i}.log").read_text()
                  for i in range(2)]
  first = run("--config.stop_at_step=2")
  assert first.returncode == 0, first.stdout + first.stderr + "\n".join(logs())
  assert "requeueing" in first.stdout
  assert (tmp_path / "scontrol").read_text().split() == ["requeue", str(job_id)]
  assert not (workdir / "summary.json").exists()

  second = run()  # the requeued job: same command, resumes from the step-2 checkpoint
  assert second.returncode == 0, second.stdout + second.stderr + "\n".join(logs())
  assert "requeueing" not in second.stdout
  assert (tmp_path / "scontrol").read_text().split() == ["requeue", str(job_id)]
  summary = json.loads((workdir / "summary.json").read_text())
  assert [h["step"] for h in summary["train_history"]] == [3]
  for log in logs():
    assert "process 0 of 2" in log or "process 1 of 2" in log, log[-3000:]
    assert "4 global devices" in log, log[-3000:]
    assert "resumed from checkpoint step 2" in log, log[-3000:]
  losses = [re.findall(r"step (\d+): .*?\bloss=([-\d.e+]+)", log) for log in logs()]
  assert losses[0] == losses[1] and [s for s, _ in losses[0]] == ["1", "2", "3"]


# ----------------------------------------------------------------------------- local pod


def test_local_multiprocess_returns_as_soon_as_any_process_fails(tmp_path):
  """Process 1 fails at once while process 0 would run for 300 s: the launcher stops process 0
  and exits with process 1's code (the old launcher waited for process 0 first)."""
  stand_in = tmp_path / "python"
  _write_exe(stand_in, f"""#!/usr/bin/env bash
case " $* " in
  *" --process_id=1 "*)  # fails once process 0 runs
    for i in $(seq 100); do [ -f {tmp_path}/process_0.pid ] && break; sleep 0.1; done
    echo "bad config" >&2; exit 3 ;;
  *) echo $$ > {tmp_path}/process_0.pid; exec sleep 300 ;;
esac
""")
  env = dict(os.environ, PYTHON=str(stand_in), PORT="1", GRACE_S="5")
  proc = subprocess.run(
      ["bash", os.path.join(ROOT, "launch", "local_multiprocess.sh"), "2", "1",
       str(tmp_path / "run"), "configs/simclr_mnist.py:quick"],
      env=env, capture_output=True, text=True, timeout=120)  # bound: far below process 0's 300 s
  assert proc.returncode == 3, proc.stdout + proc.stderr
  assert "process 1 exited with code 3" in proc.stderr
  assert "bad config" in proc.stdout  # the tails of the logs are still printed
  pid = int((tmp_path / "process_0.pid").read_text())
  with pytest.raises(ProcessLookupError):  # process 0 was stopped and reaped, not left behind
    os.kill(pid, 0)
