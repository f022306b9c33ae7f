"""The run tools: standalone evaluator, embedding plot, sweep, augmentation preview.

Tiny budgets: SimCLR ``:quick`` at 16 px, 2 steps, evaluation batch 64.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from contrastive_jax.configs import simclr_mnist
from contrastive_jax import restore, train
from contrastive_jax.evaluate import __main__ as evaluator
from contrastive_jax.evaluate import plots

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "simclr_mnist.py") + ":quick"
TINY = ["data.image_size=16", "eval.batch_size=64", "total_steps=2", "log_every=1",
        "checkpoint.async_save=False"]


def _launch(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "launch", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# ----------------------------------------------------------------------------- small pieces


def test_config_from_json_turns_lists_into_tuples():
  c = restore.config_from_json({"model": {"kwargs": {"widths": [16, [2, 3]]}},
                                "eval": {"evaluators": {"few": {"type": "few_label",
                                                                "shots": [10]}}}, "x": None})
  assert c.model.kwargs.widths == (16, (2, 3))
  assert c.eval.evaluators.few.shots == (10,)
  assert c.x is None


def test_overrides_and_grid():
  c = simclr_mnist.get_config("quick")
  restore.apply_overrides(c, ["loss.temperature=1", "data.augment.crop_area=(0.5,1.0)"])
  assert c.loss.temperature == 1.0 and isinstance(c.loss.temperature, float)
  assert c.data.augment.crop_area == (0.5, 1.0)
  with pytest.raises(ValueError, match="los.temperature"):
    restore.apply_overrides(c, ["los.temperature=0.1"])
  sweep = _launch("sweep")
  assert sweep.split_top_level("(0.08,1.0),(0.2,1.0)") == ["(0.08,1.0)", "(0.2,1.0)"]
  points = sweep.grid([("a", ["1", "2"]), ("b", ["x", "y", "z"])])
  assert len(points) == 6
  assert points[0] == [("a", "1"), ("b", "x")] and points[3] == [("a", "2"), ("b", "x")]


def test_pca_projection_matches_numpy_svd():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(50, 6)) * np.array([5.0, 1.0, 0.5, 0.2, 0.1, 0.05])
  got = plots.project_2d(x, "pca")
  z = (x - x.mean(0)) / x.std(0)
  _, _, vt = np.linalg.svd(z, full_matrices=False)
  want = z @ vt[:2].T
  np.testing.assert_allclose(np.abs(got), np.abs(want), rtol=1e-6, atol=1e-8)


def test_save_embedding_plot_writes_png(tmp_path):
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(4), 20)
  feats = rng.normal(size=(80, 8)) + labels[:, None]
  path = plots.save_embedding_plot(feats, labels, tmp_path / "emb.png", method="pca",
                                   title="test")
  with Image.open(path) as img:
    assert img.format == "PNG" and img.size == (700, 600)  # 7 x 6 inches at 100 dpi


def test_preview_writes_png_of_expected_size(tmp_path):
  preview = _launch("preview_augmentations")
  out = preview.make_preview("simclr", 0.5, str(tmp_path / "p.png"), image_size=16, num=2)
  with Image.open(out) as img:
    # 3 columns x 1.5 in; 2 rows x 1.5 in + 0.7 in header; 100 dpi.
    assert img.size == (450, 370)
    pixels = np.asarray(img.convert("L"), np.float32)
  assert pixels.std() > 10  # not a blank canvas


# ----------------------------------------------------------------------------- sweep


def test_sweep_two_points_table_plot_and_resume(tmp_path):
  sweep = _launch("sweep")
  args = ["--config", CONFIG, "--sweep=loss.temperature=0.1,0.5", "--workdir", str(tmp_path),
          "--metric=train/loss", "--set", "eval.enabled=False", "num_devices=1", *TINY]
  assert sweep.main(args) == 0
  table = (tmp_path / "sweep.md").read_text()
  rows = [line for line in table.splitlines() if re.match(r"\| 0\.\d", line)]
  assert len(rows) == 2
  summaries = {}
  for t in ("0.1", "0.5"):
    summary = json.loads((tmp_path / f"loss.temperature={t}" / "summary.json").read_text())
    # The swept value reached the run (SimCLR logs its temperature) ...
    assert summary["final_train"]["temperature"] == pytest.approx(float(t))
    summaries[t] = summary
    # ... and the table reports that run's final loss.
    row = next(r for r in rows if r.startswith(f"| {t} "))
    assert f"{summary['final_train']['loss']:.4f}" in row
  with Image.open(tmp_path / "sweep.png") as img:
    assert img.size == (600, 400)

  mtimes = {t: os.path.getmtime(tmp_path / f"loss.temperature={t}" / "summary.json")
            for t in summaries}
  result = sweep.run_sweep(CONFIG, ["loss.temperature=0.1,0.5"], str(tmp_path),
                           metric="train/loss",
                           overrides=["eval.enabled=False", "num_devices=1", *TINY])
  assert [r["status"] for r in result["rows"]] == ["skipped", "skipped"]
  assert mtimes == {t: os.path.getmtime(tmp_path / f"loss.temperature={t}" / "summary.json")
                    for t in summaries}


# ----------------------------------------------------------------------------- evaluator


def test_standalone_evaluator_matches_trainer(tmp_path):
  config = restore.apply_overrides(simclr_mnist.get_config("quick"), TINY)
  # The default evaluators, the few-label probe without shots (cheap).
  config.eval.evaluators = {"knn": dict(type="knn"), "linear": dict(type="linear_probe"),
                            "few": dict(type="few_label", shots=())}
  summary = train.train_and_evaluate(config, str(tmp_path)).summary
  assert evaluator.main(["--workdir", str(tmp_path), "--eval=knn"]) == 0
  report = json.loads((tmp_path / "eval_knn.json").read_text())
  assert report["step"] == 2
  assert set(report["results"]) == {"knn/top1", "knn/top5", "knn/k"}
  np.testing.assert_allclose(report["results"]["knn/top1"], summary["eval"]["knn/top1"],
                             rtol=0, atol=1e-7)
  np.testing.assert_allclose(report["results"]["knn/top5"], summary["eval"]["knn/top5"],
                             rtol=0, atol=1e-7)


def test_sweep_report_with_two_keys(tmp_path):
  """Table and plot of a 2 x 2 grid from hand-written summaries (no training)."""
  sweep = _launch("sweep")
  knn = {("0.1", "a"): 0.5, ("0.1", "b"): 0.7, ("0.5", "a"): 0.9, ("0.5", "b"): None}
  rows = []
  for point in sweep.grid([("loss.temperature", ["0.1", "0.5"]), ("data.recipe", ["a", "b"])]):
    value = knn[tuple(v for _, v in point)]
    summary = None if value is None else {"eval": {"knn/top1": value}, "steps": 3,
                                          "final_train": {"loss": 1.0}}
    rows.append({"point": point, "summary": summary, "seconds": 1.0,
                 "status": "done" if summary else "failed: FloatingPointError: nan"})
  table = sweep.sweep_table(rows, ["loss.temperature", "data.recipe"], "eval/knn/top1")
  lines = table.splitlines()[2:]
  assert len(lines) == 4
  assert "**0.9000**" in lines[2] and lines[2].startswith("| 0.5 | a |")
  assert "**" not in lines[0] + lines[1] and "failed" in lines[3]
  path = sweep.sweep_plot(rows, ["loss.temperature", "data.recipe"], "eval/knn/top1",
                          str(tmp_path / "s.png"), "t")
  with Image.open(path) as img:
    assert img.size == (600, 400)
