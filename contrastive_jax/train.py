"""The one generic training loop: any method on the common surface, any mesh, any host count.

Read top to bottom: config checks, logging, mesh, method and optimizer, shape-first state init
with shardings, checkpoint restore, input, the jitted step, evaluators, the loop, the summary.
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

from contrastive_jax import checkpoint, distributed, grad_cache, losses, methods, optim, runs
from contrastive_jax.convert import init as init_from
from contrastive_jax.errors import ConfigError, NonFiniteLossError
from contrastive_jax.data import pipeline
from contrastive_jax.evaluate import plots
from contrastive_jax.evaluate import runner as eval_runner
from contrastive_jax.methods import base as method_base
from contrastive_jax.models import registry

# The run length lives with the run builder; ``train.total_steps`` stays for callers.
total_steps = runs.total_steps


# ----------------------------------------------------------------------------- config


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _one_of(key: str, value: Any, options) -> None:
  _require(value in options, f"config.{key}={value!r} is unknown; use one of {list(options)}")


def validate_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Cheap checks that fail in well under a second, before any data is read or anything is
  compiled, each naming the config key and the fix. The option lists are the modules' own
  (``methods.METHODS``, ``optim.NAMES``, ``pipeline.SOURCES``, ...). Building the method runs
  its own checks (queue size, momentum), also before compiling."""
  _one_of("method", config.method, sorted(methods.METHODS))
  gb = config.global_batch
  _require(isinstance(gb, int) and gb > 0,
           f"config.global_batch={gb!r} must be a positive integer")
  try:
    distributed.check_batch_divisible(gb, mesh, "config.global_batch")
  except ValueError as error:
    raise ConfigError(str(error)) from None
  for key in ("log_every", "checkpoint.every_steps", "checkpoint.preemption_check_every"):
    value = _value(config, key)
    _require(isinstance(value, int) and value > 0, f"config.{key}={value!r} must be >= 1")
  keep = config.checkpoint.max_to_keep
  _require(keep is None or keep >= 1, f"config.checkpoint.max_to_keep={keep} must be >= 1 "
           "(or None to keep every checkpoint)")
  if "loss" in config and "temperature" in config.loss:
    t = config.loss.temperature
    _require(isinstance(t, (int, float)) and t > 0,
             f"config.loss.temperature={t} must be positive (SimCLR 0.1-0.5, MoCo 0.2)")
  _one_of("loss_impl", config.loss_impl, losses.IMPLEMENTATIONS)
  tile = config.loss_tile
  _require(isinstance(tile, int) and tile >= 0,
           f"config.loss_tile={tile!r} must be an integer >= 0 (0: whole blocks)")
  _require(tile == 0 or config.loss_impl == "ring",
           f"config.loss_tile={tile} tiles the ring loss only; set config.loss_impl='ring' or "
           "config.loss_tile=0")
  _one_of("dtype", config.dtype, sorted(method_base.DTYPES))
  _one_of("model.name", config.model.name, registry.MODEL_NAMES)
  _one_of("optim.name", config.optim.name, optim.NAMES)
  _one_of("optim.lr_scaling", config.optim.lr_scaling, optim.SCALINGS)
  _one_of("optim.schedule", config.optim.schedule, optim.SCHEDULES)
  _require(float(config.optim.base_lr) > 0,
           f"config.optim.base_lr={config.optim.base_lr} must be positive")
  _require(float(config.optim.weight_decay) >= 0,
           f"config.optim.weight_decay={config.optim.weight_decay} must be >= 0")
  data = config.data
  _one_of("data.source", data.source, pipeline.SOURCES)
  _require(isinstance(data.image_size, int) and data.image_size >= 8,
           f"config.data.image_size={data.image_size!r} must be an integer >= 8")
  if data.source == "tfds":
    _require(bool(data.name), "config.data.name must name a tfds dataset (e.g. 'cifar10') when "
             "config.data.source='tfds'")
  if data.source in ("folder", "csv", "tfrecord"):
    _require(bool(data.path), f"config.data.path must be set for config.data.source="
             f"{data.source!r} (a folder, CSV file or TFRecord glob)")
  patch = (dict(config.model.kwargs).get("patch_size")
           or registry.VIT_PRESETS.get(config.model.name, {}).get("patch_size"))
  if patch:
    _require(data.image_size >= patch and data.image_size % patch == 0,
             f"config.data.image_size={data.image_size} must be a multiple of the ViT patch "
             f"size {patch} (and at least one patch); change config.data.image_size or the "
             "patch size")
  eval_runner.check_config(config, mesh)
  try:
    micro = grad_cache.micro_batches(config)
    total_steps(config, 1)  # exactly one of total_steps / total_epochs, positive
    optim.resolve_warmup_steps(config.optim, 2**31)
    methods.build_method(config, mesh)  # the method's own checks
  except ConfigError:
    raise
  except ValueError as error:
    raise ConfigError(str(error)) from None
  if micro > 1:
    _require(methods.METHODS[config.method].supports_grad_cache,
             f"config.grad_cache.micro_batches={micro} but method {config.method!r} has no "
             "gradient caching (SimCLR and CLIP do); set it to 1")


def _value(config: ml_collections.ConfigDict, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


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


# ----------------------------------------------------------------------------- step


# The step lives with the run builder; ``train.make_train_step`` stays for callers.
make_train_step = runs.make_train_step


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

  # --- Mesh and config checks (before anything compiles).
  mesh = runs.make_mesh(config)
  validate_config(config, mesh)
  # --- Method, optimizer, run length, abstract state and its shardings: the run builder.
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
