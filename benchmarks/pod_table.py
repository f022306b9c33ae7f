"""Every full-scale config on the pod it names (``config.pod``), compiled by libtpu's TPU
compiler on this CPU machine: one markdown table (docs/compile_for.md).

  python benchmarks/pod_table.py [--evals=none|in_loop|all] [--input-rate=N] [--only=a,b]
      [--json=PATH]

Each row is ``python -m contrastive_jax.compile_for configs/<name>.py`` at the config's own
batch, image size, dtype, remat and sharding: the train step's memory per chip, FLOPs per chip
per step (loops by trip count), the bytes each chip sends per step, the roofline bound on the
step time and what it limits, and the input budget (training examples each host must decode
per second at that bound, and the cores that takes at the measured per-core rate of the
config's recipe, against the host's vCPUs). ``--evals`` adds the evaluators' programs to the
fit verdict (their worst total is a column).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from contrastive_jax import compile_for, configs, hardware  # noqa: E402

FULL = ("simclr_resnet50_imagenet", "mocov2_resnet50_imagenet", "mocov3_resnet50_imagenet",
        "mocov3_vit_base_imagenet", "clip_vit_b32", "siglip_vit_b16", "lit_vit_b32")


def row(name: str, rep: dict) -> str:
  g = 2 ** 30
  train = rep["programs"][0]
  b, i, c = train["bound"], rep["input"], train["collectives"]
  mb = lambda k: f"{c[k]['bytes'] / 1e6:.0f}"
  evals = max((p["total_bytes"] for p in rep["programs"][1:]), default=0)
  return (f"| {name} | {rep['target']} | {rep['global_batch'] // rep['chips']} | "
          f"{rep['num_params'] / 1e6:.0f}M | {train['state_bytes'] / g:.2f} | "
          f"{train['temp_bytes'] / g:.2f} | {train['total_bytes'] / g:.2f} | "
          f"{evals / g:.2f} | {'yes' if rep['fits'] else '**no**'} | "
          f"{train['flops'] / 1e12:.2f} | {mb('all-gather')} / {mb('reduce-scatter')} / "
          f"{mb('all-reduce')} / {mb('collective-permute')} / {mb('all-to-all')} | "
          f"{b['step_s'] * 1e3:.0f} ({b['limiter']}) | {i['examples_per_host_second']:.0f} | "
          f"{i['per_core_rate']:.0f} | {compile_for.cores_text(i['cores_needed'])} / {i['host_vcpus']} | "
          f"{sum(p['compile_seconds'] for p in rep['programs']):.0f} |")


HEADER = (
    "| config | pod | batch per chip | params | state GiB | temporaries GiB | train step "
    "GiB | evals GiB | fits (16 GiB, 10% headroom) | TFLOP per chip per step | MB sent per "
    "chip per step: AG / RS / AR / CP / A2A | step >= ms (limit) | examples/s per host | "
    "per core | cores needed / vCPUs | compile s |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--evals", default="none", choices=compile_for.EVAL_CHOICES)
  parser.add_argument("--input-rate", type=float, default=None)
  parser.add_argument("--only", default="")
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_threefry_partitionable", True)
  names = [n for n in FULL if not args.only or n in args.only.split(",")]
  start = time.perf_counter()
  rates: dict[tuple, float] = {}
  rows, reports = [], {}
  for name in names:
    config = configs.load_config(f"configs/{name}.py")
    topo = hardware.parse_topology(config.pod)
    key = (config.data.recipe, config.data.image_size, json.dumps(config.data.augment.to_dict(),
                                                                  sort_keys=True))
    rate = args.input_rate or rates.get(key)
    try:
      rep = compile_for.report(config, hardware.tpu_devices(topo), topo.chip, name=name,
                               target=config.pod, input_rate=rate, evals=args.evals)
    except Exception as error:  # noqa: BLE001 -- one row's failure is that row's result
      rows.append(f"| {name} | {config.pod} | error: {type(error).__name__}: "
                  f"{str(error).splitlines()[0][:200]} |")
      print(rows[-1], flush=True)
      continue
    rates[key] = rep["input"]["per_core_rate"]
    reports[name] = rep
    rows.append(row(name, rep))
    print(rows[-1], flush=True)
  print(f"\n{HEADER}\n" + "\n".join(rows))
  print(f"\n{len(names)} configs in {time.perf_counter() - start:.0f} s "
        f"(evals={args.evals}; jax {jax.__version__})")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(reports, f, indent=1, default=str)


if __name__ == "__main__":
  main()
