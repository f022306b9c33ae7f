"""The one generic training loop: any method on the common surface, any mesh, any host count.

Read top to bottom: mesh, the run (``runs.build_run``: config checks, method and optimizer,
shape-first state with shardings, the jitted step), logging, checkpoint restore, input,
evaluators, the loop, the summary.
Evaluation is not here: the loop asks ``evaluate/runner.py``'s ``Runner`` (the evaluators the
config declares) which evaluators are due and runs them.
The method plugs in through ``methods/base.py``'s surface; nothing here branches on its name.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, metrics as clu_metrics, periodic_actions
from etils import epath

from contrastive_jax import checkpoint, distributed, runs
from contrastive_jax.convert import init as init_from
from contrastive_jax.errors import ConfigError, NonFiniteLossError
from contrastive_jax.data import pipeline
from contrastive_jax.evaluate import plots
from contrastive_jax.evaluate import runner as eval_runner


# ----------------------------------------------------------------------------- workdir


def check_workdir(workdir: epath.Path) -> None:
  """Creates ``workdir`` and proves it writable before any work starts."""
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write_test.{jax.process_index()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise ConfigError(
        f"--workdir={workdir} is not writable ({e.__class__.__name__}: {e}); pass a directory "
        "you can write to (local path or gs:// bucket) or fix its permissions / free space"
    ) from e


# ----------------------------------------------------------------------------- metrics


def metrics_collection(names):
  """A clu ``Collection`` averaging each named scalar over the steps between two logs."""
  return clu_metrics.Collection.create(
      **{name: clu_metrics.Average.from_output(name) for name in sorted(names)})


def check_finite(step: int, scalars: dict[str, float], since: int | None = None) -> None:
  """Raises ``NonFiniteLossError`` naming the step(s) and metric(s) that are NaN or inf."""
  bad = {k: v for k, v in scalars.items() if not np.isfinite(v)}
  if bad:
    where = f"step {step}" if since is None or since >= step - 1 else \
        f"steps {since + 1}..{step}"
    raise NonFiniteLossError(
        f"non-finite metric(s) in {where}: {bad}. No checkpoint of this state is written; "
        "lower the learning rate, raise the temperature or clip the gradient norm "
        "(--config.optim.grad_clip_norm=1.0), then restart: the run resumes from the last "
        "good checkpoint.")


# ----------------------------------------------------------------------------- main loop


@dataclasses.dataclass(frozen=True)
class RunResult:
  """What ``train_and_evaluate`` returns, whether the run finished or stopped early.

  Attributes:
    summary: the final summary (also written to ``workdir/summary.json``): ``method``,
      ``steps``, ``final_train``, ``train_history``, ``eval``, ...; None when the run stopped
      early.
    stopped_at_step: the step of the checkpoint saved on preemption or at
      ``config.stop_at_step``; None when the run finished.
    train_history: ``[{"step": s, <metric>: value, ...}]``, one entry per log step of this
      process's run (since its start or resume).
  """
  summary: dict[str, Any] | None
  stopped_at_step: int | None
  train_history: list[dict[str, float]]

  @property
  def finished(self) -> bool:
    return self.stopped_at_step is None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> RunResult:
  """Trains ``config.method`` in ``workdir`` (resuming from its checkpoints) and evaluates.

  Returns a ``RunResult``: the summary of a finished run, or the step at which it stopped.
  """
  # Every file of the run goes through etils.epath (this file, summary.json, evaluation
  # results, the embedding plot), tf.io.gfile (clu's TensorBoard writer) or orbax (checkpoints),
  # so a gs:// workdir works the same as a local one.
  workdir = checkpoint.run_directory(workdir)
  check_workdir(workdir)
  is_chief = jax.process_index() == 0
  if is_chief:  # this start's config, readable without orbax (each checkpoint keeps its own)
    (workdir / "config.json").write_text(
        json.dumps(checkpoint.to_jsonable(config), indent=2, sort_keys=True))

  # --- Mesh; the config checks, method, optimizer, run length, abstract state and its
  # shardings: the run builder (it checks every section first, before anything compiles).
  mesh = runs.make_mesh(config)
  run = runs.build_run(config, mesh)
  method, num_steps, abstract = run.method, run.num_steps, run.abstract_state

  # --- Logging.
  writer = metric_writers.create_default_writer(
      str(workdir), just_logging=not is_chief, asynchronous=True)
  writer.write_hparams(_flatten_config(config))

  # --- Checkpoints: resume from the newest good one if there is one.
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.checkpoint.max_to_keep,
                                 save_interval_steps=config.checkpoint.every_steps,
                                 async_save=config.checkpoint.async_save)
  restored = ckpt.restore_latest_good(abstract)
  if restored is not None:
    state, data_state, _, restored_step = restored
    logging.info("resumed from checkpoint step %d (data position %s)", restored_step, data_state)
    start_step = int(data_state.get("step", restored_step))
  else:
    # Random, or pretrained weights (config.init_from, once, at step 0) read straight into
    # each device's shards: convert/init.py.
    state = init_from.init_state(run)
    start_step = 0
  logging.info("method %s, %d parameters, %d devices, %d processes, global batch %d, %d steps, "
               "sharding %s (%.1f MiB of state per device)", config.method, run.num_params,
               mesh.size, jax.process_count(), config.global_batch, num_steps,
               config.sharding.strategy,
               run.state_bytes_per_device / 2**20)

  # --- Input: this host's shard, resumed at the restored step.
  train_iter = pipeline.train_iterator(
      config.data, mode=method.input_mode, global_batch=config.global_batch, seed=config.seed,
      start_step=start_step)

  # --- The step (jitted once with the run's shardings; the state is donated).
  step_fn = run.train_step

  # --- Evaluators: declared in config.eval, streamed per host (evaluate/runner.py).
  evaluators = (eval_runner.Runner(config, method, mesh, workdir=workdir)
                if config.eval.enabled else None)

  # --- Periodic actions.
  hooks = []
  report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                           every_steps=config.log_every)
  if is_chief:
    hooks.append(report)
    if config.profile_steps:
      hooks.append(periodic_actions.Profile(num_profile_steps=config.profile_steps,
                                            first_profile=start_step + 10,
                                            logdir=str(workdir), every_secs=None,
                                            profile_duration_ms=None))
  preempted = checkpoint.install_preemption_handler()
  check_every = config.checkpoint.preemption_check_every

  # --- The loop.
  collection = None
  train_metrics = None
  last_scalars: dict[str, float] = {}
  history: list[dict[str, float]] = []
  step = checked_step = start_step
  skipped = jnp.zeros((), jnp.float32)  # non-finite steps skipped (config.skip_nonfinite)
  t0 = time.time()
  with metric_writers.ensure_flushes(writer):
    while step < num_steps:
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = distributed.host_local_to_global(next(train_iter), mesh)
        state, metrics = step_fn(state, batch)
      # The metrics are replicated global arrays. Every eager op on a global array (clu's
      # accumulation below) is a program over all devices of all hosts: take this host's
      # copy instead, which stays on device (no sync) and keeps the bookkeeping local.
      metrics = {k: v.addressable_data(0) for k, v in metrics.items()}
      step += 1
      if collection is None:
        collection = metrics_collection(metrics.keys())
      if "nonfinite_skipped" in metrics:
        skipped = skipped + metrics["nonfinite_skipped"]
      update = collection.single_from_model_output(**metrics)
      train_metrics = update if train_metrics is None else train_metrics.merge(update)
      for hook in hooks:
        hook(step)

      at_end = step == num_steps
      if step % config.log_every == 0 or at_end:
        last_scalars = {k: float(v) for k, v in train_metrics.compute().items()}
        check_finite(step, last_scalars, since=checked_step)
        checked_step = step
        writer.write_scalars(step, {f"train/{k}": v for k, v in last_scalars.items()})
        # Summed over the hosts (a collective: every host logs at the same steps).
        corrupt_all = distributed.sum_over_processes(train_iter.stats["corrupt_skipped"])
        writer.write_scalars(step, {"data/corrupt_skipped": corrupt_all})
        history.append({"step": step, **last_scalars})
        train_metrics = None
        logging.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}"
                                                    for k, v in sorted(last_scalars.items())))

      due = evaluators.due(step) if evaluators is not None and not at_end else []
      if due:
        res = evaluators.run(state, due, step=step)
        writer.write_scalars(step, {f"eval/{k}": v for k, v in res.items()})
        eval_runner.write_results(workdir, step, res, due)

      stop = (checkpoint.reached_preemption(step, preempted, every=check_every)
              or step == config.stop_at_step)
      if step % config.checkpoint.every_steps == 0 or at_end or stop:
        if train_metrics is not None:  # never checkpoint a state whose steps are unchecked
          check_finite(step, {k: float(v) for k, v in train_metrics.compute().items()},
                       since=checked_step)
        ckpt.save(step, state, data_state={"step": step}, config=config, force=stop or at_end)
      if stop:
        ckpt.wait()
        logging.warning("stopped early (preemption or config.stop_at_step): saved a checkpoint "
                        "at step %d; rerun the same command to resume", step)
        ckpt.close()
        return RunResult(summary=None, stopped_at_step=step, train_history=history)
  ckpt.wait()
  train_time = time.time() - t0

  # --- Final evaluation and summary.
  summary: dict[str, Any] = {"method": config.method, "steps": num_steps,
                             "train_seconds_this_run": round(train_time, 1),
                             "final_train": last_scalars, "train_history": history,
                             "nonfinite_skipped": int(round(float(skipped))),
                             # Undecodable records skipped (skip_corrupt) since this process
                             # started: by all hosts, by this host, and the first of this
                             # host's names.
                             "data": {"corrupt_skipped_all_hosts": distributed.sum_over_processes(
                                          train_iter.stats["corrupt_skipped"]),
                                      **{k: train_iter.stats[k]
                                         for k in ("corrupt_skipped", "corrupt_files")}}}
  if evaluators is not None:
    final = evaluators.final()
    summary["eval"], test_f = evaluators.run(state, final, keep_features=True,
                                             step=num_steps)
    eval_runner.write_results(workdir, num_steps, summary["eval"], final)
    plot = config.eval.embedding_plot
    if plot and is_chief and test_f is not None:
      plots.save_embedding_plot(test_f["feat"], test_f["label"],
                                str(workdir / "embeddings.png"), method=plot,
                                title=f"{config.method}: test features after {num_steps} steps")
    writer.write_scalars(num_steps, {f"eval/{k}": v for k, v in summary["eval"].items()})
    if config.eval.raw_pixel_baseline:
      summary["raw_pixels"] = eval_runner.raw_pixel_baseline(config)
  ckpt.close()
  if is_chief:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
  return RunResult(summary=summary, stopped_at_step=None, train_history=history)


def _flatten_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  flat = {}

  def walk(prefix, node):
    for k, v in node.items():
      key = f"{prefix}{k}"
      if isinstance(v, (ml_collections.ConfigDict, dict)):
        walk(key + ".", v)
      elif isinstance(v, (int, float, str, bool)):
        flat[key] = v
      else:
        flat[key] = str(v)

  walk("", config)
  return flat


def format_summary(summary: dict[str, Any], knn_k: int) -> str:
  """A short human-readable table of the final evaluation against the raw-pixel baseline;
  ``knn_k`` is the k of the run's kNN evaluator."""
  lines = [f"== {summary['method']} after {summary['steps']} steps "
           f"({summary['train_seconds_this_run']} s of training in this run) =="]
  ev, raw = summary.get("eval", {}), summary.get("raw_pixels", {})  # absent: evaluation off
  rows = [(f"kNN (k={knn_k}) top-1", "knn/top1", None),
          ("linear probe top-1", "linear/top1", None)]
  rows += [(f"{k.split('/')[1]} labels/class top-1", k, k.replace("_mean", "_std"))
           for k in sorted(ev) if k.startswith("few/") and k.endswith("/top1_mean")]
  rows += [(k, k, None) for k in sorted(ev) if k.startswith(("zero_shot/", "retrieval/"))]
  lines.append(f"  {'':32s} {'encoder':>16s} {'raw pixels':>16s}")
  fmt = lambda d, k, s: (f"{d[k]:.4f}" + (f" ± {d[s]:.3f}" if s and s in d else "")
                         if k in d else "-")
  for name, key, std in rows:
    if key in ev:
      lines.append(f"  {name:32s} {fmt(ev, key, std):>16s} {fmt(raw, key, std):>16s}")
  return "\n".join(lines)
