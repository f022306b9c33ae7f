"""Every full-scale config on the pod it names (``config.pod``), compiled by libtpu's TPU
compiler on this CPU machine: one markdown table (docs/compile_for.md).

  python benchmarks/pod_table.py [--only=a,b] [--evals=none|in_loop|all] [--input-rate=N]
      [--topology=T] [--out=DIR] [--force]
  python benchmarks/pod_table.py --assemble [--out=DIR]

Each config is ``python -m contrastive_jax.compile_for configs/<name>.py`` at the config's own
batch, image size, dtype, remat and sharding, on its ``config.pod`` (or ``--topology``: another
slice, or a GPU node such as ``8xa100-80gb``). Its report is saved as ``DIR/<name>.<target>.json``
(default ``benchmarks/results/pod_table``) as soon as it compiles, and a config whose file is
already there is not compiled again (``--force`` does): a full-size compile takes tens of
minutes on a small machine, so the table is built up over several runs, and
``python -m contrastive_jax.compile_for ... --json=DIR/<name>.<target>.json`` adds a row too.
The table printed at the end is assembled from every report in DIR (``--assemble``: only that).
A config that fails to compile is saved with its error (its row says so) and tried again on
the next run.

Columns, per chip of the train step: memory (state, temporaries, total, the worst evaluator
program's total when ``--evals`` compiled any) against the chip's HBM less the headroom, FLOPs
per step (loops by trip count), the bytes each chip sends per step by collective kind, the
roofline bound on the step time and what limits it, and the input budget (training examples
each host must decode per second at that bound, and the cores that takes at the measured
per-core rate of the config's recipe, against the host's vCPUs).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from contrastive_jax import compile_for, configs  # noqa: E402

FULL = ("simclr_resnet50_imagenet", "mocov2_resnet50_imagenet", "mocov3_resnet50_imagenet",
        "mocov3_vit_base_imagenet", "clip_vit_b32", "siglip_vit_b16", "lit_vit_b32")
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "pod_table")

HEADER = (
    "| config | target | batch per chip | params | state GiB | temporaries GiB | train step "
    "GiB | evals GiB | HBM GiB | fits | TFLOP per chip per step | MB sent per chip per step: "
    "AG / RS / AR / CP / A2A | step >= ms (limit) | examples/s per host | per core | cores "
    "needed / vCPUs | compile s |\n"
    "|---|---|--:|--:|--:|--:|--:|--:|--:|---|--:|---|---|--:|--:|---|--:|")


def config_name(rep: dict) -> str:
  """``configs/clip_vit_b32.py`` -> ``clip_vit_b32``."""
  return os.path.splitext(os.path.basename(str(rep.get("config") or "config")))[0]


def file_name(name: str, target: str) -> str:
  return f"{name}.{target.split()[0].replace(':', '_').replace('/', '_')}.json"


def row(rep: dict) -> str:
  """One table row of a ``compile_for.report`` (a TPU slice's or a GPU node's)."""
  g = 2 ** 30
  if "error" in rep:  # the compiler refused the program: the row is its error
    return (f"| {config_name(rep)} | {rep['target']} | error: {rep['error']} |"
            + " |" * 14)
  train = rep["programs"][0]
  b, i, c, chip = train["bound"], rep["input"], train["collectives"], rep["chip"]
  if not train["argument_bytes"] and train["total_bytes"]:  # the compiler ran out of HBM
    return (f"| {config_name(rep)} | {rep['target']} | {rep['global_batch'] // rep['chips']} | "
            f"{rep['num_params'] / 1e6:.0f}M | {train['state_bytes'] / g:.2f} | | "
            f"> {train['total_bytes'] / g:.2f} | | {chip['hbm_bytes'] / g:.0f} | **no** "
            "(out of HBM at compile) | | | | | | | "
            f"{sum(p['compile_seconds'] for p in rep['programs']):.0f} |")
  mb = lambda k: f"{c[k]['bytes'] / 1e6:.0f}"  # noqa: E731
  evals = max((p["total_bytes"] for p in rep["programs"][1:]), default=0)
  star = "*" if train.get("flops_counted") == "matrix products" else ""
  vcpus = i["host_vcpus"] or "?"
  return (f"| {config_name(rep)} | {rep['target']} | {rep['global_batch'] // rep['chips']} | "
          f"{rep['num_params'] / 1e6:.0f}M | {train['state_bytes'] / g:.2f} | "
          f"{train['temp_bytes'] / g:.2f} | {train['total_bytes'] / g:.2f} | "
          f"{evals / g:.2f} | {chip['hbm_bytes'] / g:.0f} | "
          f"{'yes' if rep['fits'] else '**no**'} | {train['flops'] / 1e12:.2f}{star} | "
          f"{mb('all-gather')} / {mb('reduce-scatter')} / {mb('all-reduce')} / "
          f"{mb('collective-permute')} / {mb('all-to-all')} | "
          f"{b['step_s'] * 1e3:.0f} ({b['limiter']}) | {i['examples_per_host_second']:.0f} | "
          f"{i['per_core_rate']:.0f} | {compile_for.cores_text(i['cores_needed'])} / {vcpus} | "
          f"{sum(p['compile_seconds'] for p in rep['programs']):.0f} |")


def assemble(out: str) -> str:
  """The table of every report in ``out``, full configs in ``FULL`` order, then the rest."""
  reports = []
  for path in sorted(glob.glob(os.path.join(out, "*.json"))):
    with open(path) as f:
      reports.append(json.load(f))
  order = {n: k for k, n in enumerate(FULL)}
  reports.sort(key=lambda r: (order.get(config_name(r), len(FULL)), config_name(r),
                              r["target"]))
  made = sorted({" ".join(r["made"].values()) if "made" in r else "before provenance"
                 for r in reports})
  where = os.path.relpath(out, ROOT) if out.startswith(ROOT) else out
  notes = [f"{len(reports)} reports in {where}; made: {'; '.join(made)}"]
  if any(p.get("flops_counted") == "matrix products"
         for r in reports for p in r.get("programs", [])):
    notes.append("* matrix products only (XLA:GPU has no cost model); GPU rows have no HBM "
                 "term in the bound")
  return "\n".join([HEADER] + [row(r) for r in reports] + [""] + notes)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--evals", default="none", choices=compile_for.EVAL_CHOICES)
  parser.add_argument("--input-rate", type=float, default=None)
  parser.add_argument("--only", default="", help="comma-separated config names")
  parser.add_argument("--topology", default="", help="instead of each config's pod")
  parser.add_argument("--out", default=DEFAULT_OUT, help="directory of the saved reports")
  parser.add_argument("--force", action="store_true", help="compile again what DIR has")
  parser.add_argument("--assemble", action="store_true", help="only print DIR's table")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  if args.assemble:
    print(assemble(args.out))
    return
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_threefry_partitionable", True)
  only = [n for n in args.only.split(",") if n]
  unknown = sorted(set(only) - set(configs.names()))
  if unknown:
    parser.error(f"--only: no config {unknown}; configs: {', '.join(configs.names())}")
  start = time.perf_counter()
  rates: dict[tuple, float] = {}
  for name in only or FULL:
    config = configs.load_config(f"configs/{name}.py")
    topology = args.topology or config.pod
    path = os.path.join(args.out, file_name(name, topology))
    if os.path.exists(path) and not args.force:
      with open(path) as f:
        failed = "error" in json.load(f)
      if not failed:  # a saved error is tried again
        print(f"{name} on {topology}: kept {path}", flush=True)
        continue
    key = (config.data.recipe, config.data.image_size, json.dumps(config.data.augment.to_dict(),
                                                                  sort_keys=True))
    try:
      devices, chip, label = compile_for.target_devices(topology)
      rep = compile_for.report(config, devices, chip, name=f"configs/{name}.py", target=label,
                               input_rate=args.input_rate or rates.get(key),
                               evals=args.evals)
    except Exception as error:  # noqa: BLE001 -- one config's failure is that row's result
      text = " ".join(str(error).split())[:300].replace("|", "/")
      rep = dict(config=f"configs/{name}.py", target=topology,
                 error=f"{type(error).__name__}: {text}",
                 made=dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           jax=jax.__version__))
      with open(path, "w") as f:
        json.dump(rep, f, indent=1)
      print(row(rep), flush=True)
      continue
    rates[key] = rep["input"]["per_core_rate"]
    with open(path, "w") as f:
      json.dump(rep, f, indent=1, default=str)
    print(row(rep), flush=True)
  print(f"\n{assemble(args.out)}\n\nthis run: {time.perf_counter() - start:.0f} s "
        f"(evals={args.evals}; jax {jax.__version__})")


if __name__ == "__main__":
  main()
