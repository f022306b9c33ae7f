"""Compile a config for the pod it targets with the real TPU compiler (or for a GPU node with
XLA:GPU), on any machine, before anyone pays for the pod.

  python -m contrastive_jax.compile_for configs/clip_vit_b32.py[:args] [--topology=v5e-256] \
      [--config.key=value ...] [--json=PATH] [--input-rate=N] [--evals=all|in_loop|none]

The config and its overrides are read as ``contrastive_jax.main`` reads them; ``--topology``
defaults to the config's ``pod`` (``hardware.parse_topology``: ``v5e-64``, ``v5litepod-64``,
``v4-32``, ``v5e:8x8``, ...). libtpu describes the slice's devices
(``hardware.tpu_devices``), ``distributed.make_mesh`` orders them as training does, and
``runs.build_run(config, mesh)`` builds the run as training does: the train step (the abstract
state and ``run.abstract_batch()``, the config's own global batch, image size, context, dtype
and remat) and the encoders the evaluators run (``evaluate/runner.py``) are lowered and
compiled by the TPU compiler. No TPU and no data are needed.

``--topology`` may name a GPU node instead (``gpu_targets.TARGETS``: ``8xa100-80gb``,
``8xh100-80gb``, ``1xrtx4090``, ...; ``8xA100``, ``a100x8``, ``rtx4090`` are accepted): jax's
CUDA plugin compiles for a described device with XLA:GPU, no GPU or CUDA libraries needed
(without the plugin the error names its pip command). The report has the same shape; XLA:GPU
has no cost model, so its FLOPs are the matrix products of the compiled HLO (cuBLAS GEMMs and
cuDNN convolutions, loops by trip count) and its roofline has no HBM term.

Per chip it prints, for each program: memory (the state, the compiler's arguments, outputs,
temporaries and code, their total against the chip's HBM less a headroom), FLOPs per step (the
compiler's cost model with loops counted by their trip counts, ``hlo_stats``), the bytes each
collective kind sends (from the compiled HLO), and a roofline lower bound on the step time,
``max(FLOPs / peak, bytes accessed / HBM bandwidth, collective bytes / ICI bandwidth)`` (Williams
et al. 2009, "Roofline"), with the FLOP-utilisation ceiling it implies. Beside it, the input
budget: the examples per second each host must decode to keep its chips at that bound, against
the measured rate of one CPU core running the config's own augmentation
(``data/throughput.py``), so the report says how many host cores the run needs and how many the
TPU host has. When a program does not fit, it prints the report, then one line naming the
fixes, and exits with status 2.

``report(config, devices, chip)`` is the library entry: any devices with a ``ChipSpec``
(``target_devices(name)`` gives both for a TPU slice or a GPU node). MaxText's
``train_compile.py`` is the same idea for LLMs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from contrastive_jax import configs, errors, hardware

FLAGS = flags.FLAGS
# Fraction of HBM a program may use: the TPU runtime keeps some HBM for itself (its own
# buffers, the infeed/outfeed queues) and allocation fragments it, so "fits with 0.2 GiB to
# spare" is not a plan. 10% is a margin, not a measured figure.
DEFAULT_HEADROOM = 0.10
EVAL_CHOICES = ("all", "in_loop", "none")


@dataclasses.dataclass
class ProgramReport:
  """One compiled program's figures, per chip. Bytes, FLOPs and seconds."""
  name: str
  state_bytes: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  total_bytes: int
  flops: float                 # loops counted by their trip counts
  cost_model_flops: float      # XLA's cost_analysis(): each loop body once
  bytes_accessed: float        # cost_analysis(); loop bodies once
  loops: list[dict[str, Any]]
  collectives: dict[str, dict[str, float]]
  compile_seconds: float
  bound: dict[str, float] = dataclasses.field(default_factory=dict)
  # "cost model + loops" (TPU: cost_analysis() plus the loop iterations it skips) or "matrix
  # products" (XLA:GPU has no cost model: the dot/GEMM/convolution FLOPs of the HLO, loops by
  # trip count; elementwise work is left out).
  flops_counted: str = "cost model + loops"


def analyse(name: str, compiled, num_devices: int, state_bytes: int,
            chip: hardware.ChipSpec, compile_seconds: float = 0.0) -> ProgramReport:
  """The figures of a compiled program (``jit(...).lower(...).compile()``)."""
  from contrastive_jax import hlo_stats  # pylint: disable=g-import-not-at-top
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  module = hlo_stats.parse(compiled.as_text())
  cost_flops = float(cost.get("flops", 0.0))
  if "flops" in cost:
    flops, counted = hlo_stats.flops_with_loops(cost_flops, module), "cost model + loops"
  else:  # XLA:GPU: no cost model; its GEMMs and convolutions are cuBLAS/cuDNN calls
    flops, counted = hlo_stats.loop_flops(module, True), "matrix products"
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
           + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
  rep = ProgramReport(
      name=name, state_bytes=int(state_bytes), argument_bytes=mem.argument_size_in_bytes,
      output_bytes=mem.output_size_in_bytes, alias_bytes=mem.alias_size_in_bytes,
      temp_bytes=mem.temp_size_in_bytes, code_bytes=mem.generated_code_size_in_bytes,
      total_bytes=int(total), flops=flops, cost_model_flops=cost_flops,
      bytes_accessed=float(cost.get("bytes accessed", 0.0)),
      loops=[dataclasses.asdict(x) for x in hlo_stats.loops(module)],
      collectives=hlo_stats.collective_bytes(module, num_devices),
      compile_seconds=float(compile_seconds), flops_counted=counted)
  rep.bound = roofline(rep, chip)
  return rep


def roofline(rep: ProgramReport, chip: hardware.ChipSpec) -> dict[str, float]:
  """Lower bounds on the program's time on one chip, seconds: compute, HBM traffic (when the
  compiler reports bytes accessed) and ICI, each as if it alone ran at the chip's peak; the
  step cannot be faster than the largest. ``flops_utilisation_ceiling``: compute / bound."""
  compute = rep.flops / chip.peak_bf16_flops
  hbm = rep.bytes_accessed / chip.hbm_bw_bytes_s if rep.bytes_accessed else 0.0
  ici_bytes = sum(c["bytes"] for c in rep.collectives.values())
  ici = ici_bytes / chip.ici_bw_bytes_s
  bound = max(compute, hbm, ici)
  limiter = max((("compute", compute), ("HBM", hbm), (chip.link, ici)), key=lambda kv: kv[1])[0]
  return dict(compute_s=compute, hbm_s=hbm, ici_s=ici, ici_bytes=ici_bytes, step_s=bound,
              limiter=limiter, flops_utilisation_ceiling=compute / bound if bound else 0.0)


# ----------------------------------------------------------------------------- programs


def _eval_programs(config, run, which: str) -> list[tuple[str, str, dict]]:
  """``(label, encoder name, {input shapes})`` of the distinct encoder programs the run's
  evaluators compile (each type's ``programs``, ``evaluate/evaluators/``): in the loop
  (``every_steps``) and, with ``which="all"``, at the end too. None when
  ``config.eval.enabled`` is off (the loop runs no evaluator then)."""
  if which == "none" or not config.eval.enabled:
    return []
  # pylint: disable-next=g-import-not-at-top
  from contrastive_jax.evaluate import evaluators, runner as eval_runner, streaming
  specs = eval_runner.specs_of(config, run.method.input_mode)
  programs: dict[tuple, tuple[str, str, dict, list[str]]] = {}
  for name, spec in specs.items():
    if which == "in_loop" and not spec["every_steps"]:
      continue
    data = streaming.data_config(config, spec)
    for encoder, arg in evaluators.EVALUATORS[spec["type"]].programs(spec, data):
      key = (encoder, arg)
      if key not in programs:
        programs[key] = (encoder, arg, [])
      programs[key][2].append(name)
  out = []
  for (encoder, (_, shape, dtype)), (_, _, users) in programs.items():
    label = f"eval {encoder} {list(shape)} ({', '.join(users)})"
    out.append((label, encoder, dict(shape=shape, dtype=dtype)))
  return out


def _compile(lower, options: dict[str, Any] | None = None) -> tuple[Any, float]:
  start = time.perf_counter()
  try:
    compiled = lower().compile(compiler_options=options)
  except Exception as error:  # noqa: BLE001 -- the TPU compiler's out-of-memory is a verdict
    used = _hbm_exhausted(str(error))
    if used is None:
      raise
    return used, time.perf_counter() - start
  return compiled, time.perf_counter() - start


def _hbm_exhausted(message: str) -> tuple[float, float] | None:
  """``(used, available)`` bytes from the TPU compiler's "Ran out of memory in memory space
  hbm ... Used 20.5G of 15.75G hbm" error; None for any other error."""
  m = re.search(r"Used\s+([\d.]+)([KMGT]?)i?B?\s+of\s+([\d.]+)([KMGT]?)i?B?\s+hbm", message)
  if "RESOURCE_EXHAUSTED" not in message or not m:
    return None
  unit = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
  return float(m.group(1)) * unit[m.group(2)], float(m.group(3)) * unit[m.group(4)]


def _oom_report(name: str, used: tuple[float, float], state_bytes: int,
                seconds: float) -> ProgramReport:
  """A program the compiler refused: its total is the compiler's "Used" figure."""
  empty = {k: {"count": 0.0, "bytes": 0.0} for k in
           ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")}
  return ProgramReport(name=name, state_bytes=int(state_bytes), argument_bytes=0,
                       output_bytes=0, alias_bytes=0, temp_bytes=0, code_bytes=0,
                       total_bytes=int(used[0]), flops=0.0, cost_model_flops=0.0,
                       bytes_accessed=0.0, loops=[], collectives=empty,
                       compile_seconds=seconds,
                       bound=dict(compute_s=0.0, hbm_s=0.0, ici_s=0.0, ici_bytes=0.0,
                                  step_s=0.0, limiter="did not compile: out of HBM",
                                  flops_utilisation_ceiling=0.0))


# ----------------------------------------------------------------------------- the report


def report(config, devices, chip: hardware.ChipSpec, *, name: str = "", target: str = "",
           input_rate: float | None = None, evals: str = "all",
           headroom: float = DEFAULT_HEADROOM, measure_seconds: float = 4.0) -> dict[str, Any]:
  """Compiles ``config``'s train step and evaluator encoders for ``devices`` and returns the
  report (a JSON-able dict; ``format_report`` prints it).

  Args:
    config: the run's config (its own global batch, sizes, dtype, remat, sharding).
    devices: the target's devices (``hardware.tpu_devices``), ordered by ``make_mesh``.
    chip: the figures of one of those devices' chips.
    name, target: the config's and the slice's names, for the report.
    input_rate: training examples per second one host core decodes; None measures it with
      ``data/throughput.py`` on the config's recipe.
    evals: "all" (the loop's and the final evaluators' programs), "in_loop" or "none".
    headroom: the fraction of HBM a program must leave free to count as fitting.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from contrastive_jax import distributed, runs  # pylint: disable=g-import-not-at-top
  if evals not in EVAL_CHOICES:
    raise errors.ConfigError(f"--evals={evals!r}; use one of {EVAL_CHOICES}")
  if not 0.0 <= headroom < 1.0:
    raise errors.ConfigError(f"--headroom={headroom} must be a fraction of HBM in [0, 1), "
                             f"e.g. {DEFAULT_HEADROOM}")
  # Without a device XLA:GPU cannot autotune: GEMMs go to cuBLAS (gpu_targets.COMPILER_OPTIONS).
  options = None
  if chip.kind == "gpu":
    from contrastive_jax import gpu_targets  # pylint: disable=g-import-not-at-top
    options = gpu_targets.COMPILER_OPTIONS
  mesh = distributed.make_mesh(devices=devices)
  # The run builder checks the config first, as for training, before anything compiles. The
  # schedules' length shapes no array: a run given in epochs needs no dataset here.
  run = runs.build_run(config, mesh, num_steps=config.total_steps or 10 ** 6)
  n = mesh.size
  hosts = len({d.process_index for d in devices})
  state_bytes = run.state_bytes_per_device
  programs = []
  label = f"train step (global batch {config.global_batch}, {config.global_batch // n} per chip)"
  compiled, seconds = _compile(
      lambda: run.train_step.lower(run.abstract_state, run.abstract_batch()), options)
  programs.append(_oom_report(label, compiled, state_bytes, seconds)
                  if isinstance(compiled, tuple) else
                  analyse(label, compiled, n, state_bytes, chip, seconds))
  if evals != "none":
    from contrastive_jax.evaluate import streaming  # pylint: disable=g-import-not-at-top
    encoders = streaming.Encoders(run.method)
    for label, encoder, arg in _eval_programs(config, run, evals):
      batch = jax.ShapeDtypeStruct(arg["shape"], arg["dtype"], sharding=run.batch_sharding)
      fn = encoders.get(encoder, mesh)
      compiled, seconds = _compile(
          lambda fn=fn, batch=batch: fn.lower(run.abstract_state, batch), options)
      programs.append(_oom_report(label, compiled, state_bytes, seconds)
                      if isinstance(compiled, tuple) else
                      analyse(label, compiled, n, state_bytes, chip, seconds))
  usable = chip.hbm_bytes * (1.0 - headroom)
  step = programs[0].bound["step_s"]
  per_host = config.global_batch / hosts
  needed = per_host / step if step else float("nan")  # no bound: the step did not compile
  measured = input_rate is None
  if measured:
    from contrastive_jax.data import throughput  # pylint: disable=g-import-not-at-top
    input_rate = throughput.examples_per_core_second(config.data, run.method.input_mode,
                                                     seconds=measure_seconds)
  _, vcpus = chip.host(n)
  cores = needed / input_rate if input_rate else float("nan")
  return dict(
      config=name, target=target, chips=n, hosts=hosts, made=_provenance(chip),
      chip=dataclasses.asdict(chip), headroom=headroom, usable_hbm_bytes=usable,
      num_params=run.num_params, global_batch=int(config.global_batch),
      programs=[dataclasses.asdict(p) for p in programs],
      fits=all(p.total_bytes <= usable for p in programs),
      input=dict(examples_per_host_step=per_host, examples_per_host_second=needed,
                 per_core_rate=float(input_rate), per_core_rate_measured=measured,
                 cores_needed=cores, host_vcpus=vcpus,
                 kind="image-text pairs" if run.method.input_mode == "image_text"
                 else "images (two views each)"),
      strategy=config.sharding.strategy, remat=bool(config.remat))


def _provenance(chip: hardware.ChipSpec) -> dict[str, str]:
  """When and with which compiler a report was made (for tables assembled from saved JSON)."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  package = "jax-cuda12-plugin" if chip.kind == "gpu" else "libtpu"
  try:
    compiler = f"{package} {importlib.metadata.version(package)}"
  except importlib.metadata.PackageNotFoundError:
    compiler = package
  return dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), jax=jax.__version__,
              compiler=compiler)


def _gib(x: float) -> str:
  return f"{x / 2 ** 30:.2f}"


def _si(x: float, unit: str = "") -> str:
  for div, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= div:
      return f"{x / div:.2f} {prefix}{unit}"
  return f"{x:.0f} {unit}"


def cores_text(x: float) -> str:
  """Whole cores, or "n/a" without a bound."""
  return str(math.ceil(x)) if math.isfinite(x) else "n/a"


def _ms(x: float) -> str:
  return f"{x * 1e3:.3g} ms"


def format_report(rep: dict[str, Any]) -> str:
  """The report as the command prints it."""
  chip = rep["chip"]
  gpu = chip.get("kind") == "gpu"
  unit, link = ("GPU" if gpu else "chip"), chip.get("link", "ICI")
  lines = [f"{rep['config'] or 'config'} on {rep['target']}: {rep['chips']} {chip['name']} "
           f"{unit}s, {rep['hosts']} host(s); {rep['num_params'] / 1e6:.1f}M parameters, "
           f"state {rep['strategy']}, remat {rep['remat']}"]
  for p in rep["programs"]:
    b = p["bound"]
    lines.append(f"{p['name']}  [compiled in {p['compile_seconds']:.0f} s]")
    if not p["argument_bytes"] and p["total_bytes"]:
      lines.append(f"  memory per {unit}: the compiler ran out of HBM (used "
                   f"{_gib(p['total_bytes'])} GiB of {_gib(chip['hbm_bytes'])})")
      continue
    verdict = "fits" if p["total_bytes"] <= rep["usable_hbm_bytes"] else "DOES NOT FIT"
    lines.append(
        f"  memory per {unit} (GiB): state {_gib(p['state_bytes'])}, arguments "
        f"{_gib(p['argument_bytes'])}, outputs {_gib(p['output_bytes'])} ("
        f"{_gib(p['alias_bytes'])} aliased to arguments), temporaries {_gib(p['temp_bytes'])},"
        f" code {_gib(p['code_bytes'])}; total {_gib(p['total_bytes'])} of "
        f"{_gib(chip['hbm_bytes'])} HBM (usable {_gib(rep['usable_hbm_bytes'])} with "
        f"{rep['headroom']:.0%} headroom): {verdict}")
    loops = ", ".join(f"{x['trip_count'] if x['trip_count'] is not None else '?'}x"
                      for x in p["loops"]) or "none"
    if p.get("flops_counted") == "matrix products":
      how = "matrix products only: XLA:GPU has no cost model"
    else:
      how = f"cost model {_si(p['cost_model_flops'])}"
    lines.append(f"  FLOPs per {unit}: {_si(p['flops'])} ({how}; loops by trip count: {loops})")
    coll = "; ".join(f"{k} {int(v['count'])} ops {_si(v['bytes'], 'B')}"
                     for k, v in p["collectives"].items() if v["count"])
    lines.append(f"  collectives per {unit}: {coll or 'none'}")
    hbm = _ms(b["hbm_s"]) if p["bytes_accessed"] else "n/a (no bytes-accessed figure)"
    lines.append(
        f"  roofline: compute {_ms(b['compute_s'])}, HBM {hbm}, {link} "
        f"{_ms(b['ici_s'])} -> >= {_ms(b['step_s'])} ({b['limiter']}-bound); FLOP "
        f"utilisation ceiling {b['flops_utilisation_ceiling']:.0%}")
  i = rep["input"]
  how = "measured, one core, synthetic JPEGs" if i["per_core_rate_measured"] else "given"
  vcpus = f"{i['host_vcpus']} vCPUs" if i["host_vcpus"] else "vCPUs (unknown)"
  lines.append(
      f"input: {i['examples_per_host_step']:.0f} {i['kind']} per host per step -> "
      f"{i['examples_per_host_second']:.0f}/s per host at the bound; one core decodes "
      f"{i['per_core_rate']:.0f}/s ({how}) -> {cores_text(i['cores_needed'])} cores of the "
      f"host's {vcpus}")
  links = "one direction" if gpu else f"{chip['ici_links']} links"
  lines.append(
      f"figures: {chip['name']} {chip['peak_bf16_flops'] / 1e12:.0f} TFLOP/s bf16, "
      f"{_gib(chip['hbm_bytes'])} GiB HBM at {chip['hbm_bw_bytes_s'] / 1e9:.0f} GB/s, {link} "
      f"{chip['ici_bw_bytes_s'] / 1e9:.0f} GB/s per {unit} ({links}); "
      f"{chip['source']}. FLOPs include rematerialisation; HBM traffic is the compiler's "
      "bytes accessed (loop bodies once); collective bytes assume ring algorithms.")
  if gpu:
    lines[-1] = lines[-1].replace("HBM traffic is the compiler's bytes accessed (loop bodies "
                                  "once)", "XLA:GPU counts no HBM traffic")
  if gpu:
    lines.append("Nothing here has run on a GPU: memory is XLA:GPU's buffer assignment for the "
                 "described device (no autotuning, cuBLAS GEMMs); the bound is a floor, not a "
                 "forecast.")
  return "\n".join(lines)


def fixes(rep: dict[str, Any], config) -> str:
  """The one line naming what to change when a program does not fit."""
  worst = max(rep["programs"], key=lambda p: p["total_bytes"])
  options = []
  if config.sharding.strategy != "fsdp":
    options.append("shard the state: --config.sharding.strategy=fsdp")
  if not config.remat:
    options.append("recompute activations: --config.remat=True")
  per_chip = config.global_batch // rep["chips"]
  if per_chip > 1:
    options.append(f"a smaller per-chip batch: --config.global_batch="
                   f"{max(rep['chips'], config.global_batch // 2)} (or "
                   f"--config.grad_cache.micro_batches=2 and up, same batch)")
  options.append("a bigger slice: --topology=<more chips>")
  return (f"does not fit: {worst['name']} needs {_gib(worst['total_bytes'])} GiB per chip, "
          f"{_gib(rep['usable_hbm_bytes'])} usable of {_gib(rep['chip']['hbm_bytes'])} on "
          f"{rep['target']}; try " + "; or ".join(options))


# ----------------------------------------------------------------------------- command line


def _define_flags():
  configs.accept_none_overrides()
  config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
  flags.DEFINE_string("topology", None, "TPU slice, e.g. v5e-256, v5litepod-64, v4-32, "
                      "v5e:8x8 (default: the config's pod), or a GPU node: 8xa100-80gb, "
                      "8xh100-80gb, 1xrtx4090 (contrastive_jax/gpu_targets.py).")
  flags.DEFINE_string("json", None, "Also write the report as JSON to this path.")
  flags.DEFINE_float("input_rate", None, "Training examples/s one host core decodes (skips "
                     "measuring it).")
  flags.DEFINE_enum("evals", "all", EVAL_CHOICES, "Evaluator programs to compile too.")
  flags.DEFINE_float("headroom", DEFAULT_HEADROOM, "Fraction of HBM left free.")


def normalise_argv(argv: list[str]) -> list[str]:
  """A leading config path becomes ``--config=PATH`` (``configs.resolve``d); ``--input-rate``
  style flags get underscores (absl's spelling)."""
  out = [argv[0]]
  for i, arg in enumerate(argv[1:]):
    if i == 0 and not arg.startswith("-"):
      arg = f"--config={arg}"
    elif arg.startswith("--") and not arg.startswith("--config"):
      flag, sep, value = arg.partition("=")
      arg = flag.replace("-", "_").replace("__", "--", 1) + sep + value
    out.append(arg)
  return configs.resolve_argv(out)


def target_devices(name: str) -> tuple[list, hardware.ChipSpec, str]:
  """``(devices, chip figures, label)`` of ``--topology``: a GPU node named in
  ``gpu_targets.TARGETS`` (``8xa100-80gb``, ``8xh100``, ``rtx4090``, ...: XLA:GPU through jax's
  CUDA plugin) or a TPU slice (``hardware.parse_topology``: libtpu). Everything after this
  (mesh, run, compile, report) is the same for both.
  """
  from contrastive_jax import gpu_targets  # pylint: disable=g-import-not-at-top
  gpu = gpu_targets.canonical_name(name)
  if gpu is not None:
    model, count = gpu_targets.TARGETS[gpu]
    return (gpu_targets.gpu_devices(gpu), gpu_targets.chip_spec(gpu),
            f"{gpu} ({count} x {model.description})")
  try:
    topo = hardware.parse_topology(name)
  except errors.ConfigError as error:
    raise errors.ConfigError(f"{error}; or a GPU node: {', '.join(gpu_targets.TARGETS)}"
                             ) from None
  return hardware.tpu_devices(topo), topo.chip, f"{name} ({topo.libtpu_name})"


def main(argv):
  del argv
  try:
    _main()
  except errors.UserError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(errors.EXIT_CODE)


def _main():
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  # Compiling for a topology needs no local accelerator (and on a TPU VM a training job may
  # hold the chips): the local backend is the CPU.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_threefry_partitionable", True)
  config = FLAGS.config
  if config is None:
    raise errors.ConfigError("give a config: python -m contrastive_jax.compile_for "
                             "configs/<name>.py[:args] --topology=v5e-64")
  name = config_flags.get_config_filename(FLAGS["config"])
  topology = FLAGS.topology or config.get("pod")
  if not topology:
    raise errors.ConfigError(f"{name} names no pod (config.pod); pass --topology=v5e-64 or "
                             "another TPU slice, or a GPU node such as --topology=8xa100-80gb")
  devices, chip, label = target_devices(topology)
  rep = report(config, devices, chip, name=name, target=label,
               input_rate=FLAGS.input_rate, evals=FLAGS.evals, headroom=FLAGS.headroom)
  print(format_report(rep))
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(rep, f, indent=1, default=str)
  if not rep["fits"]:
    raise errors.ConfigError(fixes(rep, config))


if __name__ == "__main__":
  _define_flags()
  app.run(main, argv=normalise_argv(sys.argv))
