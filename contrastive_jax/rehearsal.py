"""Rehearsal of a full-scale config as a pod on one CPU machine, before paying for the pod.

  python launch/rehearse.py configs/clip_vit_b32.py[:args] [--processes 2 --devices 2 ...]

``derive`` builds the rehearsal config from the real one by changing only sizes that leave the
architecture alone: image size, global batch, number of steps, checkpoint interval, shuffle
window, warmup (the same fraction of the shorter run), evaluation (off) and the data paths.
Depth, width, heads, patch size, embedding sizes, optimizer, loss, BN, dtype, remat and
sharding stay the config's own. ``format_table`` prints what is real, what was shrunk and what a
CPU machine cannot rehearse.

The data is the config's real format: tfds configs read ``imagenet2012`` (or their own name)
through ``tfds.testing.mock_data`` (random examples with the dataset's real features, entered
by each worker process); image-text configs read TFRecord shards written by
``sources.write_image_text_tfrecords`` (real JPEG photographs from ``skimage.data``, captions,
a few corrupt records) and a SentencePiece model trained here, at the config's ``spm_model``
key. The text tower's vocabulary is then the tiny model's: a size (rows of the embedding
table), not an architecture change.

``rehearse`` then runs P processes x D simulated devices joined by ``jax.distributed`` over
127.0.0.1 with gloo collectives, three times: uninterrupted to step N; a second run in a fresh
directory whose last process gets SIGKILL once a checkpoint has committed; a restart of all
processes, which must resume from that checkpoint and log the same losses as the uninterrupted
run. Each phase is bounded by a timeout and every process is killed on failure. A persistent
XLA compilation cache per rehearsal (``<workdir>/xla_cache``) makes the second and third
starts reuse the first one's executables.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import ml_collections

from contrastive_jax import configs
from contrastive_jax.errors import ConfigError

SPM_PIECES = 48          # the tiny SentencePiece model's own pieces (+3 special ids)
TFDS_EXAMPLES = 64       # mock examples per tfds split
TFRECORD_EXAMPLES = 48   # image-text records written, CORRUPT_RECORDS of them undecodable
CORRUPT_RECORDS = 2
TFRECORD_SHARDS = 4
HEARTBEAT_S = 10         # a killed peer is noticed by the survivors within this

# Sections whose every key the rehearsal keeps (but text.kwargs.vocab_size, see above).
ARCHITECTURE_SECTIONS = ("method", "model", "text", "head", "predictor", "clip", "loss", "moco",
                         "dtype", "remat", "loss_impl", "loss_tile", "grad_cache", "sharding",
                         "seed")

# What one CPU machine cannot show, whatever the config.
NOT_REHEARSED = (
    ("accelerator collectives", "gloo over loopback stands in for TPU ICI / NCCL; the XLA "
     "programs are CPU programs, so TPU/GPU compiler limits are not exercised"),
    ("memory and throughput at full size", "batch and image size are shrunk; check HBM fit "
     "with benchmarks/ on the target accelerator"),
    ("bfloat16 numerics of the accelerator", "CPU emulates bfloat16 matmuls"),
    ("the real data", "mock or locally written examples; the dataset's size, reading speed "
     "and its real gs:// location are not touched (no network here)"),
    ("the full learning-rate schedule", "the run is a few steps; warmup keeps its fraction"),
    ("preemption notices of the cloud runtime", "SIGKILL of one process is rehearsed; "
     "maintenance events of a TPU VM are not"),
)


# Delayed ACKs on loopback and gloo's send buffers: at several processes x several devices, a
# reduce-scatter's small first message locks a gloo socket's SO_SNDBUF at the kernel's 4.5 KiB
# minimum, and a one-way ring link then moves one segment per delayed ACK (40 ms): ~1.6 MB/s,
# about 120 s a SimCLR ResNet-50 step. ``quickack 1`` on the loopback route removes the wait
# (docs/rehearsals_gloo.md, benchmarks/gloo_loopback.py).
QUICKACK_COMMAND = ("ip route change table local local 127.0.0.1 dev lo proto kernel scope host "
                    "src 127.0.0.1 quickack 1")


def loopback_route() -> str | None:
  """What ``ip route get 127.0.0.1`` prints (the route the pod's sockets use); None without
  the ``ip`` command."""
  try:
    return subprocess.run(["ip", "route", "get", "127.0.0.1"], capture_output=True, text=True,
                          timeout=10, check=False).stdout
  except (OSError, subprocess.SubprocessError):
    return None


def loopback_warning(processes: int, devices: int, route: str | None) -> str | None:
  """A warning when a P x D pod (P, D > 1) will stall on delayed ACKs over loopback, else None.

  ``route``: ``loopback_route()``'s text. One device per process does not stall (each gloo
  link then carries data both ways, so ACKs ride on the data), nor does one process.
  """
  if processes < 2 or devices < 2:
    return None
  if route is not None and re.search(r"\bquickack 1\b", route):
    return None
  seen = ("the loopback route could not be read (no `ip` command)" if route is None else
          "delayed ACKs are on for 127.0.0.1 (its route has no `quickack 1`)")
  return (f"WARNING: {seen}: at {processes} processes x {devices} devices a gloo link whose "
          "send buffer a small reduce-scatter locked at 4.5 KiB moves one segment per 40 ms "
          "delayed ACK, about 120 s a ResNet-50 step (docs/rehearsals_gloo.md). As root: "
          f"`{QUICKACK_COMMAND}` (until reboot), or rehearse with --devices 1.")


@dataclasses.dataclass
class Plan:
  """A rehearsal: its config, the changed keys ``[(key, real, rehearsal)]``, the kept
  architecture keys ``[(key, value)]`` and what it could not rehearse ``[(what, why)]``."""
  spec: str
  config: ml_collections.ConfigDict
  shrunk: list[tuple[str, Any, Any]]
  kept: list[tuple[str, Any]]
  not_rehearsed: list[tuple[str, str]]
  processes: int
  devices: int
  data_kind: str  # "tfds" | "tfrecord" | other sources (their own files)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict) and v:
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def default_image_size(config: ml_collections.ConfigDict) -> int:
  """32: a multiple of every patch size in the configs (16, 32) and of a ResNet-50's total
  stride (1 x 1 at the end). Pixels are most of a CPU step's time (bfloat16 convolutions are
  emulated on CPU), so the rehearsal uses the fewest that every architecture accepts."""
  del config
  return 32


def derive(config: ml_collections.ConfigDict, *, spec: str = "", processes: int = 2,
           devices: int = 2, steps: int = 4, checkpoint_every: int = 1,
           image_size: int | None = None, batch: int | None = None,
           data_dir: str = "/tmp/rehearsal_data") -> Plan:
  """The rehearsal ``Plan`` of ``config``; raises ``ConfigError`` for sizes that cannot run."""
  real = ml_collections.ConfigDict(config.to_dict())
  c = ml_collections.ConfigDict(config.to_dict())
  n_dev = processes * devices
  batch = batch or 2 * n_dev
  micro = int(c.grad_cache.micro_batches) if "grad_cache" in c else 1
  if batch % (n_dev * micro):
    raise ConfigError(f"--batch={batch} must be divisible by processes x devices "
                      f"({n_dev}) x grad_cache.micro_batches ({micro})")
  if steps < checkpoint_every + 2:
    raise ConfigError(f"--steps={steps} must exceed --checkpoint_every={checkpoint_every} by "
                      "2 or more, so that the killed run has steps left after its checkpoint")
  image_size = image_size or default_image_size(c)
  if c.data.get("tokenizer") == "clip_bpe" and not c.data.get("bpe_vocab"):
    from contrastive_jax.data import clip_bpe  # pylint: disable=g-import-not-at-top
    if not clip_bpe.default_vocab_path():
      raise ConfigError("data.tokenizer='clip_bpe' needs CLIP's BPE vocabulary: install "
                        "open_clip_torch (it ships bpe_simple_vocab_16e6.txt.gz) or set "
                        "--config.data.bpe_vocab")
  c.global_batch = batch
  c.total_steps = steps
  c.total_epochs = None
  c.num_devices = None
  c.stop_at_step = None
  c.log_every = 1
  c.profile_steps = 0
  c.checkpoint.every_steps = checkpoint_every
  c.eval.enabled = False
  c.data.image_size = image_size
  # Warmup keeps its fraction of the run (the real run's length from its epochs when needed).
  if int(c.optim.warmup_steps):
    real_steps = _real_steps(real)
    c.optim.warmup_steps = max(1, min(steps - 1, round(
        steps * int(real.optim.warmup_steps) / real_steps))) if real_steps else 1
  if "moco" in c and c.moco.get("schedule_steps") is not None:
    c.moco.schedule_steps = steps
  data_kind = c.data.source
  if data_kind == "tfds":
    c.data.data_dir = ""  # mock_data replaces the prepared files
    c.data.shuffle_buffer = min(int(c.data.shuffle_buffer), TFDS_EXAMPLES)
  elif data_kind == "tfrecord":
    c.data.path = os.path.join(data_dir, "{split}-*.tfrecord")
    c.data.shuffle_buffer = min(int(c.data.shuffle_buffer), TFRECORD_EXAMPLES)
    c.data.cycle_length = min(int(c.data.cycle_length), TFRECORD_SHARDS)
    c.data.mix_paths, c.data.mix_weights = (), ()
    if c.data.tokenizer == "sentencepiece":
      c.data.spm_model = os.path.join(data_dir, "spm.model")
      if "text" in c:
        c.text.kwargs.vocab_size = SPM_PIECES + 3
  if "init_from" in c and c.init_from.get("path"):
    # A pretrained tower (LiT): a stand-in file of the real architecture, written by
    # ``write_data`` from a random initialisation in the converted format init_from reads.
    c.init_from.path = os.path.join(data_dir, "pretrained.safetensors")
  flat_real, flat = _flatten(real.to_dict()), _flatten(c.to_dict())
  shrunk = [(k, flat_real.get(k), v) for k, v in flat.items() if flat_real.get(k) != v]
  kept = [(k, v) for k, v in flat.items()
          if k.split(".")[0] in ARCHITECTURE_SECTIONS and flat_real.get(k) == v]
  not_rehearsed = list(NOT_REHEARSED)
  if real.eval.enabled:
    not_rehearsed.append(("in-training evaluation", "turned off: the evaluators need the "
                          "real evaluation split"))
  if c.init_from.get("path"):
    not_rehearsed.append(("the pretrained weights", f"init_from.path={real.init_from.path!r} "
                          "is replaced by a random initialisation of the same architecture "
                          "in the same converted format; locking and loading are rehearsed, "
                          "the checkpoint's own values are not"))
  if data_kind not in ("tfds", "tfrecord"):
    not_rehearsed.append((f"data.source={data_kind!r}", "read from the config's own paths"))
  return Plan(spec=spec, config=c, shrunk=shrunk, kept=kept, not_rehearsed=not_rehearsed,
              processes=processes, devices=devices, data_kind=data_kind)


def _real_steps(real: ml_collections.ConfigDict) -> int | None:
  if real.total_steps is not None:
    return int(real.total_steps)
  if real.total_epochs is not None and real.data.source == "tfds" and \
      real.data.name == "imagenet2012":
    from contrastive_jax.configs import common  # pylint: disable=g-import-not-at-top
    return int(real.total_epochs * common.IMAGENET_TRAIN_EXAMPLES / real.global_batch)
  return None


def _short(value: Any, width: int = 44) -> str:
  text = repr(value) if isinstance(value, str) else str(value)
  return text if len(text) <= width else text[:width - 3] + "..."


def format_table(plan: Plan) -> str:
  """The plain-text report: the pod layout, what was shrunk, what is real, what is not
  rehearsed and why."""
  lines = [f"rehearsal of {plan.spec or 'the config'}: {plan.processes} processes x "
           f"{plan.devices} simulated CPU devices, jax.distributed over 127.0.0.1 (gloo)", "",
           "SHRUNK (real -> rehearsal):"]
  for key, was, now in plan.shrunk:
    note = ""
    if key == "text.kwargs.vocab_size":
      note = "  (the tiny SentencePiece model's size: embedding rows, not architecture)"
    lines.append(f"  {key:32s} {_short(was):>30s} -> {_short(now)}{note}")
  lines += ["", "REAL (unchanged architecture, optimizer, loss, BN, dtype, sharding):"]
  optim = plan.config.optim
  lines.append(f"  optimizer {optim.name}, base_lr {optim.base_lr} ({optim.lr_scaling} scaling), "
               f"schedule {optim.schedule}, weight_decay {optim.weight_decay}")
  for key, value in plan.kept:
    lines.append(f"  {key:32s} {_short(value, 70)}")
  data = plan.config.data
  how = {"tfds": f"tfds {data.name!r} through tfds.testing.mock_data ({TFDS_EXAMPLES} random "
                 "examples with the dataset's real features)",
         "tfrecord": f"image-text TFRecords ({TFRECORD_SHARDS} shards + index, "
                     f"{TFRECORD_EXAMPLES} real JPEGs with captions, {CORRUPT_RECORDS} corrupt), "
                     f"tokenizer {data.tokenizer!r}"}.get(plan.data_kind, plan.data_kind)
  lines += [f"  data: {how}; recipe {data.recipe!r}, context_length {data.context_length}",
            "", "NOT REHEARSED (and why):"]
  lines += [f"  - {what}: {why}" for what, why in plan.not_rehearsed]
  return "\n".join(lines)


# ----------------------------------------------------------------------------- data


CAPTION_WORDS = ("a photo of", "a close-up of", "a blurry picture of", "an old photograph of",
                 "a drawing of", "a bright image of")
EXTRA_TEXT = ("the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor "
              "jugs. Zwei Boxkampfer jagen Eva quer durch Sylt, 0123456789")
CAPTION_THINGS = ("an astronaut", "a cup of coffee", "a cat", "a camera man", "a rocket",
                  "a tabby cat sitting", "a space suit", "a latte on a table")


def _photos(size: int = 96) -> list:
  """Real photographs bundled with scikit-image, as RGB uint8 [size, size, 3]."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import skimage.data  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out = []
  for name in ("astronaut", "coffee", "chelsea", "camera", "rocket", "cat"):
    try:
      image = np.asarray(getattr(skimage.data, name)())
    except Exception:  # noqa: BLE001 -- an image that needs a download is left out
      continue
    if image.ndim == 2:
      image = np.stack([image] * 3, axis=-1)
    out.append(np.asarray(Image.fromarray(image[..., :3]).resize((size, size))))
  if not out:
    raise RuntimeError("scikit-image has no bundled photographs here")
  return out


def write_pretrained(plan: Plan) -> str:
  """For a config that starts from converted weights (``init_from``): writes a random
  initialisation (seed 123, not the run's) of its own architecture to ``init_from.path`` with
  ``convert.core.save_converted``, the format ``init_from`` reads. Returns the path."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from contrastive_jax import distributed, methods  # pylint: disable=g-import-not-at-top
  from contrastive_jax.convert import core  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(plan.config.to_dict())
  config.num_devices = 1
  method = methods.build_method(config, distributed.make_mesh(1))
  variables = jax.jit(lambda k: method.model.init(k, *method.example_inputs(), train=False))(
      jax.random.key(123))
  flat = {k: np.asarray(v) for k, v in core.flatten(dict(variables)).items()}
  core.save_converted(config.init_from.path, {"kind": config.method}, flat)
  return config.init_from.path


def write_data(plan: Plan, data_dir: str) -> dict[str, Any]:
  """Writes the rehearsal's files (TFRecord configs: shards, index, SentencePiece model; a
  stand-in pretrained file for ``init_from``); returns what was written."""
  out: dict[str, Any] = {}
  if plan.config.get("init_from") and plan.config.init_from.get("path"):
    os.makedirs(data_dir, exist_ok=True)
    out["pretrained"] = write_pretrained(plan)
  if plan.data_kind != "tfrecord":
    return out
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from contrastive_jax.data import sources  # pylint: disable=g-import-not-at-top
  os.makedirs(data_dir, exist_ok=True)
  rng = np.random.default_rng(0)
  photos = _photos()
  examples, captions = [], []
  corrupt_at = set(np.linspace(5, TFRECORD_EXAMPLES - 5, CORRUPT_RECORDS).astype(int).tolist())
  for i in range(TFRECORD_EXAMPLES):
    caption = f"{CAPTION_WORDS[i % len(CAPTION_WORDS)]} {CAPTION_THINGS[i % len(CAPTION_THINGS)]}"
    captions.append(caption)
    if i in corrupt_at:
      examples.append((b"\xff\xd8\xff not a complete jpeg", caption))
      continue
    photo = photos[i % len(photos)]
    if i % 2:
      photo = photo[:, ::-1]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(photo)).save(buf, format="JPEG",
                                                     quality=int(rng.integers(70, 95)))
    examples.append((buf.getvalue(), caption))
  files = sources.write_image_text_tfrecords(
      examples, os.path.join(data_dir, plan.config.data.train_split), TFRECORD_SHARDS)
  out.update(tfrecord_files=files, corrupt_records=sorted(corrupt_at))
  if plan.config.data.tokenizer == "sentencepiece":
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    model = io.BytesIO()
    corpus = captions + [" ".join(CAPTION_WORDS + CAPTION_THINGS), EXTRA_TEXT] * 4
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus * 4), model_writer=model,
                                   vocab_size=SPM_PIECES, model_type="unigram",
                                   character_coverage=1.0, hard_vocab_limit=True,
                                   minloglevel=2)
    path = plan.config.data.spm_model
    with open(path, "wb") as f:
      f.write(model.getvalue())
    out["spm_model"] = path
  return out


# ----------------------------------------------------------------------------- the pod


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class _Pod:
  """P worker processes of one phase; ``stop()`` kills every one still alive."""

  def __init__(self, plan: Plan, config_path: str, workdir: str, log_dir: str, cache_dir: str):
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={plan.devices}",
               JAX_COMPILATION_CACHE_DIR=cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", CUDA_VISIBLE_DEVICES="")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    os.makedirs(log_dir, exist_ok=True)
    self.log_paths = [os.path.join(log_dir, f"process_{i}.log") for i in range(plan.processes)]
    self.procs = []
    for i, log_path in enumerate(self.log_paths):
      argv = [sys.executable, "-m", "contrastive_jax.rehearsal", "worker",
              f"--config_json={config_path}", f"--workdir={workdir}",
              f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={plan.processes}",
              f"--process_id={i}"]
      with open(log_path, "w") as log:
        self.procs.append(subprocess.Popen(argv, env=env, stdout=log,
                                           stderr=subprocess.STDOUT))

  def logs(self) -> list[str]:
    out = []
    for path in self.log_paths:
      with open(path, errors="replace") as f:
        out.append(f.read())
    return out

  def tails(self, n: int = 2500) -> str:
    return "\n".join(f"--- {p} (rc={q.poll()}) ---\n{log[-n:]}"
                     for p, q, log in zip(self.log_paths, self.procs, self.logs()))

  def wait(self, deadline: float) -> list[int | None]:
    while time.time() < deadline and any(p.poll() is None for p in self.procs):
      if any(p.poll() not in (None, 0) for p in self.procs):
        break  # one failed: the others would only wait for it
      time.sleep(0.2)
    return [p.poll() for p in self.procs]

  def stop(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def _committed_steps(workdir: str) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _summary_losses(workdir: str) -> dict[int, float]:
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  return {int(h["step"]): float(h["loss"]) for h in summary["train_history"]}


class RehearsalError(RuntimeError):
  pass


def rehearse(plan: Plan, workdir: str, *, timeout_s: float = 1800, rtol: float = 1e-5,
             log=print) -> dict[str, Any]:
  """Runs the three phases (see the module docstring); returns timings and the compared
  losses, or raises ``RehearsalError`` naming the phase with the workers' log tails."""
  from contrastive_jax import checkpoint  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(workdir)
  data_dir = os.path.join(workdir, "data")
  if plan.data_kind == "tfrecord" and not plan.config.data.path.startswith(data_dir):
    raise ConfigError(f"the plan's data paths are not under {data_dir}; derive it with "
                      f"data_dir={data_dir!r}")
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  written = write_data(plan, data_dir)
  config_path = os.path.join(workdir, "rehearsal_config.json")
  with open(config_path, "w") as f:
    json.dump(checkpoint.to_jsonable(plan.config), f, indent=1)
  cache_dir = os.path.join(workdir, "xla_cache")
  deadline = time.time() + timeout_s
  steps = int(plan.config.total_steps)
  result: dict[str, Any] = {"data": written, "seconds": {"data": time.time() - t0}}

  def phase(name: str, run_dir: str, kill=False):
    t = time.time()
    log(f"[rehearse] phase {name}: {plan.processes} processes ...")
    pod = _Pod(plan, config_path, run_dir, os.path.join(workdir, "logs", name), cache_dir)
    try:
      if kill:
        while time.time() < deadline:
          if _committed_steps(run_dir) or any(p.poll() is not None for p in pod.procs):
            break
          time.sleep(0.05)
        committed = _committed_steps(run_dir)
        if not committed or pod.procs[-1].poll() is not None:
          raise RehearsalError(f"phase {name}: no checkpoint committed while every process "
                               f"was running (committed: {committed}); raise --steps\n"
                               + pod.tails())
        pod.procs[-1].send_signal(signal.SIGKILL)
        pod.procs[-1].wait()
        result["killed_after_committed"] = committed
        log(f"[rehearse] SIGKILL to process {plan.processes - 1} (committed checkpoints: "
            f"{committed})")
        # The survivors notice the dead peer (heartbeat) and exit; bounded here too.
        until = min(deadline, time.time() + HEARTBEAT_S + 120)
        while time.time() < until and any(p.poll() is None for p in pod.procs):
          time.sleep(0.2)
        rcs = [p.poll() for p in pod.procs]
        result["survivor_exit_codes"] = rcs[:-1]
        if any(rc is None for rc in rcs):
          log(f"[rehearse] survivors still running {HEARTBEAT_S + 120} s after the kill: "
              "killed")
        elif any(rc == 0 for rc in rcs[:-1]):
          raise RehearsalError(f"phase {name}: a survivor of the killed process exited 0 "
                               "(it should notice its dead peer)\n" + pod.tails())
      else:
        rcs = pod.wait(deadline)
        if rcs != [0] * plan.processes:
          hint = (" -9 without our kill: the OS killed it, usually for memory; rehearse with "
                  "fewer --devices per process") if -9 in rcs else ""
          raise RehearsalError(f"phase {name}: exit codes {rcs} (None: still running at the "
                               f"deadline;{hint})\n" + pod.tails())
      return pod.logs()
    finally:
      pod.stop()
      result["seconds"][name] = time.time() - t
      log(f"[rehearse] phase {name}: {result['seconds'][name]:.0f} s")

  reference_dir, resumed_dir = os.path.join(workdir, "uninterrupted"), os.path.join(workdir,
                                                                                  "resumed")
  phase("uninterrupted", reference_dir)
  reference = _summary_losses(reference_dir)
  # Only the losses are compared: the real architectures' checkpoints are gigabytes.
  shutil.rmtree(os.path.join(reference_dir, "checkpoints"), ignore_errors=True)
  if sorted(reference) != list(range(1, steps + 1)):
    raise RehearsalError(f"uninterrupted run logged steps {sorted(reference)}")
  phase("killed", resumed_dir, kill=True)
  logs = phase("restart", resumed_dir)
  m = re.search(r"resumed from checkpoint step (\d+)", logs[0])
  if not m:
    raise RehearsalError("the restart did not resume from a checkpoint\n" + logs[0][-3000:])
  resumed_from = int(m.group(1))
  got = _summary_losses(resumed_dir)
  if sorted(got) != list(range(resumed_from + 1, steps + 1)) or not got:
    raise RehearsalError(f"the restart from step {resumed_from} logged steps {sorted(got)}, "
                         f"expected {resumed_from + 1}..{steps}")
  worst = 0.0
  for step, loss in got.items():
    want = reference[step]
    if not (abs(loss - want) <= rtol * abs(want)):
      raise RehearsalError(f"step {step}: resumed loss {loss!r} != uninterrupted {want!r} "
                           f"(rtol {rtol})")
    worst = max(worst, abs(loss - want) / max(abs(want), 1e-30))
  result.update(resumed_from=resumed_from, reference_losses=reference, resumed_losses=got,
                max_rel_diff=worst, total_seconds=time.time() - t0)
  return result


# ----------------------------------------------------------------------------- worker


def _worker(args) -> None:
  """One process of the pod: distributed init, the mock tfds context, the trainer."""
  from contrastive_jax import checkpoint  # pylint: disable=g-import-not-at-top
  checkpoint.quiet_orbax_logs()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_threefry_partitionable", True)
  from absl import logging  # pylint: disable=g-import-not-at-top
  from contrastive_jax import distributed, train  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  logging.use_absl_handler()
  distributed.initialize_distributed(args.coordinator_address, args.num_processes,
                                     args.process_id, "gloo", heartbeat_timeout_s=HEARTBEAT_S,
                                     shutdown_timeout_s=60)
  # Gloo creates a communicator at its first collective and gives up after 30 s if a peer is
  # not there yet. On a loaded CPU machine a restarted process can be that far behind (one
  # loads executables from the compilation cache while the other still imports): meet once
  # here, right after start-up, where the processes are together.
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  multihost_utils.sync_global_devices("rehearsal worker started")
  with open(args.config_json) as f:
    config = configs.config_from_json(json.load(f))
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  context = contextlib.nullcontext()
  if config.data.source == "tfds":
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    context = tfds.testing.mock_data(num_examples=TFDS_EXAMPLES)
  with context:
    result = train.train_and_evaluate(config, args.workdir)
  logging.info("finished: %s", result.summary is not None)


# ----------------------------------------------------------------------------- command line


def parse_args(argv):
  p = argparse.ArgumentParser(
      prog="launch/rehearse.py", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("config", help="configs/NAME.py[:args] or the path of your own config")
  p.add_argument("--processes", type=int, default=2)
  p.add_argument("--devices", type=int, default=2, help="simulated CPU devices per process")
  p.add_argument("--steps", type=int, default=4)
  p.add_argument("--checkpoint_every", type=int, default=1)
  p.add_argument("--image_size", type=int, default=None, help="default 32")
  p.add_argument("--batch", type=int, default=None, help="global batch; default 2 per device")
  p.add_argument("--workdir", default=None, help="default /tmp/rehearsal_<config name>")
  p.add_argument("--timeout_s", type=float, default=1800)
  p.add_argument("--rtol", type=float, default=1e-5)
  p.add_argument("--plan_only", action="store_true", help="print the table and exit")
  return p.parse_args(argv)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv and argv[0] == "worker":
    p = argparse.ArgumentParser()
    for name in ("config_json", "workdir", "coordinator_address"):
      p.add_argument(f"--{name}", required=True)
    p.add_argument("--num_processes", type=int, required=True)
    p.add_argument("--process_id", type=int, required=True)
    _worker(p.parse_args(argv[1:]))
    return 0
  args = parse_args(argv)
  name = os.path.basename(args.config.split(":")[0])[:-3]
  workdir = os.path.abspath(args.workdir or f"/tmp/rehearsal_{name}")
  try:
    plan = derive(configs.load_config(args.config), spec=args.config,
                  processes=args.processes, devices=args.devices, steps=args.steps,
                  checkpoint_every=args.checkpoint_every, image_size=args.image_size,
                  batch=args.batch, data_dir=os.path.join(workdir, "data"))
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(format_table(plan), flush=True)
  warning = loopback_warning(plan.processes, plan.devices, loopback_route())
  if warning:
    print(warning, file=sys.stderr, flush=True)
  if args.plan_only:
    return 0
  if os.path.exists(workdir) and os.listdir(workdir):
    print(f"error: --workdir {workdir} is not empty; a rehearsal starts fresh", file=sys.stderr)
    return 2
  try:
    out = rehearse(plan, workdir, timeout_s=args.timeout_s, rtol=args.rtol,
                   log=lambda s: print(s, flush=True))
  except RehearsalError as e:
    print(f"REHEARSAL FAILED: {e}", file=sys.stderr)
    return 1
  secs = out["seconds"]
  print(f"\nREHEARSAL PASSED: {name} in {out['total_seconds']:.0f} s (uninterrupted "
        f"{secs['uninterrupted']:.0f} s, killed {secs['killed']:.0f} s, restart "
        f"{secs['restart']:.0f} s); killed after checkpoints {out['killed_after_committed']}, "
        f"resumed from step {out['resumed_from']}; losses of steps "
        f"{min(out['resumed_losses'])}..{max(out['resumed_losses'])} equal the uninterrupted "
        f"run's (max relative difference {out['max_rel_diff']:.1e}); logs: {workdir}/logs")
  return 0


if __name__ == "__main__":
  sys.exit(main())
