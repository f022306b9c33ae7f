"""Every file of a run goes through etils.epath / tf.io.gfile, so a ``gs://`` workdir works.

The run here trains, stops with a checkpoint, resumes, evaluates, and is evaluated again by
``python -m contrastive_jax.evaluate``, all with ``--workdir=ram://...``: TensorFlow's in-memory
filesystem (``tf.io.gfile`` and TensorFlow's C++ file writers, the TensorBoard event writer
among them, reach it like ``gs://``; nothing about it touches the local disk). etils.epath knows
only ``gs://``, ``s3://``, ``az://`` and ``hf://``; ``RamPath`` below teaches it ``ram://``
through its documented extension point, ``epath.register_path_cls``, with its
TensorFlow backend (the backend epath uses for ``gs://`` when TensorFlow is installed).
A writer that used the built-in ``open``/``os.makedirs`` would either fail (the guards below)
or create a local folder such as ``./ram:/...`` (the empty working directory checked after).

Checkpoints are the one exception: orbax writes arrays through TensorStore, whose kvstore
drivers are ``file``, ``gcs``/``gcs_grpc``, ``s3``, ``memory`` and others, none of which reaches
TensorFlow's filesystems; orbax picks ``gcs`` for ``gs://`` and ``file`` for anything else and
rejects ``ram://`` as "Checkpoint path should be absolute"
(``orbax/checkpoint/_src/serialization/tensorstore_utils.py``). So this test moves
``checkpoint.checkpoint_directory`` to a local folder; on ``gs://`` orbax's own GCS support
writes the checkpoints.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import sys
import uuid

import pytest
import tensorflow as tf
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath

from contrastive_jax import checkpoint, train
from contrastive_jax.evaluate import __main__ as evaluate_cli

from test_train import tiny_config

RAM = "ram://"


@epath.register_path_cls(RAM)
class RamPath(gpath.PosixGPath):
  """``ram://a/b`` for epath: kept as the parts ``("/", "ram", "a", "b")`` (the layout epath
  uses for ``gs://``), printed back as ``ram://a/b`` and served by epath's TensorFlow backend."""

  if sys.version_info < (3, 12):
    def __new__(cls, *parts):
      return super().__new__(cls, *_ram_parts(parts))
  else:
    def __init__(self, *parts):
      super().__init__(*_ram_parts(parts))

  @property
  def _uri_scheme(self):
    return "ram" if self.parts[:2] == ("/", "ram") else None

  @property
  def _backend(self):
    return epath_backend.tf_backend

  def open(self, mode="r", **kwargs):
    # TensorFlow's RamFileSystem appends when it opens an existing file for writing (local
    # files and gs:// objects are replaced): remove it first, so a rewrite replaces as there.
    if "w" in mode and self.exists():
      self.unlink()
    return super().open(mode, **kwargs)


def _ram_parts(parts):
  full = "/".join(os.fspath(p) for p in parts)
  return ("/ram/" + full[len(RAM):],) if full.startswith(RAM) else parts


def test_ram_path_round_trip():
  p = epath.Path(f"{RAM}ramfs_{uuid.uuid4().hex[:8]}") / "a" / "b.txt"
  assert isinstance(p, RamPath) and str(p).startswith(RAM) and str(p.parent).endswith("/a")
  p.parent.mkdir(parents=True, exist_ok=True)
  p.write_text("ok")
  assert tf.io.gfile.GFile(str(p)).read() == "ok" and p.read_text() == "ok"
  p.write_text("x")                                # a rewrite replaces, as on gs://
  assert p.read_text() == "x"


@pytest.fixture
def no_local_writes(monkeypatch):
  """Makes the built-in file functions refuse any path that contains ``marker``."""
  marker = f"ramrun_{uuid.uuid4().hex[:10]}"

  def guard(fn):
    def guarded(path, *args, **kwargs):
      if isinstance(path, (str, bytes, os.PathLike)) and marker in os.fsdecode(path):
        raise AssertionError(f"{fn.__name__}({os.fsdecode(path)!r}) bypasses epath/gfile")
      return fn(path, *args, **kwargs)
    return guarded

  monkeypatch.setattr(builtins, "open", guard(builtins.open))
  monkeypatch.setattr(io, "open", guard(io.open))
  for name in ("open", "makedirs", "mkdir", "rename", "replace", "remove", "listdir"):
    monkeypatch.setattr(os, name, guard(getattr(os, name)))
  return marker


def test_run_and_cli_evaluation_write_only_through_epath(tmp_path, monkeypatch, no_local_writes):
  marker = no_local_writes
  workdir = f"{RAM}{marker}/run"
  local_checkpoints = tmp_path / "checkpoints"     # see the module docstring: orbax's arrays
  monkeypatch.setattr(checkpoint, "checkpoint_directory",
                      lambda w: epath.Path(local_checkpoints))
  cwd = tmp_path / "cwd"                           # a relative local write would land here
  cwd.mkdir()
  monkeypatch.chdir(cwd)

  c = tiny_config(total_steps=2, stop_at_step=1, **{
      "eval.enabled": True, "eval.batch_size": 64, "eval.embedding_plot": "pca"})
  c.eval.evaluators = {"knn": {"type": "knn", "k": 5}}
  first = train.train_and_evaluate(c, workdir)
  assert first.stopped_at_step == 1
  c.stop_at_step = None
  result = train.train_and_evaluate(c, workdir)     # resumes from the step-1 checkpoint
  assert result.finished and result.train_history[0]["step"] == 2

  # The standalone evaluator's command line, in-process, on the same workdir.
  assert evaluate_cli.main(["--workdir", workdir, "--eval", "knn",
                            "--embedding_plot", "pca"]) == 0

  run = epath.Path(workdir)
  summary = json.loads((run / "summary.json").read_text())
  assert summary["steps"] == 2 and "knn/top1" in summary["eval"]
  config = json.loads((run / "config.json").read_text())  # rewritten by the resumed start
  assert config["total_steps"] == 2 and config["stop_at_step"] is None
  assert json.loads((run / "eval" / "step_2.json").read_text())["results"] == summary["eval"]
  cli = json.loads((run / "eval_knn.json").read_text())
  assert cli["step"] == 2 and cli["workdir"] == workdir
  assert cli["results"]["knn/top1"] == pytest.approx(summary["eval"]["knn/top1"])
  for png in ("embeddings.png", "embeddings_pca.png"):
    assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  events = [n for n in tf.io.gfile.listdir(workdir) if n.startswith("events.out.tfevents")]
  assert events, tf.io.gfile.listdir(workdir)      # clu's TensorBoard writer (tf.io.gfile)
  assert sorted(p.name for p in local_checkpoints.iterdir()) == ["1", "2"]

  # Nothing reached the local disk under a name derived from the workdir.
  assert not os.path.lexists("/ram")
  assert list(cwd.iterdir()) == []
  for root in {str(tmp_path), "/tmp"}:
    for name in os.scandir(root):
      assert marker not in name.name and not name.name.startswith("ram:"), name.path


def test_sweep_files_go_through_epath(tmp_path, monkeypatch, no_local_writes):
  """launch/sweep.py's own files (failure traceback, wall-clock total, the summary it reads)."""
  from test_tools import CONFIG, _launch
  sweep = _launch("sweep")
  monkeypatch.chdir(tmp_path)
  point = f"{RAM}{no_local_writes}/sweep/point"
  failed = sweep.run_to_completion(CONFIG, ["global_batch=7"], point, log=lambda *_: None)
  assert failed["status"].startswith("failed: ConfigError") and failed["seconds"] >= 0
  assert "global_batch" in (epath.Path(point) / sweep.FAILURE_FILE).read_text()
  (epath.Path(point) / "summary.json").write_text(json.dumps({"steps": 4}))
  done = sweep.run_to_completion(CONFIG, [], point, log=lambda *_: None)
  assert done == {"summary": {"steps": 4}, "status": "skipped", "seconds": failed["seconds"]}
  assert list(tmp_path.iterdir()) == []


def test_results_table_writes_through_epath(tmp_path, monkeypatch, no_local_writes):
  """launch/results_table.py writes its markdown through epath (a config name without a file
  is skipped with a note, so nothing trains)."""
  from test_tools import _launch
  table = _launch("results_table")
  monkeypatch.chdir(tmp_path)
  out = f"{RAM}{no_local_writes}/results/results.md"
  result = table.make_table(out, ["no_such_config"], workdir=f"{RAM}{no_local_writes}/runs",
                            log=lambda *_: None)
  assert result["entries"] == [] and "no_such_config" in epath.Path(out).read_text()
  assert list(tmp_path.iterdir()) == []
