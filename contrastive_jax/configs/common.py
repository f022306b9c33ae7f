"""Shared config pieces: ``parse_arg`` for ``--config=configs/x.py:key=value,...`` and the one
source of every default the code reads.

A config starts from ``base_config()`` (run length, logging, checkpoints, evaluation) and builds
its ``data`` and ``optim`` sections with ``data_config`` and ``optim_config``, which declare every
key the pipeline and the optimizer read. The library reads these keys directly, never with a
default of its own, so each key can be set from the command line
(``--config.optim.grad_clip_norm=1.0``). A setting that may be absent is a typed placeholder
(``placeholder(int)``): it is None by default, can be set to a number, and back to None
(``--config.total_steps=None --config.total_epochs=100``). One exception: the settings of an
evaluator type (kNN's ``k``, the probes' ``shots``, ...) default in its module
(``evaluate/evaluators/<type>.py``, as in big_vision), so an entry of ``config.eval.evaluators``
names only what it changes; a key it names can then be set from the command line.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

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
  c.num_devices = placeholder(int)  # None: all devices
  # The TPU slice the config was sized for (hardware.parse_topology: "v5e-64", "v4-32", ...):
  # python -m contrastive_jax.compile_for compiles for it by default. "" = none named.
  c.pod = ""
  c.dtype = "float32"           # compute dtype of models and heads; params stay float32
  c.remat = False
  c.loss_impl = "all_gather"    # or "ring": memory-bounded InfoNCE (losses/ring.py)
  # With loss_impl="ring": each device's block in [loss_tile, loss_tile] pieces (Inf-CL,
  # Cheng et al. 2024), so the loss's memory is O(n x D + tile^2); 0 = whole blocks.
  c.loss_tile = 0
  # How the InfoNCE losses treat negatives (losses.NegativeOptions; defaults: InfoNCE):
  # debias_tau_plus (Chuang et al. 2020), hard_beta (Robinson et al. 2021), decoupled (Yeh et
  # al. 2022) for SimCLR, MoCo v2 and CLIP; multi_positive "labels" (SimCLR: SupCon, Khosla et
  # al. 2020) or "captions" (CLIP/SigLIP: identical captions are positives). diagnostics: log
  # the fraction of same-class negatives and their similarity when batches carry labels.
  c.negatives = ml_collections.ConfigDict(dict(
      debias_tau_plus=0.0, hard_beta=0.0, decoupled=False, multi_positive="none",
      diagnostics=True))
  # GradCache (grad_cache.py; SimCLR and CLIP): M > 1 computes the global batch's loss and
  # gradient in M micro-batches, holding one micro-batch's activations at a time. Exact without
  # BN; global_batch must be divisible by M x devices.
  c.grad_cache = ml_collections.ConfigDict(dict(micro_batches=1))
  # Placement of the train state (contrastive_jax/sharding.py): "replicated" (every device holds
  # it all) or "fsdp" (large leaves and their optimizer moments split over the "data" axis;
  # leaves under min_size elements replicated). rules: ((regex on the state path, "fsdp" |
  # "replicate" | (None, "data")), ...), first match wins, before the strategy's default.
  # view: under "fsdp", split a leaf no dimension of which the device count divides over a
  # factored view of the devices (True) or keep it whole on every device (False).
  c.sharding = ml_collections.ConfigDict(dict(strategy="replicated", rules=(),
                                              min_size=2 ** 14, view=True))
  c.total_steps = placeholder(int)
  c.total_epochs = placeholder(float)
  c.log_every = 50
  # Exit cleanly (checkpoint saved) at this step, as on preemption: for jobs with a time limit.
  c.stop_at_step = placeholder(int)
  # True: a step whose loss, gradients or new parameters are NaN/inf leaves the state unchanged
  # and is counted in summary['nonfinite_skipped']; False: the run stops with
  # NonFiniteLossError (no checkpoint of the bad state is written).
  c.skip_nonfinite = False
  c.profile_steps = 0
  # preemption_check_every: on multi-host runs without jax's preemption service, the steps
  # between the cross-host checks for a SIGTERM (checkpoint.reached_preemption).
  # max_to_keep: None keeps every checkpoint.
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, max_to_keep=placeholder(int),
                                                async_save=True, preemption_check_every=10))
  c.checkpoint.max_to_keep = 3
  # Pretrained weights at step 0 (convert/init.py): a converted file or a run's workdir; which
  # variables (path substrings, empty = all) and a path prefix to place them.
  c.init_from = ml_collections.ConfigDict(dict(path="", patterns=(), prefix=""))
  # Evaluation (evaluate/runner.py): on/off; every_steps: the in-loop period of the default
  # kNN (0: only at the end); batch_size: every evaluator's default; raw_pixel_baseline: the
  # probes on raw pixels too (in-memory data); embedding_plot: PNG of the test features at the
  # end, "pca", "tsne" or "". evaluators: {name: {type, data (config.data overrides),
  # every_steps, final, prefix, batch_size, the type's settings}}, the types and their settings
  # in evaluate/evaluators/. Empty: kNN, linear and few-label probes, and for image-text methods
  # zero-shot and retrieval, on config.data (runner.default_specs).
  c.eval = ml_collections.ConfigDict(dict(
      enabled=True, every_steps=0, batch_size=512, raw_pixel_baseline=False,
      embedding_plot="pca", evaluators=ml_collections.ConfigDict()))
  return c


def data_config(source: str, *, recipe: str, image_size: int, **overrides):
  """``config.data`` with every key the pipeline reads; ``overrides`` set any of them.

  Keys: source ("mnist" | "tfds" | "folder" | "csv" | "tfrecord" | "karpathy_json", the last
  for evaluators only), name (tfds name), the splits, data_dir (tfds, local or gs://), path
  (folder / CSV / TFRecord glob, ``{split}`` is replaced; karpathy_json: the
  dataset_flickr30k.json / dataset_coco.json file), images_dir (karpathy_json: the folder of
  the images; empty = the JSON's folder), image_size, recipe and ``augment`` overrides
  (data/augment.py), shuffle_buffer (streaming shuffle window), cycle_length (TFRecord files read in parallel), mix_paths and
  mix_weights (more TFRecord globs mixed with ``path`` by weight), crop_decode (decode only
  the JPEG crop window of the training views: "auto" = streaming sources only), skip_corrupt
  (skip and count undecodable images instead of failing), corrupt_reserve (streaming
  TFRecord: fraction of each shuffle window kept spare for corrupt records), the text settings
  (context_length, tokenizer "bytes" | "sentencepiece" | "clip_bpe", spm_model, bpe_vocab: the
  CLIP BPE vocabulary file, empty = the one an installed open_clip ships, captions_per_image: 0
  for one caption string per example, K for a list of captions of which evaluation keeps the
  first K, e.g. 5 for COCO with caption_key="captions/text") and cache (hold a
  tfds/TFRecord split in memory for exact random access).
  """
  # String keys default to "" (not None), so that --config.data.<key>=... can override them.
  d = dict(source=source, name="mnist_embedded" if source == "mnist" else "",
           train_split="train", eval_split="test", data_dir="", path="", images_dir="",
           image_size=image_size, recipe=recipe, augment={}, shuffle_buffer=10_000,
           cycle_length=16, mix_paths=(), mix_weights=(), crop_decode="auto", skip_corrupt=False,
           corrupt_reserve=0.01, context_length=77, captions_per_image=0,
           tokenizer="bytes", spm_model="", bpe_vocab="",
           cache=source in ("mnist", "folder", "csv"), image_key="image", label_key="label",
           caption_key="", csv_image_key="filepath", csv_caption_key="caption",
           csv_delimiter=",", split_seed=0, num_parallel_calls=-1, prefetch=2)
  unknown = set(overrides) - set(d)
  if unknown:
    raise ValueError(f"unknown data config keys {sorted(unknown)}; known: {sorted(d)}")
  d.update(overrides)
  return ml_collections.ConfigDict(d)


def clip_config(loss: str, *, embed_dim: int, **overrides):
  """``config.clip`` of the CLIP/SigLIP method: ``loss`` ("clip" | "siglip"), ``embed_dim``,
  ``max_logit_scale`` (the learned scale is clipped at 100, CLIP Sec. 2.5) and
  ``logit_scale_init`` / ``logit_bias_init`` (None: the loss's own initial values, 1/0.07 for
  CLIP; scale 10 and bias -10 for SigLIP, Zhai et al. 2023 Sec. 3) and ``lock_image`` (LiT,
  Zhai et al. 2022: the image tower and its projection get no gradient and run in inference
  mode; also list them in ``optim.frozen_patterns``)."""
  c = ml_collections.ConfigDict(dict(
      loss=loss, embed_dim=embed_dim, max_logit_scale=100.0, lock_image=False,
      logit_scale_init=placeholder(float), logit_bias_init=placeholder(float)))
  c.update(overrides)
  return c


def optim_config(name: str, *, base_lr: float, **overrides):
  """``config.optim`` with every key ``optim.build_optimizer`` reads; ``overrides`` set any.

  Keys (see optim.py): name ("lars" | "sgd" | "adamw"), base_lr, lr_scaling ("linear":
  base_lr x B / 256, "sqrt": base_lr x sqrt(B), "none"), warmup_steps or warmup_fraction (0 in
  one of them means unset), schedule ("cosine" | "constant"), end_lr_fraction, weight_decay,
  momentum and nesterov (LARS, SGD), lars_eta, b1, b2, eps (AdamW), grad_clip_norm (None: no
  clipping), frozen_patterns (parameter-path substrings held fixed), no_decay_patterns
  (substrings added to the no-weight-decay rule) and mu_dtype (None: float32 moments;
  "bfloat16": AdamW's first moment / the SGD-LARS momentum in bf16).
  """
  d = dict(name=name, base_lr=base_lr, lr_scaling="linear", warmup_steps=0,
           warmup_fraction=0.0, schedule="cosine", end_lr_fraction=0.0, weight_decay=0.0,
           momentum=0.9, nesterov=False, lars_eta=1e-3, b1=0.9, b2=0.999, eps=1e-8,
           grad_clip_norm=placeholder(float), frozen_patterns=(), no_decay_patterns=(),
           mu_dtype=placeholder(str))
  unknown = set(overrides) - set(d)
  if unknown:
    raise ValueError(f"unknown optim config keys {sorted(unknown)}; known: {sorted(d)}")
  c = ml_collections.ConfigDict(d)
  c.update(overrides)  # through the placeholders, so that they keep their types
  return c


# ImageNet distribution shifts in tfds, all labelled in the 1,000-class space; -R and -A are
# scored on their 200 classes (evaluate/data/imagenet_subsets.json).
IMAGENET_VARIANTS = {"imagenet_v2": dict(eval_split="test"),
                     "imagenet_sketch": dict(eval_split="test"),
                     "imagenet_r": dict(eval_split="test", wnids="imagenet_r"),
                     "imagenet_a": dict(eval_split="test", wnids="imagenet_a")}


def image_text_evals(tfds_dir: str, *, every_steps: int, subset: int = 10_000,
                     variants=("imagenet_v2", "imagenet_sketch"), flickr30k=None):
  """``config.eval.evaluators`` of the full-scale CLIP/SigLIP configs: the numbers papers
  report.

  * ``imagenet_subset``: ImageNet zero-shot top-1/5 (tfds ``imagenet2012`` validation, CLIP's
    1,000 class names and 80 templates) on the first ``subset`` validation images every
    ``every_steps`` steps (0: never in the loop), and ``imagenet`` on all 50,000 at the end;
  * ``variants``: the same protocol at the end on tfds datasets of ``IMAGENET_VARIANTS``
    (``imagenet_v2``, ``imagenet_sketch``, ``imagenet_r``, ``imagenet_a``; the last two on
    their 200 classes, as Hendrycks et al. and CLIP report them);
  * ``coco``: COCO 5k test (Karpathy split, tfds ``coco_captions``), first five captions per
    image, R@1/5/10 both directions, every ``every_steps`` steps and at the end;
  * ``flickr30k``: ``(dataset_flickr30k.json, images folder)`` adds Flickr30k 1k test
    retrieval at the end, read from Karpathy's split file (``data.source="karpathy_json"``).

  ``tfds_dir``: where the prepared tfds datasets live (``gs://...`` on a pod).
  """
  tfds = dict(source="tfds", data_dir=tfds_dir, cache=False, path="", skip_corrupt=False)
  zero_shot = dict(type="zero_shot", classes="imagenet", templates="clip")
  evals = {
      "imagenet_subset": dict(zero_shot, data=dict(tfds, name="imagenet2012",
                                                   eval_split=f"validation[:{subset}]"),
                              every_steps=every_steps, final=False),
      "imagenet": dict(zero_shot, data=dict(tfds, name="imagenet2012", eval_split="validation")),
  }
  for name in variants:
    if name not in IMAGENET_VARIANTS:
      raise ValueError(f"ImageNet variant {name!r} is unknown; use some of "
                       f"{sorted(IMAGENET_VARIANTS)}")
    v = dict(IMAGENET_VARIANTS[name])
    evals[name] = dict(zero_shot, data=dict(tfds, name=name, eval_split=v.pop("eval_split")),
                       **v)
  evals["coco"] = dict(type="retrieval", ks=(1, 5, 10), every_steps=every_steps,
                       data=dict(tfds, name="coco_captions", eval_split="test",
                                 caption_key="captions/text", captions_per_image=5))
  if flickr30k:
    path, images_dir = flickr30k
    evals["flickr30k"] = dict(type="retrieval", ks=(1, 5, 10),
                              data=dict(source="karpathy_json", path=path, images_dir=images_dir,
                                        eval_split="test", captions_per_image=5, cache=True))
  return ml_collections.ConfigDict(evals)

