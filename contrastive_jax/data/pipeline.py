"""Per-process tf.data input pipelines: sharded, seeded, exactly resumable.

Training order (``train_iterator``): random-access sources are read in an exact seeded
permutation per epoch, streaming TFRecord shards and tfds TFRecord files in a seekable order,
other tfds splits in a seeded shuffle that a resume replays (``orders.py``, one class each).

Each example's augmentation is seeded by (seed, epoch, example id, view) (see augment.py), so
a batch is a pure function of (seed, step): ``start_step=s`` computes the epoch and offset of
step ``s``, skips records before any decoding, and yields exactly the batches of an
uninterrupted run (streaming TFRecord with ``skip_corrupt``: see streaming.py for the one
exception). Epochs repeat forever; every epoch ends on a whole batch.

TensorFlow only feeds data: it never sees an accelerator (``data/__init__.py`` hides GPUs).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging

from contrastive_jax.data import augment as aug_lib
from contrastive_jax.data import orders as orders_lib
from contrastive_jax.data import records
from contrastive_jax.data import sources as src_lib
from contrastive_jax.data import streaming
from contrastive_jax.data import tokenizer as tok_lib
from contrastive_jax.errors import ConfigError, DataError, require, require_one_of

SOURCES = ("mnist", "tfds", "folder", "csv", "tfrecord", "karpathy_json")
# Sources only the evaluators read (several captions per image: retrieval).
EVAL_ONLY_SOURCES = ("karpathy_json",)
MODES = ("views", "image_text")
_CAPTION_OP = 7  # folded into an example seed to pick its caption template


def check_config(config) -> None:
  """``config.data``'s source, image size and what the source needs (a tfds name, a path); a
  ``ConfigError`` naming the key, before any data is read."""
  data = config.data
  require_one_of("data.source", data.source, SOURCES)
  require(isinstance(data.image_size, int) and data.image_size >= 8,
          f"config.data.image_size={data.image_size!r} must be an integer >= 8")
  if data.source == "tfds":
    require(bool(data.name), "config.data.name must name a tfds dataset (e.g. 'cifar10') when "
            "config.data.source='tfds'")
  if data.source in ("folder", "csv", "tfrecord"):
    require(bool(data.path), f"config.data.path must be set for config.data.source="
            f"{data.source!r} (a folder, CSV file or TFRecord glob)")


def augment_config(data_config) -> aug_lib.AugmentConfig:
  """The recipe's ``AugmentConfig`` with ``data_config.augment`` overrides applied."""
  overrides = data_config.augment
  overrides = overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides)
  return aug_lib.recipe_config(data_config.recipe, int(data_config.image_size), overrides)


def _processes(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
  return int(process_index), int(process_count)


def _split_path(path: str, split: str) -> str:
  return path.replace("{split}", split) if path else path


def _check_source(c) -> None:
  if c.source not in SOURCES:
    raise ConfigError(f"data.source={c.source!r} is unknown; use one of {SOURCES}")
  if c.source == "tfds" and not c.name:
    raise ConfigError("data.source='tfds' needs data.name (e.g. 'cifar10', 'imagenet2012')")
  if c.source == "karpathy_json" and not c.path:
    raise ConfigError("data.source='karpathy_json' needs data.path=<dataset_flickr30k.json or "
                      "dataset_coco.json> and data.images_dir=<folder of its images>")


def _is_streaming(c) -> bool:
  return c.source in ("tfds", "tfrecord") and not c.cache


def indexed_source(data_config, split: str) -> records.IndexedSource:
  """The split of a random-access source (tfds / TFRecord loaded into memory)."""
  c = data_config
  _check_source(c)
  if c.source == "mnist":
    return src_lib.mnist_source(split, int(c.image_size), int(c.split_seed))
  if c.source == "folder":
    return src_lib.folder_source(_split_path(c.path, split))
  if c.source == "csv":
    return src_lib.csv_source(_split_path(c.path, split), c.csv_image_key,
                              c.csv_caption_key, c.csv_delimiter)
  if c.source == "tfrecord":
    return src_lib.tfrecord_source(_split_path(c.path, split))
  if c.source == "karpathy_json":
    return src_lib.karpathy_json_source(c.path, c.get("images_dir", ""), split,
                                        int(c.get("captions_per_image", 0) or 5))
  return src_lib.tfds_source(c.name, split, c.data_dir or None, c.image_key,
                             c.label_key, c.caption_key or None)


def split_size(data_config, split: str) -> int:
  """The number of examples in ``split``, without reading the data where the size is recorded.

  tfds: the split's metadata (``builder.info.splits``); streaming TFRecords: the shard index
  (``sources.tfrecord_counts``, which counts, with a warning, only shards that have no index);
  the in-memory sources (the embedded digits, folders, CSV files, cached splits) are loaded,
  as training will load them anyway.
  """
  c = data_config
  _check_source(c)
  if c.source == "tfds":
    builder, how = src_lib.tfds_builder(c.name, c.data_dir or None)
    try:
      return int(builder.info.splits[split].num_examples)
    except (KeyError, ValueError) as e:
      raise DataError(f"tfds dataset {c.name!r} has no split {split!r} with a recorded size "
                      f"({e}); {how}") from e
  if _is_streaming(c):
    return sum(src_lib.tfrecord_counts(src_lib.tfrecord_files(_split_path(c.path, split))))
  return len(indexed_source(c, split))


def make_tokenizer(data_config):
  return tok_lib.make_tokenizer(data_config.tokenizer, int(data_config.context_length),
                                data_config.spm_model or None, data_config.bpe_vocab or None)


# ----------------------------------------------------------------------------- iterator

class DataIterator:
  """An iterator of host-local numpy batches with its bookkeeping.

  ``stats``: ``num_examples`` (this process's examples per epoch for streaming sources, the
  split's size otherwise), ``steps_per_epoch``, ``local_batch``, ``corrupt_skipped`` and
  ``corrupt_files`` (images dropped by ``skip_corrupt=True``: found before step 0 for
  in-memory sources; for streaming TFRecord sources counted as they are met, so both grow
  while iterating, and ``corrupt_files`` keeps the first 1000 names). Streaming sources add
  ``resume``: ``"seek"`` or ``"replay"``; seeking ones (TFRecord, tfds TFRecord files) add
  ``resume_position`` (epoch, window, offset), ``resume_groups_skipped`` and
  ``resume_records_skipped`` (records read again to seek). ``step`` is the global step of the
  next batch.
  """

  def __init__(self, dataset: tf.data.Dataset, stats: dict[str, Any], start_step: int,
               diagnose, tracker=None):
    self.dataset = dataset
    self.stats = stats
    self.step = start_step
    self._diagnose = diagnose
    self._tracker = tracker
    self._it = dataset.as_numpy_iterator()

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    try:
      batch = next(self._it)
    except (tf.errors.InvalidArgumentError, tf.errors.DataLossError,
            tf.errors.UnknownError, tf.errors.NotFoundError) as e:
      self._diagnose(e)
      raise
    if self._tracker is not None:
      for name in self._tracker.update(batch, self.stats):
        logging.warning("skipped corrupt record %s (data.skip_corrupt=True)", name)
    self.step += 1
    return batch


def _make_diagnose(source):
  """On a decode error, name the corrupt files of an IndexedSource and say how to fix it."""
  def diagnose(err):
    if isinstance(source, records.IndexedSource):
      bad = records.find_corrupt(source)
      if bad:
        raise records.corrupt_error(source.name, [source.describe(i) for i in bad]) from err
    shards = getattr(source, "shards", None)
    if isinstance(err, tf.errors.DataLossError) and shards is not None:
      damaged = src_lib.damaged_tfrecord_files(shards.files)  # a pass, on this error only
      if damaged:
        raise records.CorruptImageError(
            f"TFRecord file(s) {damaged} of {source.name} are damaged (bad record length or "
            "CRC); data.skip_corrupt skips undecodable images, not damaged files. Fix: rewrite "
            "them, or delete them and rewrite the index (sources.index_tfrecords).") from err
    raise records.CorruptImageError(
        f"reading {source.name} failed ({type(err).__name__}: {err.message.splitlines()[0]}). "
        "If an image or record is corrupt, replace it or set data.skip_corrupt=True.") from err
  return diagnose


def _caption_table(source) -> tf.Tensor | None:
  if source.class_names:
    return tf.constant(records.format_captions(source.train_templates, source.class_names))
  return None


def _mix_weights(c, num_sources: int) -> list[float]:
  """``data.mix_weights`` for ``[data.path, *data.mix_paths]``, checked."""
  weights = [float(w) for w in c.mix_weights]
  if num_sources == 1 and not weights:
    return [1.0]
  if len(weights) != num_sources or min(weights) < 0 or sum(weights) <= 0:
    raise ValueError(f"data.mix_weights={tuple(weights)} must give one non-negative weight "
                     f"per source: data.path plus the {num_sources - 1} data.mix_paths "
                     f"(e.g. mix_weights=(0.7, 0.3))")
  return weights


def train_order(data_config, *, global_batch: int, seed: int, process_index: int,
                process_count: int) -> orders_lib.TrainOrder:
  """This process's training order (``orders.py``) of ``config.data``'s train split."""
  c, b = data_config, global_batch // process_count
  _check_source(c)
  if not _is_streaming(c):
    source = indexed_source(c, c.train_split)
    if c.skip_corrupt:
      source = records.drop_corrupt(source)
    return orders_lib.IndexedOrder(source, seed, global_batch, process_index, process_count)
  if c.source == "tfds":
    args = (c.name, c.train_split, c.data_dir or None, process_index, process_count,
            c.image_key, c.label_key, c.caption_key or None)
    streams, weights = [src_lib.tfds_file_stream(*args)], [1.0]
    if streams[0] is None:  # no TFRecord files (mock data, ArrayRecord): replay, logged
      return orders_lib.ReplayOrder(src_lib.tfds_stream(*args), seed, b,
                                    c.shuffle_buffer, c.skip_corrupt)
  else:
    paths = [c.path, *c.mix_paths]
    weights = _mix_weights(c, len(paths))
    streams = [src_lib.tfrecord_stream(_split_path(path, c.train_split), process_index,
                                       process_count) for path in paths]
  return orders_lib.SeekOrder(streams, weights, seed, b, process_count, c.cycle_length,
                              c.shuffle_buffer, c.skip_corrupt, c.corrupt_reserve)


def train_iterator(data_config, *, mode: str, global_batch: int, seed: int,
                   start_step: int = 0, process_index: int | None = None,
                   process_count: int | None = None) -> DataIterator:
  """Infinite iterator of this process's training batches (numpy).

  Args:
    data_config: ``config.data``: a ConfigDict from ``configs.common.data_config``.
    mode: ``"views"`` -> ``view1``, ``view2`` ``[b, S, S, 3] float32``, ``label [b] int32``,
      ``index [b] int64``; ``"image_text"`` -> ``image [b, S, S, 3] float32``,
      ``tokens [b, L] int32``, ``label``, ``index``.
    global_batch: batch over all processes; ``b = global_batch // process_count``.
    seed: run seed; with ``start_step`` it determines every batch.
    start_step: first global step to yield (exact resume; skipped examples are not decoded).
    process_index, process_count: default ``jax.process_index()/process_count()``.
  """
  c = data_config
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} is unknown; use one of {MODES}")
  if c.source in EVAL_ONLY_SOURCES:
    raise ConfigError(f"data.source={c.source!r} is read by the evaluators only (retrieval, "
                      "several captions per image); train on tfds, TFRecord, CSV or folder data "
                      "and name it in a config.eval.evaluators entry's data")
  p, num_p = _processes(process_index, process_count)
  if global_batch <= 0 or global_batch % num_p:
    raise ValueError(f"global_batch={global_batch} is not divisible by the {num_p} processes; "
                     f"use a multiple of {num_p}")
  if start_step < 0:
    raise ValueError(f"start_step={start_step} must be >= 0")
  b, seed = global_batch // num_p, int(seed)
  cfg = augment_config(c)
  tokenizer = make_tokenizer(c) if mode == "image_text" else None
  order = train_order(c, global_batch=global_batch, seed=seed, process_index=p,
                      process_count=num_p)
  if order.steps_per_epoch < 1:
    raise ConfigError(f"config.global_batch={global_batch} is larger than {order.describe}; "
                      "use a smaller batch")
  make_example = _train_example_fn(c, mode, seed, cfg, order.source, tokenizer,
                                   order.positions)
  par = c.num_parallel_calls
  par = tf.data.AUTOTUNE if par in (None, -1) else int(par)
  ds, info = order.examples(int(start_step), make_example, par)
  stats: dict[str, Any] = {"local_batch": b, "corrupt_skipped": 0, "corrupt_files": [],
                           **order.stats, "num_examples": order.num_examples,
                           "steps_per_epoch": order.steps_per_epoch, **info}
  ds = ds.batch(b, drop_remainder=True)
  ds = ds.prefetch(int(c.prefetch) or tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  ds = ds.with_options(options)
  return DataIterator(ds, stats, int(start_step), _make_diagnose(order.source),
                      order.corrupt_tracker(info))


def _train_example_fn(c, mode: str, seed: int, cfg: aug_lib.AugmentConfig, source, tokenizer,
                      positions: bool):
  """``(epoch, record) -> {view1, view2 | image, tokens; label, index}``: the augmented views
  of one record, seeded by (seed, epoch, id, view); ``positions`` keeps the record's position
  columns (``streaming.POSITION_KEYS``) for the corrupt-record tracker."""
  captions = _caption_table(source)
  if mode == "image_text" and captions is None and not _has_captions(source):
    raise ConfigError(f"mode='image_text' needs captions but {source.name} has neither a "
                     "caption column nor class names")
  crop_decode = {"auto": _is_streaming(c), "on": True, "off": False, True: True,
                 False: False}.get(c.crop_decode)
  if crop_decode is None:
    raise ValueError(f"data.crop_decode={c.crop_decode!r}; use 'auto' (streaming sources "
                     "only), 'on' or 'off'")

  @tf.autograph.experimental.do_not_convert  # plain graph code: skip autograph's rewrite
  def make_example(epoch, record):
    ex_seed = aug_lib.example_seed(seed, epoch, record["id"])
    out = {"label": tf.cast(record["label"], tf.int32), "index": record["id"]}
    if positions:
      out.update({k: record[k] for k in streaming.POSITION_KEYS})
    views = (1, 2) if mode == "views" else (1,)
    if "image" in record or not crop_decode:
      image = records.decode_record(record)
      x = [aug_lib.augment_view(image, aug_lib.view_seed(ex_seed, v), cfg, v) for v in views]
    else:  # encoded: decode only the crop window (JPEG)
      data = record["image_bytes"] if "image_bytes" in record else tf.io.read_file(
          record["path"])
      x = aug_lib.encoded_views(data, ex_seed, cfg, views)
    if mode == "views":
      out["view1"], out["view2"] = x
    else:
      out["image"] = x[0]
      if "caption" in record:
        caption = record["caption"]
      else:
        t = tf.random.stateless_uniform(
            [], seed=aug_lib.fold_in(ex_seed, _CAPTION_OP), minval=0,
            maxval=int(captions.shape[0]), dtype=tf.int32, alg="philox")
        caption = captions[t, tf.maximum(tf.cast(record["label"], tf.int32), 0)]
      out["tokens"] = tokenizer.tf_encode(caption)
    return out

  return make_example


def _has_captions(source) -> bool:
  if isinstance(source, records.IndexedSource):
    return "caption" in source.columns
  return "caption" in source.dataset.element_spec


# ----------------------------------------------------------------------------- eval

def _shard_rows(n: int, process_index, process_count) -> np.ndarray:
  if process_index is None and process_count is None:
    return np.arange(n)
  p, num_p = _processes(process_index, process_count)
  return np.array_split(np.arange(n), num_p)[p]


def _eval_example_fn(source, cfg: aug_lib.AugmentConfig, tokenizer, captions_per_image: int = 0):
  """``record -> {image, label, index[, tokens]}`` with eval preprocessing; without a caption
  column the caption is the first held-out template of the class name (retrieval text).

  ``captions_per_image = K > 0``: the caption column holds a list of captions per image (tfds
  ``coco_captions``' ``captions/text``); the first K are kept, ``tokens [K, L]`` (the COCO and
  Flickr30k retrieval protocol uses five per image). An image with fewer than K fails.
  """
  table = (tf.constant(records.format_captions(source.eval_templates[:1], source.class_names))
           if source.class_names else None)
  k = int(captions_per_image or 0)

  @tf.autograph.experimental.do_not_convert
  def fn(rec):
    out = {"image": aug_lib.eval_preprocess(records.decode_record(rec), cfg),
           "label": tf.cast(rec["label"], tf.int32), "index": rec["id"]}
    if tokenizer is not None and k:
      caps = tf.reshape(rec["caption"], [-1])
      check = tf.debugging.assert_greater_equal(
          tf.size(caps), k, message=f"an image has fewer than data.captions_per_image={k} "
          "captions")
      with tf.control_dependencies([check]):
        caps = caps[:k]
      tokens = tf.map_fn(tokenizer.tf_encode, caps, fn_output_signature=tf.int32)
      out["tokens"] = tf.ensure_shape(tokens, [k, tokenizer.context_length])
    elif tokenizer is not None:
      cap = rec["caption"] if "caption" in rec else table[0, tf.maximum(
          tf.cast(rec["label"], tf.int32), 0)]
      out["tokens"] = tokenizer.tf_encode(cap)
    return out

  return fn


def _eval_dataset(source: records.IndexedSource, cfg: aug_lib.AugmentConfig, tokenizer,
                  par) -> tf.data.Dataset:
  cols = source.tf_columns()
  caption = source.columns.get("caption")
  per_image = caption.shape[1] if caption is not None and caption.ndim == 2 else 0
  example = _eval_example_fn(source, cfg, tokenizer, per_image)
  fn = lambda r: example({k: tf.gather(v, r) for k, v in cols.items()})
  return tf.data.Dataset.range(len(source)).map(fn, num_parallel_calls=par, deterministic=True)


def eval_arrays(data_config, split: str, *, process_index: int | None = None,
                process_count: int | None = None, with_text: bool = False
                ) -> dict[str, np.ndarray]:
  """A whole split in memory with eval preprocessing (small data sets only).

  Returns ``image [N, S, S, 3] float32``, ``label [N] int32``, ``index [N] int64`` and, with
  ``with_text``, ``tokens [N, L] int32`` (the caption column, or the first held-out template
  of the class name: retrieval captions). With ``process_index``/``process_count`` given, only
  this process's contiguous part (``np.array_split``); by default the whole split. Corrupt
  images raise, or are dropped with ``skip_corrupt=True``.
  """
  c = data_config
  source = indexed_source(c, split)
  if c.skip_corrupt:
    source = records.drop_corrupt(source)
  source = source.take(_shard_rows(len(source), process_index, process_count))
  if with_text and not (_has_captions(source) or source.class_names):
    raise ValueError(f"with_text=True but {source.name} has no captions or class names")
  ds = _eval_dataset(source, augment_config(c), make_tokenizer(c) if with_text else None,
                     tf.data.AUTOTUNE).batch(256)
  parts: dict[str, list[np.ndarray]] = {}
  try:
    for batch in ds.as_numpy_iterator():
      for k, v in batch.items():
        parts.setdefault(k, []).append(v)
  except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
    _make_diagnose(source)(e)
  return {k: np.concatenate(v) for k, v in parts.items()}


def eval_iterator(data_config, split: str, batch_size: int, *,
                  process_index: int | None = None, process_count: int | None = None,
                  with_text: bool = False) -> Iterator[dict[str, np.ndarray]]:
  """Eval batches of ``batch_size // process_count`` rows with a ``mask [b] bool``.

  The last partial batch is padded with zeros (``mask=False``), never dropped, and every
  process yields the same number of batches (``ceil(ceil(N / P) / b)``), so a jitted eval
  step can run in lockstep on all hosts. Defaults as in ``train_iterator`` (jax's process).
  Random-access and cached sources are held in memory; streaming tfds / TFRecord sources
  are read from this process's shard.
  """
  c = data_config
  p, num_p = _processes(process_index, process_count)
  if batch_size <= 0 or batch_size % num_p:
    raise ValueError(f"eval batch_size={batch_size} must be a positive multiple of the "
                     f"{num_p} processes")
  b = batch_size // num_p
  cfg = augment_config(c)
  tokenizer = make_tokenizer(c) if with_text else None
  if _is_streaming(c):
    if c.source == "tfds":
      source = src_lib.tfds_stream(c.name, split, c.data_dir or None, p, num_p,
                                   c.image_key, c.label_key, c.caption_key or None)
    else:
      source = src_lib.tfrecord_stream(_split_path(c.path, split), p, num_p)
    total = source.split_examples or source.num_examples * num_p
    ds = source.dataset.map(_eval_example_fn(source, cfg, tokenizer,
                                             c.get("captions_per_image", 0)),
                            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    largest = source.max_process_examples or math.ceil(total / num_p)
    num_batches = math.ceil(largest / b)
  else:
    source = indexed_source(c, split)
    if c.skip_corrupt:
      source = records.drop_corrupt(source)
    total = len(source)
    source = source.take(_shard_rows(total, p, num_p))
    ds = _eval_dataset(source, cfg, tokenizer, tf.data.AUTOTUNE)
    num_batches = math.ceil(math.ceil(total / num_p) / b)
  ds = ds.batch(b).prefetch(2)
  diagnose = _make_diagnose(source)

  def gen():
    it = ds.as_numpy_iterator()
    template = None
    for _ in range(num_batches):
      try:
        batch = next(it, None)
      except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
        diagnose(e)
        raise
      if batch is None:  # this process ran out first: an all-padding batch
        if template is None:
          raise ValueError(f"process {p} of {num_p} has no {split} examples; use fewer "
                           "processes for evaluation or a larger split")
        batch = {k: v[:0] for k, v in template.items()}
      template = batch
      n = len(batch["label"])
      out = {k: np.concatenate([v, np.zeros((b - n,) + v.shape[1:], v.dtype)])
             for k, v in batch.items()}
      out["mask"] = np.arange(b) < n
      yield out

  return gen()


def class_prompts(data_config, templates: str = "eval") -> dict[str, Any]:
  """Zero-shot prompts: ``class_names``, ``prompts [C][T]`` and ``tokens [C, T, L] int32``.

  ``templates="eval"`` uses the held-out templates (never seen as training captions).
  """
  source = indexed_source(data_config, data_config.eval_split) if not _is_streaming(
      data_config) else None
  if source is None or not source.class_names:
    raise ValueError("class_prompts needs a source with class names (mnist, folder, tfds "
                     "with cache=True)")
  tmpl = source.eval_templates if templates == "eval" else source.train_templates
  prompts = [list(col) for col in zip(*records.format_captions(tmpl, source.class_names))]
  tokenizer = make_tokenizer(data_config)
  tokens = np.stack([tokenizer.encode(row) for row in prompts])
  return {"class_names": list(source.class_names), "prompts": prompts, "tokens": tokens}
