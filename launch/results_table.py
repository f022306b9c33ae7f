"""The results table of docs/results.md: every embedded config trained, evaluated and compared with baselines.

  python launch/results_table.py --out=results.md \
      [--configs=simclr_mnist,mocov2_mnist,mocov3_mnist,clip_mnist] [--workdir=DIR] \
      [--quick] [--subprocess] [--set key=value ...]

For each config (``configs/<name>.py``; a name whose file does not exist is skipped with a note)
the run trains to completion in ``DIR/<name>/`` (resumable exactly like ``launch/sweep.py``: a
finished run is not retrained, an interrupted one resumes from its checkpoint), then the table
compares, per method:

* **trained**: the run's final evaluation (``summary.json``): kNN top-1, linear-probe top-1,
  the few-label probe (mean ± std over its draws, 10 labels per class by default) and, for
  CLIP/SigLIP, zero-shot top-1 and image-to-text retrieval R@1 (the method's
  zero-shot and retrieval evaluators, run on the restored final checkpoint when the summary
  lacks them);
* **random init**: the same method's step-0 state (same seed and init as the run) through the
  same evaluators: what the architecture alone gives, the baseline pretraining must beat;
* **raw pixels**: the flattened eval images through the same kNN and probes, equal to
  ``evaluate.runner.raw_pixel_baseline`` (whose numbers are used when the run computed them).

plus the wall-clock time of the training run(s), and a second table of the published ImageNet
numbers the full-scale configs target, marked as not reproduced here. Baseline numbers are
cached in ``DIR/<name>/baselines.json``, so a rerun only rewrites the table.

``--quick`` uses each config's ``:quick`` variant (seconds per method; numbers meaningless) in
``DIR/<name>-quick/``, to check that the whole pipeline works.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

_LAUNCH_DIR = os.path.dirname(os.path.abspath(__file__))
if _LAUNCH_DIR not in sys.path:  # run as a script, launch/ is already first; imported, it is not
  sys.path.insert(0, _LAUNCH_DIR)

import sweep  # noqa: E402  (launch/sweep.py: run_to_completion, formatting)
from contrastive_jax import configs as config_files  # noqa: E402  (make_table has a `configs`)

DEFAULT_CONFIGS = ("simclr_mnist", "mocov2_mnist", "mocov3_mnist", "clip_mnist")
BASELINES_FILE = "baselines.json"

# Published ImageNet-1k results of the recipes the full-scale configs follow (last column: the
# paper).
PUBLISHED = (
    ("SimCLR", "ResNet-50 (1x)", "linear top-1", "69.1", "Chen et al. 2020, SimCLR"),
    ("MoCo v2", "ResNet-50, 200 epochs", "linear top-1", "67.5", "Chen et al. 2020, MoCo v2"),
    ("MoCo v3", "ViT-B", "linear top-1", "76.7", "Chen et al. 2021, MoCo v3"),
    ("CLIP", "ViT-B/32", "zero-shot top-1", "63.2", "Radford et al. 2021, CLIP"),
)


@dataclasses.dataclass(frozen=True)
class PixelEncoder:
  """Flattened raw pixels as "features": the method surface ``run_evaluations`` needs."""

  def encode(self, state, images):
    del state
    return images.reshape(images.shape[0], -1)


def _has_text(method) -> bool:
  return getattr(method, "input_mode", "views") == "image_text"


def _evaluations(method, config) -> tuple[str, ...]:
  evals = ("knn", "linear_probe", "few_label")
  return evals + ("extra",) if _has_text(method) else evals


def baselines(run_dir: str, log=print) -> dict[str, Any]:
  """Trained-state extras, random-init and raw-pixel numbers of a finished run (cached)."""
  path = sweep.run_dir(run_dir) / BASELINES_FILE  # etils.epath: local or gs://
  if path.exists():
    return json.loads(path.read_text())
  import jax  # pylint: disable=g-import-not-at-top

  from contrastive_jax import restore  # pylint: disable=g-import-not-at-top
  from contrastive_jax.evaluate import __main__ as evaluator  # pylint: disable=g-import-not-at-top

  run = restore.restore_run(run_dir)
  config, method, mesh = run.config, run.method, run.mesh
  summary = sweep.load_summary(run_dir) or {}
  out: dict[str, Any] = {"trained_extra": {}}
  if _has_text(method) and not any(
      k.startswith(("zero_shot/", "retrieval/")) for k in summary.get("eval", {})):
    log("  method evaluations (zero-shot, retrieval) of the trained state")
    out["trained_extra"] = evaluator.run_evaluations(method, run.state, mesh, config, ("extra",))
  del run
  log("  random-init encoder (step 0)")
  init = restore.initial_state(method, config, mesh)
  out["random_init"] = evaluator.run_evaluations(method, init, mesh, config,
                                                 _evaluations(method, config))
  del init
  log("  raw pixels")
  # The trainer's own raw-pixel probes when it ran them (the same calls): then only kNN here.
  trainer_pixels = summary.get("raw_pixels", {})
  evals = ("knn",) if trainer_pixels else ("knn", "linear_probe", "few_label")
  pixels = evaluator.run_evaluations(PixelEncoder(), {}, mesh, config, evals)
  pixels.update(trainer_pixels)
  out["raw_pixels"] = pixels
  if jax.process_index() == 0:
    path.write_text(json.dumps(out, indent=2))
  return out


def _get(results: dict[str, Any] | None, key: str) -> float | None:
  value = (results or {}).get(key)
  return None if value is None or not math.isfinite(float(value)) else float(value)


def _pct(value: float | None) -> str:
  return "-" if value is None else f"{100 * value:.1f}"


def _few(results: dict[str, Any] | None) -> str:
  keys = sorted((k for k in (results or {}) if k.startswith("few/") and k.endswith("/top1_mean")),
                key=lambda k: int(k.split("/")[1]) if k.split("/")[1].isdigit() else 0)
  if not keys:
    return "-"
  key = keys[0]
  std = _get(results, key.replace("_mean", "_std"))
  mean = _pct(_get(results, key))
  return mean if std is None else f"{mean} ± {100 * std:.1f}"


def _row(method: str, encoder: str, results: dict[str, Any] | None, seconds: str,
         clip: bool) -> str:
  cells = [method, encoder, _pct(_get(results, "knn/top1")), _pct(_get(results, "linear/top1")),
           _few(results)]
  if clip:
    cells += [_pct(_get(results, "zero_shot/top1")),
              _pct(_get(results, "retrieval/image_to_text/R@1"))]
  cells.append(seconds)
  return "| " + " | ".join(cells) + " |"


def render(entries: list[dict[str, Any]], notes: list[str], quick: bool) -> str:
  clip = any(e.get("clip") for e in entries)
  head = ["method", "encoder", "kNN top-1", "linear top-1", "few-label top-1 (mean ± std)"]
  if clip:
    head += ["zero-shot top-1", "retrieval R@1 (image→text)"]
  head.append("train wall-clock")
  lines = [
      "## Results on the embedded MNIST-5k" + (" (`--quick` smoke configs: numbers are "
                                               "meaningless)" if quick else ""),
      "",
      "Accuracies in % on the 1,000-image test split; features from the frozen encoder (before "
      "the projection head). *random init* is the same method's step-0 state, *raw pixels* the "
      "flattened eval images as the method sees them (after its recipe's mean/std "
      "normalisation, which changes the cosine kNN but not the standardised probes), both "
      "through the same evaluators. The few-label probe uses "
      "10 labelled images per class unless the config says otherwise.",
      "",
      "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for e in entries:
    if e.get("status", "").startswith("failed") or e.get("summary") is None:
      lines.append(f"| {e['name']} | {e.get('status', 'not run')} |" + " |" * (len(head) - 2))
      continue
    s, b = e["summary"], e["baselines"]
    trained = dict(s.get("eval", {}), **b.get("trained_extra", {}))
    secs = e.get("seconds")
    wall = "-" if secs is None else (f"{secs / 60:.1f} min" if secs >= 120 else f"{secs:.0f} s")
    lines.append(_row(e["name"], f"trained ({s.get('steps')} steps)", trained, wall, clip))
    lines.append(_row("", "random init", b.get("random_init"), "", clip))
    lines.append(_row("", "raw pixels", b.get("raw_pixels"), "", clip))
  if notes:
    lines += [""] + [f"- {n}" for n in notes]
  lines += [
      "", "## Published ImageNet-1k numbers the full-scale configs target",
      "", "**Published, not reproduced here**: the papers' numbers for the recipes that the "
      "full configs (`configs/*_imagenet.py`, `configs/clip_vit_b32.py`) follow; this "
      "repository has not run them.", "",
      "| method | model | metric | published top-1 (%) | source |", "|---|---|---|---|---|"]
  lines += [f"| {m} | {model} | {metric} | {v} | {src} |" for m, model, metric, v, src in PUBLISHED]
  return "\n".join(lines) + "\n"


def make_table(out: str, configs: Sequence[str] = DEFAULT_CONFIGS, *,
               workdir: str = "/tmp/contrastive_results", quick: bool = False,
               overrides: Sequence[str] = (), use_subprocess: bool = False,
               log=print) -> dict[str, Any]:
  """Runs (or resumes) each config, computes the baselines and writes the markdown to ``out``."""
  entries, notes = [], []
  workdir = str(sweep.run_dir(workdir))
  for name in configs:
    path = os.path.join(config_files.PACKAGE_DIR, f"{name}.py")
    if not os.path.exists(path):
      notes.append(f"`configs/{name}.py` does not exist yet: skipped.")
      log(f"[{name}] skipped: {path} does not exist")
      continue
    spec = path + (":quick" if quick else "")
    run_dir = str(sweep.run_dir(workdir) / (name + ("-quick" if quick else "")))
    log(f"[{name}] {run_dir}")
    result = sweep.run_to_completion(spec, list(overrides), run_dir,
                                     use_subprocess=use_subprocess, log=log)
    entry = {"name": name, **result}
    if result["summary"] is not None and "eval" in result["summary"]:
      entry["baselines"] = baselines(run_dir, log=log)
      entry["clip"] = any(k.startswith("zero_shot/")
                          for k in {**result["summary"]["eval"],
                                    **entry["baselines"].get("trained_extra", {})})
    elif result["summary"] is not None:
      entry["status"] = "no evaluation (config.eval.enabled is False)"
      entry["summary"] = None
    entries.append(entry)
  text = render(entries, notes, quick)
  target = sweep.run_dir(out)
  target.parent.mkdir(parents=True, exist_ok=True)
  target.write_text(text)
  log(f"wrote {out}")
  return {"entries": entries, "notes": notes, "path": out}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="markdown file to write")
  parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                      help="comma list of config names under configs/")
  parser.add_argument("--workdir", default="/tmp/contrastive_results",
                      help="directory of the runs (one subdirectory per config)")
  parser.add_argument("--quick", action="store_true", help="use the configs' :quick variants")
  parser.add_argument("--subprocess", action="store_true",
                      help="train each config in its own `python -m contrastive_jax.main`")
  parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                      help="overrides applied to every config")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")  # TensorFlow only feeds data
  except RuntimeError:  # TF already initialised (called in-process): leave it
    pass
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_threefry_partitionable", True)
  from contrastive_jax import checkpoint  # pylint: disable=g-import-not-at-top
  checkpoint.show_progress_logs()       # in-process runs: their steps/s and ETA
  result = make_table(args.out, [c.strip() for c in args.configs.split(",") if c.strip()],
                      workdir=args.workdir, quick=args.quick, overrides=args.set,
                      use_subprocess=args.subprocess)
  failed = [e["name"] for e in result["entries"] if e["status"].startswith("failed")]
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
