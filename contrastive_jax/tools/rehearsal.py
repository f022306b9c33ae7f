"""The plan of a rehearsal: a full-scale config shrunk to one CPU machine, and its data.

  python -m contrastive_jax.tools.rehearse configs/clip_vit_b32.py[:args] [--processes 2 ...]

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
a few corrupt records) and a SentencePiece model trained here (``write_data``), at the config's
``spm_model`` key. The text tower's vocabulary is then the tiny model's: a size (rows of the
embedding table), not an architecture change.

``contrastive_jax.tools.rehearse`` runs the plan as a pod (``local_pod.LocalPod``).
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any

import ml_collections

from contrastive_jax.errors import ConfigError

SPM_PIECES = 48          # the tiny SentencePiece model's own pieces (+3 special ids)
TFDS_EXAMPLES = 64       # mock examples per tfds split
TFRECORD_EXAMPLES = 48   # image-text records written, CORRUPT_RECORDS of them undecodable
CORRUPT_RECORDS = 2
TFRECORD_SHARDS = 4

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
