"""The TPU-pod code path on one machine: 2 processes x 2 CPU devices, gloo collectives."""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax import losses
from contrastive_jax.tools import local_pod

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 240


def run_processes(argv_for, n, timeout=TIMEOUT_S):
  """Starts n processes ``argv_for(i, coordinator_port)`` (each sets its own devices), waits
  at most ``timeout`` s, kills all on failure; returns their outputs."""
  with local_pod.LocalPod(argv_for, n, devices=None) as pod:
    rcs = pod.wait(timeout)
    outputs = pod.logs()
  for rc, out in zip(rcs, outputs):
    assert rc == 0, f"process failed (rc={rc}):\n{out[-4000:]}"
  return outputs


def test_two_processes_match_single_process_loss_and_grads(tmp_path):
  rng = np.random.default_rng(0)
  a = rng.normal(size=(8, 16)).astype(np.float32)
  b = (a + rng.normal(size=(8, 16))).astype(np.float32)
  queue = rng.normal(size=(32, 16))
  queue = (queue / np.linalg.norm(queue, axis=1, keepdims=True)).astype(np.float32)
  groups = np.array([0, 1, 0, 2, 1, 0, -1, 2], np.int32)
  np.savez(tmp_path / "inputs.npz", a=a, b=b, queue=queue, groups=groups)
  out = tmp_path / "out.npz"
  worker = os.path.join(HERE, "multihost_loss_worker.py")
  run_processes(lambda i, port: [sys.executable, worker, str(i), "2", str(port), str(out)], 2)
  got = np.load(out)
  assert int(got["sum_over_processes"]) == 3  # distributed.sum_over_processes
  cases = {
      "nt_xent": lambda x, y: losses.nt_xent(x, y, 0.1),
      "clip": lambda x, y: losses.clip_loss(x, y, 14.3),
      "moco": lambda x, y: losses.moco_loss(x, y, jnp.asarray(queue), 0.2),
      "moco_v3": lambda x, y: losses.moco_v3_loss(x, y, 0.2),
      "siglip": lambda x, y: losses.siglip_loss(x, y, 10.0, -10.0),
      # Negative options and group ids: against the single-process all-gather form.
      "nt_xent_hard": lambda x, y: losses.nt_xent(
          x, y, 0.1, options=losses.NegativeOptions(debias_tau_plus=0.1, hard_beta=1.0)),
      "nt_xent_supcon_ring": lambda x, y: losses.nt_xent(
          x, y, 0.1, groups=jnp.asarray(groups),
          options=losses.NegativeOptions(multi_positive=True)),
      "clip_multi_ring": lambda x, y: losses.clip_loss(
          x, y, 14.3, groups=jnp.asarray(groups),
          options=losses.NegativeOptions(multi_positive=True)),
  }
  for name, fn in cases.items():
    value, (da, db) = jax.value_and_grad(fn, argnums=(0, 1))(a, b)
    np.testing.assert_allclose(got[f"{name}/loss"], float(value), rtol=1e-5, err_msg=name)
    for key, want in (("da", da), ("db", db)):
      want = np.asarray(want)
      np.testing.assert_allclose(got[f"{name}/{key}"], want, rtol=1e-5,
                                 atol=1e-6 * max(np.abs(want).max(), 1e-12),
                                 err_msg=f"{name} {key}")


@pytest.fixture(scope="module")
def two_host_restores(tmp_path_factory):
  """One 2-process launch restores two runs, each from one copy per process (hosts whose
  views of a shared filesystem differ) of the same checkpoints, steps 1 and 2:

  * ``damaged``: in process 1's view, step 2's state metadata is garbage;
  * ``lagging``: process 1's listing lacks step 2 (a newly committed step that a shared or
    object-store filesystem does not list everywhere yet); process 0 sees it intact.
  """
  import json
  import shutil

  from contrastive_jax import checkpoint, distributed

  root = tmp_path_factory.mktemp("two_host_restores")
  base = root / "base"
  mesh = distributed.make_mesh()
  with checkpoint.Checkpointer(base, async_save=False) as ckpt:
    for step in (1, 2):
      w = jax.device_put(jnp.full((4,), float(step)), distributed.replicated(mesh))
      ckpt.save(step, {"w": w}, data_state={"step": step}, config={"step": step})
  scenarios = ("damaged", "lagging")
  for scenario in scenarios:
    for i in range(2):
      shutil.copytree(base, root / scenario / f"host{i}")
  (root / "damaged" / "host1" / "checkpoints" / "2" / "state" / "_METADATA").write_text("{garbage")
  shutil.rmtree(root / "lagging" / "host1" / "checkpoints" / "2")

  worker = os.path.join(HERE, "multihost_restore_worker.py")
  outs = [root / f"out{i}.json" for i in range(2)]
  run_processes(lambda i, port: [sys.executable, worker, str(i), "2", str(port), str(outs[i])] +
                [str(root / scenario / f"host{i}") for scenario in scenarios], 2, timeout=120)
  results = [json.loads(o.read_text()) for o in outs]
  return {scenario: {"views": [root / scenario / f"host{i}" for i in range(2)],
                     "results": [r[str(root / scenario / f"host{i}")]
                                 for i, r in enumerate(results)]}
          for scenario in scenarios}


def test_processes_agree_on_the_restore_step_when_one_sees_damage(two_host_restores):
  """Two hosts restore the same step when only one of them sees the newest step damaged:
  both restore step 1; restoring independently, process 0 would take step 2 and process 1
  step 1."""
  run = two_host_restores["damaged"]
  for r in run["results"]:
    assert (r["step"], r["data_step"], r["w"], r["damaged"]) == (1, 1, [1.0] * 4, [2]), run
  # Process 0 moved the step that process 1 saw damaged aside, in its own view too.
  host0 = run["views"][0] / "checkpoints"
  assert (host0 / "damaged" / "2").exists() and not (host0 / "2").exists()


def test_processes_agree_on_an_older_step_when_one_does_not_list_the_newest(two_host_restores):
  """A step that one host does not list yet is not restored by any host, and it is not
  damaged: both restore step 1, nothing is moved aside and step 2 stays where it is. Taking
  the union of the hosts' listings instead of their intersection fails here: process 1
  cannot read step 2, so process 0 would move the good step 2 into ``damaged/``."""
  run = two_host_restores["lagging"]
  for r in run["results"]:
    assert (r["step"], r["data_step"], r["w"], r["damaged"]) == (1, 1, [1.0] * 4, []), run
  host0 = run["views"][0] / "checkpoints"
  assert (host0 / "2" / "state" / "_METADATA").is_file()
  assert not (host0 / "damaged").exists()


def test_init_from_loads_shards_on_each_of_two_processes(tmp_path):
  """``init_from`` under FSDP over 2 processes x 2 devices, from a run directory (the pair's
  own checkpoint) and from a converted file: every local shard is bit-identical to the source,
  the arrays span both processes, and each process reads only its shards of sharded leaves."""
  import json

  from contrastive_jax import methods
  from contrastive_jax.convert import core

  sys.path.insert(0, HERE)
  import multihost_init_from_worker as worker  # pylint: disable=g-import-not-at-top
  c = worker.config()
  method = methods.build_method(c, jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",)))
  variables = method.model.init(jax.random.key(7), *method.example_inputs(), train=False)
  core.save_converted(str(tmp_path / "pretrained.safetensors"), {"kind": "clip"},
                      {k: np.asarray(v) for k, v in core.flatten(dict(variables)).items()})
  run_processes(lambda i, port: [sys.executable, worker.__file__, str(i), "2", str(port),
                                 str(tmp_path)], 2, timeout=2 * TIMEOUT_S)
  for i in range(2):
    out = json.loads((tmp_path / f"out_{i}.json").read_text())
    assert out["sharded"]
    for source in ("run", "file"):
      assert out[source]["mismatched"] == [], (i, source, out[source])
      assert set(out["sharded"]) <= set(out[source]["spread"])
    reads = {name: (size, full) for name, size, full in out["slices"]}
    assert set(out["sharded"]) <= set(reads)
    for name in out["sharded"]:  # 4 devices: each process reads its 2 quarters, never all
      size, full = reads[name]
      assert size * 4 == full, (name, size, full)
