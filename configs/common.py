"""Shared config pieces: ``parse_arg`` for ``--config=configs/x.py:key=value,...`` and the defaults
every run has (logging, checkpoints, evaluation). Configs call ``base_config()`` then fill in the
method, model, data and optimizer."""

from __future__ import annotations

import ml_collections

# ImageNet-1k train split size, for configs that count their run in epochs of ImageNet.
IMAGENET_TRAIN_EXAMPLES = 1_281_167


def parse_arg(arg: str | None, **defaults):
  """``"quick,batch=512"`` -> ConfigDict(quick=True, batch=512, ...) over ``defaults``.

  A bare word is a boolean switch; ``key=value`` values are parsed as int, float, bool or str
  with the type of the default.
  """
  out = ml_collections.ConfigDict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, _, value = part.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    if not _:
      out[key] = True
      continue
    kind = type(defaults[key])
    if kind is bool:
      out[key] = value.lower() in ("1", "true", "yes")
    elif defaults[key] is None:
      out[key] = value
    else:
      out[key] = kind(value)
  return out


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_devices = ml_collections.config_dict.placeholder(int)  # None: all devices
  c.dtype = "float32"           # compute dtype of models and heads; params stay float32
  c.remat = False
  c.loss_impl = "all_gather"    # or "ring": memory-bounded InfoNCE (ring_losses.py)
  # GradCache (grad_cache.py; SimCLR and CLIP): M > 1 computes the global batch's loss and
  # gradient in M micro-batches, holding one micro-batch's activations at a time. Exact without
  # BN; global_batch must be divisible by M x devices.
  c.grad_cache = ml_collections.ConfigDict(dict(micro_batches=1))
  # Placement of the train state (contrastive_jax/sharding.py): "replicated" (every device holds
  # it all) or "fsdp" (large leaves and their optimizer moments split over the "data" axis;
  # leaves under min_size elements replicated). rules: ((regex on the state path, "fsdp" |
  # "replicate" | (None, "data")), ...), first match wins, before the strategy's default.
  c.sharding = ml_collections.ConfigDict(dict(strategy="replicated", rules=(),
                                              min_size=2 ** 14))
  c.total_steps = ml_collections.config_dict.placeholder(int)
  c.total_epochs = ml_collections.config_dict.placeholder(float)
  c.log_every = 50
  # Exit cleanly (checkpoint saved) at this step, as on preemption: for jobs with a time limit.
  c.stop_at_step = ml_collections.config_dict.placeholder(int)
  # True: a step whose loss, gradients or new parameters are NaN/inf leaves the state unchanged
  # and is counted in summary['nonfinite_skipped']; False: the run stops with
  # NonFiniteLossError (no checkpoint of the bad state is written).
  c.skip_nonfinite = False
  c.profile_steps = 0
  # preemption_check_every: on multi-host runs without jax's preemption service, the steps
  # between the cross-host checks for a SIGTERM (checkpoint.reached_preemption).
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, max_to_keep=3,
                                                async_save=True, preemption_check_every=10))
  c.eval = ml_collections.ConfigDict(dict(
      enabled=True, every_steps=0, batch_size=512, knn_k=200, knn_temperature=0.07,
      few_shots=(10,), raw_pixel_baseline=False,
      embedding_plot="pca"))  # PNG of the test features at the end: "pca", "tsne" or ""
  return c


def data_config(source: str, *, recipe: str, image_size: int, **overrides):
  """``config.data`` with every key the pipeline reads; ``overrides`` set any of them.

  Keys: source ("mnist" | "tfds" | "folder" | "csv" | "tfrecord"), name (tfds name), the
  splits, data_dir (tfds, local or gs://), path (folder / CSV / TFRecord glob, ``{split}`` is
  replaced), image_size, recipe and ``augment`` overrides (data/augment.py), shuffle_buffer,
  skip_corrupt (skip and count undecodable images instead of failing), the text settings
  (context_length, tokenizer "bytes" | "sentencepiece", spm_model) and cache (hold a
  tfds/TFRecord split in memory for exact random access).
  """
  # String keys default to "" (not None), so that --config.data.<key>=... can override them;
  # the field names and types follow pipeline.default_data_config().
  d = dict(source=source, name="mnist_embedded" if source == "mnist" else "",
           train_split="train", eval_split="test", data_dir="", path="",
           image_size=image_size, recipe=recipe, augment={}, shuffle_buffer=10_000,
           skip_corrupt=False, context_length=77, tokenizer="bytes", spm_model="",
           cache=source in ("mnist", "folder", "csv"), image_key="image", label_key="label",
           caption_key="", csv_image_key="filepath", csv_caption_key="caption",
           csv_delimiter=",", split_seed=0, num_parallel_calls=-1, prefetch=2)
  unknown = set(overrides) - set(d)
  if unknown:
    raise ValueError(f"unknown data config keys {sorted(unknown)}; known: {sorted(d)}")
  d.update(overrides)
  return ml_collections.ConfigDict(d)
