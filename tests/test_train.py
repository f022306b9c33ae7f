"""The trainer end to end with SimCLR on tiny models: smoke, 1 vs 8 devices, exact resume."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from contrastive_jax.configs import simclr_mnist
from contrastive_jax import configs, train


def tiny_config(**overrides):
  c = simclr_mnist.get_config("quick")
  c.eval.enabled = False
  c.log_every = 1
  c.checkpoint.every_steps = 2
  c.checkpoint.async_save = False
  c.data.image_size = 16
  c.data.shuffle_buffer = 64
  return configs.apply_overrides(c, overrides)


def test_relative_workdir_saves_and_resumes(tmp_path, monkeypatch):
  """The quickstart passes a relative --workdir; orbax only accepts absolute paths."""
  monkeypatch.chdir(tmp_path)
  c = tiny_config(total_steps=2)
  train.train_and_evaluate(c, "runs/relative")
  assert sorted(os.listdir(tmp_path / "runs/relative/checkpoints")) == ["2"]
  c.total_steps = 3                    # resumes from step 2 through the same relative path
  assert train.train_and_evaluate(c, "runs/relative").summary["steps"] == 3


def _losses(summary):
  return [h["loss"] for h in summary["train_history"]]


def test_smoke_one_step_with_evaluation(tmp_path):
  c = tiny_config(total_steps=2, **{"eval.enabled": True, "eval.batch_size": 64})
  summary = train.train_and_evaluate(c, str(tmp_path)).summary
  assert np.isfinite(summary["final_train"]["loss"])
  assert 0.0 <= summary["eval"]["knn/top1"] <= 1.0
  assert "linear/top1" in summary["eval"]
  assert (tmp_path / "summary.json").exists()
  # One results JSON per evaluation (evaluate/runner.write_results), here the final one.
  final = json.loads((tmp_path / "eval" / "step_2.json").read_text())
  assert final["results"] == summary["eval"] and final["evaluators"] == ["knn", "linear", "few"]
  assert list((tmp_path / "checkpoints").iterdir())


def test_smoke_on_tfds_mock_data(tmp_path):
  c = tiny_config(total_steps=1)
  c.data.source = "tfds"
  c.data.name = "mnist"
  c.data.train_split = "train"
  with tfds.testing.mock_data(num_examples=64):
    summary = train.train_and_evaluate(c, str(tmp_path)).summary
  assert np.isfinite(summary["final_train"]["loss"])


def test_one_and_eight_devices_agree(tmp_path):
  runs = {}
  for n in (1, 8):
    c = tiny_config(total_steps=3, num_devices=n)
    runs[n] = train.train_and_evaluate(c, str(tmp_path / f"d{n}")).summary
  np.testing.assert_allclose(_losses(runs[8]), _losses(runs[1]), rtol=2e-5)
  np.testing.assert_allclose(
      [h["grad_norm"] for h in runs[8]["train_history"]],
      [h["grad_norm"] for h in runs[1]["train_history"]], rtol=1e-4)
  # The final parameters and BN statistics themselves, leaf by leaf.
  from contrastive_jax import restore
  states = [restore.restore_run(str(tmp_path / f"d{n}")).state for n in (1, 8)]
  for a, b in zip(jax.tree.leaves((states[0].params, states[0].batch_stats)),
                  jax.tree.leaves((states[1].params, states[1].batch_stats))):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_exact_resume_matches_uninterrupted_run(tmp_path):
  full = train.train_and_evaluate(tiny_config(total_steps=4), str(tmp_path / "full")).summary
  first = train.train_and_evaluate(tiny_config(total_steps=4, stop_at_step=2),
                                   str(tmp_path / "resumed"))
  assert first.stopped_at_step == 2 and first.summary is None
  second = train.train_and_evaluate(tiny_config(total_steps=4), str(tmp_path / "resumed")).summary
  resumed = [h["loss"] for h in first.train_history] + _losses(second)
  np.testing.assert_allclose(resumed, _losses(full), rtol=1e-6)
  assert [h["step"] for h in second["train_history"]] == [3, 4]
  from contrastive_jax import restore
  a, b = (restore.restore_run(str(tmp_path / name)).state for name in ("full", "resumed"))
  for x, y in zip(jax.tree.leaves((a.params, a.opt_state, a.batch_stats)),
                  jax.tree.leaves((b.params, b.opt_state, b.batch_stats))):
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


@pytest.mark.parametrize("name", ["simclr_mnist", "simclr_resnet18_cifar10",
                                  "simclr_resnet50_imagenet"])
@pytest.mark.parametrize("arg", [None, "quick"])
def test_configs_build_and_init_shape_only(name, arg):
  """Every SimCLR config builds its method and state (shapes only: nothing is compiled)."""
  import importlib
  import functools
  from contrastive_jax import distributed, methods, optim, runs
  config = importlib.import_module(f"contrastive_jax.configs.{name}").get_config(arg)
  mesh = distributed.make_mesh(8)
  method = methods.build_method(config, mesh)
  steps = runs.total_steps(config, 50_000)
  tx, _ = optim.build_optimizer(config.optim, global_batch=config.global_batch,
                                total_steps=steps)
  state = jax.eval_shape(functools.partial(method.init_state, tx=tx), jax.random.key(0))
  assert state.params and int(np.prod(state.step.shape)) == 1


def test_ring_loss_impl_trains_like_all_gather(tmp_path):
  runs = {impl: train.train_and_evaluate(tiny_config(total_steps=2, loss_impl=impl),
                                         str(tmp_path / impl)).summary
          for impl in ("all_gather", "ring")}
  np.testing.assert_allclose(_losses(runs["ring"]), _losses(runs["all_gather"]), rtol=1e-5)
  np.testing.assert_allclose(runs["ring"]["final_train"]["grad_norm"],
                             runs["all_gather"]["final_train"]["grad_norm"], rtol=1e-4)


def test_format_summary_names_the_runs_knn_k():
  summary = {"method": "simclr", "steps": 2, "train_seconds_this_run": 1.0,
             "eval": {"knn/top1": 0.5, "linear/top1": 0.6}}
  text = train.format_summary(summary, knn_k=20)
  assert "kNN (k=20) top-1" in text and "k=200" not in text
