"""Grid sweep over config keys: one training run per point, a markdown table and a plot.

  python launch/sweep.py --config=configs/simclr_mnist.py[:args] \
      --sweep=loss.temperature=0.05,0.1,0.2,0.5 [--sweep=optim.base_lr=0.1,0.3] \
      --workdir=DIR [--metric=eval/knn/top1] [--set key=value ...] [--subprocess]

The grid is the cartesian product of the ``--sweep`` lists (values are Python literals, split at
top-level commas, so ``--sweep=data.augment.crop_area=(0.08,1.0),(0.2,1.0)`` works). Each point
trains in ``DIR/<key=value,...>/`` with ``train.train_and_evaluate`` and leaves the usual
``summary.json``, checkpoints and TensorBoard logs there. ``--set`` overrides apply to every
point (e.g. ``--set total_steps=200``).

Resuming: rerun the same command. A point whose ``summary.json`` exists is skipped; a point that
was interrupted resumes from its newest checkpoint (the trainer does that by itself); a point
that failed (e.g. a non-finite loss at a very low temperature) is recorded in the table as
failed and the sweep goes on to the next point; it is retried on the next invocation.

Isolation: by default every point runs in this process, one after the other: no interpreter
and library start-up per point (seconds on a small CPU machine), and the evaluators' compiled
functions are shared between points. ``--subprocess`` runs each point as
``python -m contrastive_jax.main`` instead: accelerator memory is returned completely between
points and a hard crash (segfault, out-of-memory kill) of one point does not end the sweep. Use
it for long runs on GPU/TPU.

Outputs: ``DIR/sweep.md`` (one row per point: the swept values, the chosen ``--metric``, kNN,
linear and few-label accuracies, final loss, steps, wall-clock time, status; best metric in bold)
and ``DIR/sweep.png`` (the metric against the first swept key; one line per value of the other
swept keys). The metric is a path into ``summary.json``: ``eval/knn/top1``,
``eval/linear/top1``, ``train/loss`` (the final training loss), ``raw_pixels/linear/top1``.
Metrics whose name contains "loss" are better when lower, the others when higher.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

from etils import epath

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TIMING_FILE = "run_seconds.json"
FAILURE_FILE = "failed.txt"


# ----------------------------------------------------------------------------- grid


def split_top_level(text: str, sep: str = ",") -> list[str]:
  """Splits at ``sep`` outside brackets and quotes: ``"(1,2),3"`` -> ``["(1,2)", "3"]``."""
  parts, depth, quote, current = [], 0, None, []
  for ch in text:
    if quote:
      quote = None if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == sep and depth == 0:
      parts.append("".join(current).strip())
      current = []
      continue
    current.append(ch)
  parts.append("".join(current).strip())
  return [p for p in parts if p]


def parse_sweep(text: str) -> tuple[str, list[str]]:
  """``"loss.temperature=0.05,0.1"`` -> ``("loss.temperature", ["0.05", "0.1"])`` (value texts)."""
  key, sep, values = text.partition("=")
  values = split_top_level(values)
  if not sep or not key.strip() or not values:
    raise ValueError(f"--sweep={text!r} must look like key=v1,v2,... e.g. "
                     "--sweep=loss.temperature=0.05,0.1,0.2,0.5")
  return key.strip(), values


def grid(sweeps: Sequence[tuple[str, list[str]]]) -> list[list[tuple[str, str]]]:
  """The cartesian product of the swept values, first key varying slowest."""
  keys = [k for k, _ in sweeps]
  if len(set(keys)) != len(keys):
    raise ValueError(f"a key is swept twice: {keys}; give each key one --sweep")
  return [list(zip(keys, combo)) for combo in itertools.product(*(v for _, v in sweeps))]


def point_name(point: Sequence[tuple[str, str]]) -> str:
  """The point's directory name, ``key=value,key=value`` (characters unsafe in paths replaced)."""
  name = ",".join(f"{k}={v}" for k, v in point)
  return "".join(c if c.isalnum() or c in "=,._-+()" else "_" for c in name)


# ----------------------------------------------------------------------------- running


# Every file of a sweep goes through etils.epath, so DIR may be a gs:// bucket.


def run_dir(workdir: str | os.PathLike) -> epath.Path:
  """``workdir`` as an epath: absolute when local (subprocesses run from the repository root),
  ``gs://...`` unchanged."""
  text = os.fspath(workdir)
  return epath.Path(text if "://" in text else os.path.abspath(text))


def summary_path(workdir: str) -> str:
  return str(run_dir(workdir) / "summary.json")


def load_summary(workdir: str) -> dict[str, Any] | None:
  path = run_dir(workdir) / "summary.json"
  return json.loads(path.read_text()) if path.exists() else None


def run_seconds(workdir: str) -> float | None:
  path = run_dir(workdir) / TIMING_FILE
  return float(json.loads(path.read_text())["seconds"]) if path.exists() else None


def _add_seconds(workdir: str, seconds: float) -> None:
  total = (run_seconds(workdir) or 0.0) + seconds
  (run_dir(workdir) / TIMING_FILE).write_text(json.dumps({"seconds": round(total, 1)}))


def run_to_completion(config_spec: str, overrides: Sequence[str], workdir: str, *,
                      use_subprocess: bool = False, log=print) -> dict[str, Any]:
  """Trains ``config_spec`` + ``overrides`` in ``workdir`` unless its summary exists.

  Returns ``{"summary": dict | None, "status": "done" | "skipped" | "failed: ...",
  "seconds": wall-clock seconds of every invocation so far}``. Wall-clock time of each
  invocation (including resumed ones) is added up in ``workdir/run_seconds.json``.
  """
  workdir = str(run_dir(workdir))
  summary = load_summary(workdir)
  if summary is not None:
    return {"summary": summary, "status": "skipped", "seconds": run_seconds(workdir)}
  failure = run_dir(workdir) / FAILURE_FILE
  run_dir(workdir).mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  status = "done"
  try:
    if use_subprocess:
      cmd = [sys.executable, "-m", "contrastive_jax.main", f"--config={config_spec}",
             f"--workdir={workdir}"] + [f"--config.{o}" for o in overrides]
      log("  $ " + " ".join(cmd))
      proc = subprocess.run(cmd, cwd=REPO_ROOT, check=False)
      if proc.returncode != 0:
        raise RuntimeError(f"exit status {proc.returncode}; see the output above")
    else:
      from contrastive_jax import configs, train  # pylint: disable=g-import-not-at-top
      config = configs.apply_overrides(configs.load_config(config_spec), overrides)
      train.train_and_evaluate(config, workdir)
  except Exception as error:  # noqa: BLE001 -- one failed point must not end the sweep
    first_line = (str(error).splitlines() or [""])[0][:200]
    status = f"failed: {type(error).__name__}: {first_line}"
    failure.write_text(traceback.format_exc())
    log(f"  {status} (traceback in {failure})")
  _add_seconds(workdir, time.time() - t0)
  summary = load_summary(workdir)
  if summary is None and status == "done":
    status = "incomplete (stopped early; rerun to resume)"
  elif summary is not None and failure.exists():
    failure.unlink()
  return {"summary": summary, "status": status, "seconds": run_seconds(workdir)}


# ----------------------------------------------------------------------------- reporting


def lookup(summary: dict[str, Any] | None, metric: str) -> float | None:
  """``"eval/knn/top1"`` -> ``summary["eval"]["knn/top1"]``; ``"train/x"`` reads ``final_train``."""
  if not summary:
    return None
  section, _, key = metric.partition("/")
  section = {"train": "final_train"}.get(section, section)
  value = summary.get(section, {}).get(key) if isinstance(summary.get(section), dict) else None
  if value is None and metric in summary:
    value = summary[metric]
  try:
    return float(value) if value is not None else None
  except (TypeError, ValueError):
    return None


def lower_is_better(metric: str) -> bool:
  return "loss" in metric


def _fmt(value: float | None, digits: int = 4) -> str:
  return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def few_label(summary: dict[str, Any] | None, prefix: str = "eval") -> str:
  """``mean ± std`` of the first few-label probe in ``summary[prefix]`` (or ``-``)."""
  ev = (summary or {}).get(prefix, {}) or {}
  means = sorted(k for k in ev if k.startswith("few/") and k.endswith("/top1_mean"))
  if not means:
    return "-"
  key = means[0]
  std = ev.get(key.replace("_mean", "_std"))
  shots = key.split("/")[1]
  return f"{ev[key]:.4f} ± {std:.4f} ({shots}/class)" if std is not None else f"{ev[key]:.4f}"


def sweep_table(rows: list[dict[str, Any]], keys: Sequence[str], metric: str) -> str:
  """The markdown table of ``rows`` (``point``, ``summary``, ``status``, ``seconds``)."""
  values = [lookup(r["summary"], metric) for r in rows]
  finite = [v for v in values if v is not None and math.isfinite(v)]
  best = (min(finite) if lower_is_better(metric) else max(finite)) if finite else None
  head = list(keys) + [f"**{metric}**", "kNN top-1", "linear top-1", "few-label top-1",
                       "final loss", "steps", "wall-clock s", "status"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row, value in zip(rows, values):
    s = row["summary"]
    cell = _fmt(value)
    if value is not None and value == best:
      cell = f"**{cell}**"
    cells = [v for _, v in row["point"]] + [
        cell, _fmt(lookup(s, "eval/knn/top1")), _fmt(lookup(s, "eval/linear/top1")),
        few_label(s), _fmt(lookup(s, "train/loss")), str((s or {}).get("steps", "-")),
        _fmt(row["seconds"], 1), row["status"]]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _number(text: str) -> Any:
  from contrastive_jax.restore import parse_value  # pylint: disable=g-import-not-at-top
  value = parse_value(text)
  return value if isinstance(value, (int, float)) and not isinstance(value, bool) else text


def sweep_plot(rows: list[dict[str, Any]], keys: Sequence[str], metric: str, path: str,
               title: str) -> str:
  """``metric`` against the first key; one line per combination of the other keys' values."""
  from contrastive_jax.evaluate import plots  # pylint: disable=g-import-not-at-top
  series: dict[str, tuple[list[Any], list[float]]] = {}
  for row in rows:
    point = dict(row["point"])
    label = ", ".join(f"{k}={point[k]}" for k in keys[1:])
    xs, ys = series.setdefault(label, ([], []))
    xs.append(_number(point[keys[0]]))
    value = lookup(row["summary"], metric)
    ys.append(float("nan") if value is None else value)
  return plots.save_line_plot(series, path, xlabel=keys[0], ylabel=metric, title=title)


# ----------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="configs/x.py[:args]")
  parser.add_argument("--sweep", action="append", required=True, metavar="KEY=V1,V2,...",
                      help="a config key and its values; repeat for a grid")
  parser.add_argument("--workdir", required=True, help="the sweep directory")
  parser.add_argument("--metric", default="eval/knn/top1",
                      help="summary.json path to tabulate and plot (default eval/knn/top1)")
  parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                      help="overrides applied to every point")
  parser.add_argument("--subprocess", action="store_true",
                      help="run each point as its own `python -m contrastive_jax.main` process")
  return parser.parse_args(argv)


def run_sweep(config_spec: str, sweeps: Sequence[str], workdir: str, *,
              metric: str = "eval/knn/top1", overrides: Sequence[str] = (),
              use_subprocess: bool = False, log=print) -> dict[str, Any]:
  """Runs (or resumes) the grid and writes ``sweep.md`` and ``sweep.png`` in ``workdir``.

  Returns ``{"rows": [...], "table": path, "plot": path, "failed": count}``.
  """
  from contrastive_jax import configs  # pylint: disable=g-import-not-at-top
  parsed = [parse_sweep(s) for s in sweeps]
  keys = [k for k, _ in parsed]
  for key in keys:
    if any(o.partition("=")[0].strip() == key for o in overrides):
      raise ValueError(f"{key} is both swept and set with --set; drop one of them")
  if not use_subprocess:
    # Fail on a misspelt key before the first point trains.
    probe = configs.apply_overrides(configs.load_config(config_spec), overrides)
    configs.apply_overrides(probe, [f"{k}={v[0]}" for k, v in parsed])
  # Absolute paths: subprocesses run from the repository root.
  display_spec = config_spec
  path, sep, arg = configs.resolve(config_spec).partition(":")
  config_spec = os.path.abspath(path) + sep + arg
  root = run_dir(workdir)
  root.mkdir(parents=True, exist_ok=True)
  points = grid(parsed)
  rows = []
  for i, point in enumerate(points):
    name = point_name(point)
    log(f"[{i + 1}/{len(points)}] {name}")
    result = run_to_completion(config_spec, list(overrides) + [f"{k}={v}" for k, v in point],
                               str(root / name), use_subprocess=use_subprocess,
                               log=log)
    log(f"  {result['status']}: {metric} = {_fmt(lookup(result['summary'], metric))}")
    rows.append({"point": point, **result})
  title = f"{display_spec}: {metric}"
  table = "\n".join([
      f"# Sweep of {', '.join(keys)}", "",
      f"Config `{display_spec}`" + (f", overrides `{' '.join(overrides)}`" if overrides else "")
      + f"; metric `{metric}` ({'lower' if lower_is_better(metric) else 'higher'} is better, "
      "best in bold). One run per row, in its own directory under this one.", "",
      sweep_table(rows, keys, metric), "", "![sweep](sweep.png)", ""])
  table_path = str(root / "sweep.md")
  epath.Path(table_path).write_text(table)
  plot_path = sweep_plot(rows, keys, metric, str(root / "sweep.png"), title)
  failed = sum(r["status"].startswith("failed") for r in rows)
  log(f"wrote {table_path} and {plot_path}" + (f"; {failed} point(s) failed" if failed else ""))
  return {"rows": rows, "table": table_path, "plot": plot_path, "failed": failed}


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if not args.subprocess:
    from contrastive_jax import checkpoint  # pylint: disable=g-import-not-at-top
    checkpoint.show_progress_logs()     # in-process runs: their steps/s and ETA
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    try:
      tf.config.set_visible_devices([], "GPU")  # TensorFlow only feeds data
    except RuntimeError:  # TF already initialised (called in-process): leave it
      pass
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_threefry_partitionable", True)
  result = run_sweep(args.config, args.sweep, args.workdir, metric=args.metric,
                     overrides=args.set, use_subprocess=args.subprocess)
  return 1 if result["failed"] else 0


if __name__ == "__main__":
  sys.exit(main())
