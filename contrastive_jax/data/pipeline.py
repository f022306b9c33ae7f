"""Per-process tf.data input pipelines: sharded, seeded, exactly resumable.

Training order (``train_iterator``):

* Random-access sources (embedded MNIST, image folders, CSV, and tfds / TFRecord with
  ``cache=True``): epoch ``e`` visits ``perm_e = stateless_shuffle(range(N), (seed, e))``. With
  global batch ``B = P * b`` over ``P`` processes, global step ``t`` of the epoch is
  ``perm_e[t B : (t + 1) B]`` and process ``p`` takes its ``p``-th slice of ``b`` rows. The
  processes' shards are disjoint, their union is the epoch (less the ``N mod B`` remainder that
  is dropped, a different one each epoch), and the global batch does not depend on ``P``.
* Streaming TFRecord sources (no ``cache``): process ``p`` reads only its files (counts from
  the shard index); each epoch is a seeded file order, a deterministic parallel interleave of
  ``cycle_length`` files and a windowed shuffle (``streaming.py``), so ``start_step`` seeks:
  files before the resume point are not opened and at most one interleave group and one
  window are read again. With ``skip_corrupt``, undecodable records are skipped as they are
  met, counted in ``stats`` and named in the log.
* Streaming tfds sources prepared as TFRecord files (``tfds build``'s default): read as
  TFRecord shards are, with the files and their record counts from the split's metadata
  (``sources.tfds_file_stream``), so ``start_step`` seeks in the same way. Where a split has
  no such files (``tfds.testing.mock_data``, ArrayRecord) process ``p`` reads its even
  sub-split through ``as_dataset``; each epoch is a buffer shuffle seeded by (seed, e), and a
  resume reads and discards the records before it (replay; a log line says so).

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
from contrastive_jax.data import sources as src_lib
from contrastive_jax.data import streaming
from contrastive_jax.data import tokenizer as tok_lib
from contrastive_jax.errors import ConfigError, DataError

SOURCES = ("mnist", "tfds", "folder", "csv", "tfrecord", "karpathy_json")
# Sources only the evaluators read (several captions per image: retrieval).
EVAL_ONLY_SOURCES = ("karpathy_json",)
MODES = ("views", "image_text")
_INF_EPOCHS = 2**62
_CAPTION_OP = 7  # folded into an example seed to pick its caption template


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


def indexed_source(data_config, split: str) -> src_lib.IndexedSource:
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
    builder, how = src_lib._tfds_builder(c.name, c.data_dir or None)  # pylint: disable=protected-access
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


# ----------------------------------------------------------------------------- ids

def epoch_rows(num_examples: int, seed: int, epoch, global_batch: int, process_index: int,
               process_count: int) -> tf.Tensor:
  """Rows ``[steps_per_epoch * b] int64`` of ``epoch`` read by this process, in order.

  Works on a tensor ``epoch`` (inside ``Dataset.flat_map``) and eagerly.
  """
  b = global_batch // process_count
  spe = num_examples // global_batch
  epoch = tf.cast(epoch, tf.int64)
  perm = tf.random.experimental.stateless_shuffle(
      tf.range(num_examples, dtype=tf.int64),
      seed=aug_lib.fold_in(tf.constant([seed, 0xE90C], tf.int64), epoch))
  perm = tf.reshape(perm[:spe * global_batch], [spe, process_count, b])
  return tf.reshape(perm[:, process_index, :], [-1])


def _epoch_shuffle_seed(seed: int, epoch) -> tf.Tensor:
  """A scalar int64 seed for ``Dataset.shuffle`` that differs per epoch."""
  s = aug_lib.fold_in(tf.constant([seed, 0x5B0F], tf.int64), epoch)
  return tf.random.stateless_uniform([], seed=s, minval=None, maxval=None, dtype=tf.int64)


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
    if isinstance(source, src_lib.IndexedSource):
      bad = src_lib.find_corrupt(source)
      if bad:
        raise src_lib.corrupt_error(source.name, [source.describe(i) for i in bad]) from err
    shards = getattr(source, "shards", None)
    if isinstance(err, tf.errors.DataLossError) and shards is not None:
      damaged = src_lib.damaged_tfrecord_files(shards.files)  # a pass, on this error only
      if damaged:
        raise src_lib.CorruptImageError(
            f"TFRecord file(s) {damaged} of {source.name} are damaged (bad record length or "
            "CRC); data.skip_corrupt skips undecodable images, not damaged files. Fix: rewrite "
            "them, or delete them and rewrite the index (sources.index_tfrecords).") from err
    raise src_lib.CorruptImageError(
        f"reading {source.name} failed ({type(err).__name__}: {err.message.splitlines()[0]}). "
        "If an image or record is corrupt, replace it or set data.skip_corrupt=True.") from err
  return diagnose


def _caption_table(source) -> tf.Tensor | None:
  if source.class_names:
    return tf.constant(src_lib.format_captions(source.train_templates, source.class_names))
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
                      "and name it in a config.evals entry's data")
  p, num_p = _processes(process_index, process_count)
  if global_batch <= 0 or global_batch % num_p:
    raise ValueError(f"global_batch={global_batch} is not divisible by the {num_p} processes; "
                     f"use a multiple of {num_p}")
  if start_step < 0:
    raise ValueError(f"start_step={start_step} must be >= 0")
  b = global_batch // num_p
  cfg = augment_config(c)
  tokenizer = make_tokenizer(c) if mode == "image_text" else None
  seed = int(seed)
  stats: dict[str, Any] = {"local_batch": b, "corrupt_skipped": 0, "corrupt_files": []}
  _check_source(c)

  orders = []
  if _is_streaming(c):
    if c.source == "tfds":
      streams = [src_lib.tfds_file_stream(c.name, c.train_split, c.data_dir or None, p, num_p,
                                          c.image_key, c.label_key, c.caption_key or None)]
      weights = [1.0]
      if streams[0] is None:  # no TFRecord files (mock data, ArrayRecord): replay, logged
        streams = []
        source = src_lib.tfds_stream(c.name, c.train_split, c.data_dir or None, p, num_p,
                                     c.image_key, c.label_key, c.caption_key or None)
        n = source.num_examples
        spe = n // b
    else:
      paths = [c.path, *c.mix_paths]
      weights = _mix_weights(c, len(paths))
      streams = [src_lib.tfrecord_stream(_split_path(path, c.train_split), p, num_p)
                 for path in paths]
    reserve = float(c.corrupt_reserve) if c.skip_corrupt else 0.0
    for i, stream in enumerate(streams):
      orders.append(streaming.StreamOrder(
          stream.shards, seed, int(c.cycle_length), int(c.shuffle_buffer),
          reserve, source_index=i, parse=stream.parse))
    if orders:
      source = streams[0]
      n = sum(o.num_records for o in orders)
      # Every process's epoch has the same number of steps, the smallest process's (record
      # ranges differ by at most one record per source, so at most one batch is cut): hosts
      # start their epochs together and see their records equally often.
      spe = min(sum(streaming.usable_records(hi - lo, o.window, o.reserve)
                    for o, stream in zip(orders, streams)
                    for lo, hi in [src_lib.process_records(stream.split_examples, q, num_p)])
                for q in range(num_p)) // b
    stats["resume"] = "seek" if orders else "replay"
    what = f"this process's {n} examples"
  else:
    source = indexed_source(c, c.train_split)
    if c.skip_corrupt:
      source = src_lib.drop_corrupt(source)
      stats.update(corrupt_skipped=len(source.corrupt_files),
                   corrupt_files=list(source.corrupt_files))
    n = len(source)
    spe = n // global_batch
    what = f"the {n} examples of {source.name}"
  if spe < 1:
    raise ConfigError(f"config.global_batch={global_batch} is larger than {what}; use a "
                      "smaller batch")
  stats.update(num_examples=n, steps_per_epoch=spe)

  captions = _caption_table(source)
  if mode == "image_text" and captions is None and not _has_captions(source):
    raise ConfigError(f"mode='image_text' needs captions but {source.name} has neither a "
                     "caption column nor class names")

  start_epoch, offset = divmod(int(start_step), spe)
  if isinstance(source, src_lib.IndexedSource):
    cols = source.tf_columns()

    def epoch_ds(epoch):
      rows = epoch_rows(n, seed, epoch, global_batch, p, num_p)
      return tf.data.Dataset.from_tensor_slices(rows).map(
          lambda r: (epoch, {k: tf.gather(v, r) for k, v in cols.items()}))
  else:
    stream = source.dataset

    def epoch_ds(epoch):
      return stream.shuffle(int(c.shuffle_buffer), seed=_epoch_shuffle_seed(seed, epoch),
                            reshuffle_each_iteration=False).take(spe * b).map(
                                lambda r: (epoch, r))

  tracker_columns = bool(orders) and bool(c.skip_corrupt)
  crop_decode = {"auto": _is_streaming(c), "on": True, "off": False, True: True,
                 False: False}.get(c.crop_decode)
  if crop_decode is None:
    raise ValueError(f"data.crop_decode={c.crop_decode!r}; use 'auto' (streaming sources "
                     "only), 'on' or 'off'")

  @tf.autograph.experimental.do_not_convert  # plain graph code: skip autograph's rewrite
  def make_example(epoch, record):
    ex_seed = aug_lib.example_seed(seed, epoch, record["id"])
    out = {"label": tf.cast(record["label"], tf.int32), "index": record["id"]}
    if tracker_columns:
      out.update({k: record[k] for k in streaming.POSITION_KEYS})
    views = (1, 2) if mode == "views" else (1,)
    if "image" in record or not crop_decode:
      image = src_lib.decode_record(record)
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

  par = c.num_parallel_calls
  par = tf.data.AUTOTUNE if par in (None, -1) else int(par)
  tracker = None
  if orders:
    if len(orders) == 1:  # epochs end on whole batches
      ds, info = streaming.kept_examples(orders[0], spe * b, int(start_step) * b,
                                         bool(c.skip_corrupt), make_example, par)
      infos = [info]
    else:
      ds, infos = streaming.mixed_examples(orders, weights, int(start_step) * b,
                                           bool(c.skip_corrupt), make_example, par)
    stats.update(infos[0] if len(infos) == 1 else {
        k: [i[k] for i in infos] for k in infos[0]})
    if c.skip_corrupt:
      tracker = streaming.CorruptTracker(orders, [i["resume_position"] for i in infos])
  else:
    ds = tf.data.Dataset.range(start_epoch, _INF_EPOCHS).flat_map(epoch_ds)
    ds = ds.skip(offset * b)  # ids only: nothing before the resume point is decoded
    ds = ds.map(make_example, num_parallel_calls=par, deterministic=True)
    if c.skip_corrupt and _is_streaming(c):  # tfds: skipped as met, not counted
      ds = ds.ignore_errors()
  ds = ds.batch(b, drop_remainder=True)
  ds = ds.prefetch(int(c.prefetch) or tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  ds = ds.with_options(options)
  return DataIterator(ds, stats, int(start_step), _make_diagnose(source), tracker)


def _has_captions(source) -> bool:
  if isinstance(source, src_lib.IndexedSource):
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
  table = (tf.constant(src_lib.format_captions(source.eval_templates[:1], source.class_names))
           if source.class_names else None)
  k = int(captions_per_image or 0)

  @tf.autograph.experimental.do_not_convert
  def fn(rec):
    out = {"image": aug_lib.eval_preprocess(src_lib.decode_record(rec), cfg),
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


def _eval_dataset(source: src_lib.IndexedSource, cfg: aug_lib.AugmentConfig, tokenizer,
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
    source = src_lib.drop_corrupt(source)
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
                                   c.image_key, c.label_key,
                                   c.caption_key or None)
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      try:
        total = tfds.builder(c.name, data_dir=c.data_dir or None).info.splits[
            split].num_examples
      except (KeyError, ValueError, TypeError):  # no split metadata (mock data)
        total = source.num_examples * num_p
    else:
      source = src_lib.tfrecord_stream(_split_path(c.path, split), p, num_p)
      total = source.num_examples * num_p
    ds = source.dataset.map(_eval_example_fn(source, cfg, tokenizer,
                                             c.get("captions_per_image", 0)),
                            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    largest = source.max_process_examples or math.ceil(total / num_p)
    num_batches = math.ceil(largest / b)
  else:
    source = indexed_source(c, split)
    if c.skip_corrupt:
      source = src_lib.drop_corrupt(source)
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
  prompts = [list(col) for col in zip(*src_lib.format_captions(tmpl, source.class_names))]
  tokenizer = make_tokenizer(data_config)
  tokens = np.stack([tokenizer.encode(row) for row in prompts])
  return {"class_names": list(source.class_names), "prompts": prompts, "tokens": tokens}
