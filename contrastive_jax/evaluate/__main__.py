"""Standalone evaluation of a training run's checkpoint, with the evaluators its config declares.

  python -m contrastive_jax.evaluate --workdir=DIR [--eval=all|NAME,...|TYPE,...] [--step=N] \
      [--config=configs/x.py[:arg]] [--embedding_plot=pca|tsne] \
      [--set eval.evaluators.imagenet.data.eval_split=validation ...]

Reads the config saved with the checkpoint (or ``--config``, then ``--set`` overrides; only
evaluation settings, ``eval.*``, should differ from the run), rebuilds the run on a mesh of
all devices of all processes, restores the newest good checkpoint (or ``--step``), and
runs the evaluators of ``config.eval`` (``evaluate/runner.py``, the same ``Runner`` the training
loop calls: same streamed features, same probes, same seeds), so the numbers equal the trainer's
for the same state. ``--eval`` picks evaluators by name (``imagenet_0shot``), by type (``knn``,
``linear_probe``, ``few_label``, ``zero_shot``, ``retrieval``), ``extra`` (the zero-shot and
retrieval ones) or ``all`` (default). Prints a table and writes ``DIR/eval_<name>.json``.

Run it on every host of a pod like the trainer (each host reads and encodes its shard).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from contrastive_jax import errors


def parse_evals(text: str) -> tuple[str, ...]:
  """``"knn,linear_probe"`` / ``"all"`` -> the names (checked against the run's evaluators)."""
  names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
  if not names:
    raise errors.ConfigError(f"--eval={text!r}: name at least one evaluator, or 'all'")
  return names


def run_evaluations(method, state, mesh, config, evals: Sequence[str],
                    eval_data: Any = None, return_features: bool = False,
                    workdir: str | None = None, step: int | None = None):
  """Runs the evaluators ``evals`` (names, types, ``extra`` or ``all``) of ``config`` on
  ``state`` with ``runner.Runner``, as the trainer does. ``eval_data`` is accepted for old
  callers and unused (the runner streams the splits). With ``return_features``, also returns
  the first feature evaluator's test features (``{"feat", "label"}``, or None). ``workdir`` and
  ``step``: where evaluators with ``cache_features`` keep their frozen features."""
  del eval_data
  from contrastive_jax.evaluate import runner  # pylint: disable=g-import-not-at-top
  evaluators = runner.Runner(config, method, mesh, workdir=workdir)
  names = evaluators.select(evals)
  return evaluators.run(state, names, keep_features=return_features, step=step)


def format_table(results: dict[str, float], title: str) -> str:
  """A two-column plain-text table, one evaluator metric a line."""
  width = max([len(k) for k in results] + [6])
  lines = [title, f"  {'metric':{width}s}  value", f"  {'-' * width}  ------"]
  lines += [f"  {k:{width}s}  {v:.4f}" for k, v in sorted(results.items())]
  return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m contrastive_jax.evaluate",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="the training run's directory")
  parser.add_argument("--eval", default="all",
                      help="comma list of evaluator names or types of the run's "
                      "config.eval.evaluators (knn, linear_probe, few_label, zero_shot, "
                      "retrieval, extra), or 'all'")
  parser.add_argument("--step", type=int, default=None,
                      help="checkpoint step (default: the newest good one)")
  parser.add_argument("--config", default=None,
                      help="configs/x.py[:arg] to use instead of the config saved in the "
                      "checkpoint (it must describe the same model and optimizer)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value, e.g. --set eval.batch_size=64")
  parser.add_argument("--embedding_plot", choices=("none", "pca", "tsne"), default="none",
                      help="also write DIR/embeddings_<method>.png of the test features")
  parser.add_argument("--out", default=None, help="JSON path (default DIR/eval_<name>.json)")
  return parser.parse_args(argv)


def evaluate_checkpoint(workdir: str, evals: Sequence[str] | str = "all", *,
                        step: int | None = None, config_spec: str | None = None,
                        overrides: Sequence[str] = (), embedding_plot: str = "none",
                        out_path: str | None = None, verbose: bool = True) -> dict[str, Any]:
  """The CLI as a function: restores, evaluates, writes the JSON; returns its content."""
  from contrastive_jax import checkpoint, configs, restore  # pylint: disable=g-import-not-at-top
  from contrastive_jax.evaluate import plots  # pylint: disable=g-import-not-at-top

  evals = parse_evals(evals if isinstance(evals, str) else ",".join(evals))
  # Every read and write of the run directory goes through etils.epath: local or gs://.
  run_dir = checkpoint.run_directory(workdir)
  if not checkpoint.checkpoint_directory(workdir).is_dir():
    raise errors.RunDirectoryError(
        f"--workdir={workdir!r} has no checkpoints/ directory; pass the directory of a training "
        "run (the --workdir given to contrastive_jax.main)")
  config = None
  if config_spec:
    config = configs.load_config(config_spec)
  elif overrides:
    config, _ = restore.saved_config(workdir, step)
  if config is not None and overrides:
    configs.apply_overrides(config, overrides)
  t0 = time.time()
  run = restore.restore_run(workdir, step=step, config=config)
  results, test_f = run_evaluations(run.method, run.state, run.mesh, run.config, evals,
                                    return_features=True, workdir=workdir, step=run.step)
  name = "+".join(evals)
  report = {"workdir": str(workdir), "step": run.step, "method": run.config.method,
            "evals": list(evals), "config": config_spec or "saved with the checkpoint",
            "overrides": list(overrides), "seconds": round(time.time() - t0, 1),
            "results": results}
  if embedding_plot != "none":
    if test_f is None:
      raise errors.ConfigError("--embedding_plot needs a feature evaluator (knn, linear_probe or "
                       "few_label) in --eval")
    report["embedding_plot"] = plots.save_embedding_plot(
        test_f["feat"], test_f["label"], run_dir / f"embeddings_{embedding_plot}.png",
        method=embedding_plot, title=f"{run.config.method} step {run.step}: test features "
        f"({embedding_plot})")
  out_path = str(out_path or run_dir / f"eval_{name}.json")
  import jax  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    out = epath.Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    if verbose:
      print(format_table(results, f"== {run.config.method}, {workdir} step {run.step} =="))
      print(f"written: {out_path}")
  report["path"] = out_path
  return report


def main(argv: Sequence[str] | None = None, *, exit_process: bool = False) -> int:
  """The command line; a ``UserError`` prints its message alone and returns status 2 (other
  exceptions are bugs and keep their traceback). With ``exit_process`` (the ``python -m``
  entry point) the process ends there, the message its last line (``errors.exit_process``)."""
  args = parse_args(argv)
  try:
    return _main(args)
  except errors.UserError as error:
    if exit_process:
      errors.exit_process(error)
    print(f"error: {error}", file=sys.stderr)
    return errors.EXIT_CODE


def _main(args: argparse.Namespace) -> int:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")  # TensorFlow only feeds data
  except RuntimeError:  # TF already initialised (called in-process): leave it
    pass
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_threefry_partitionable", True)
  evaluate_checkpoint(args.workdir, args.eval, step=args.step, config_spec=args.config,
                      overrides=args.set, embedding_plot=args.embedding_plot, out_path=args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main(exit_process=True))
