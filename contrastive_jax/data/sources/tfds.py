"""tfds data sets by name (``tfds.builder``, with ``data_dir``, e.g. a ``gs://`` bucket).

Three readers of a prepared split: ``tfds_source`` decodes a small split into memory
(``data.cache=True``, ``tfds.testing.mock_data``); ``tfds_file_stream`` reads this process's
record range of the split's TFRecord files, seekable as TFRecord shards are; ``tfds_stream``
reads this process's even sub-split through ``as_dataset`` (evaluation, and training where
the split has no TFRecord files: a resume then replays).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging

from contrastive_jax.data import streaming
from contrastive_jax.data.records import IndexedSource, StreamSource, count_examples
from contrastive_jax.errors import DataError


def tfds_builder(name: str, data_dir: str | None):
  """``(tfds builder, how to prepare the data set)``; a DataError naming the fix if the name
  is unknown."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  how = (f"prepare it with `tfds build {name}"
         f"{' --data_dir=' + data_dir if data_dir else ''}` or "
         f"`tfds.builder({name!r}, data_dir={data_dir!r}).download_and_prepare()` "
         "(manual-download datasets such as imagenet2012 need the archives in "
         "<data_dir>/downloads/manual first)")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # DatasetNotFoundError and friends
    raise DataError(f"tfds dataset data.name={name!r} cannot be loaded from "
                     f"data.data_dir={data_dir!r}: {e}. Check the name; {how}") from e
  return builder, how


def _tfds_as_dataset(name, split, data_dir, **kw) -> tuple[tf.data.Dataset, Any]:
  builder, how = tfds_builder(name, data_dir)
  try:
    ds = builder.as_dataset(split=split, **kw)
  except Exception as e:  # not prepared: AssertionError / FileNotFoundError
    raise DataError(f"tfds dataset {name!r} split {split!r} is not available in "
                     f"data.data_dir={data_dir!r} ({type(e).__name__}: {e}); {how}") from e
  return ds, builder.info


def _class_names(info, label_key: str) -> tuple[str, ...] | None:
  # tfds FeaturesDict has no .get(): look the label feature up by key.
  feat = info.features[label_key] if label_key in info.features else None
  names = getattr(feat, "names", None)
  return tuple(names) if names else None


def tfds_source(name: str, split: str, data_dir: str | None = None, image_key: str = "image",
                label_key: str = "label", caption_key: str | None = None) -> IndexedSource:
  """A whole tfds split decoded into memory (small data sets, ``tfds.testing.mock_data``)."""
  ds, info = _tfds_as_dataset(name, split, data_dir, shuffle_files=False)
  images, labels, captions = [], [], []
  for ex in ds.as_numpy_iterator():
    images.append(ex[image_key])
    labels.append(int(ex[label_key]) if label_key in ex else -1)
    if caption_key:
      c = ex[caption_key]
      captions.append(c.decode("utf-8") if isinstance(c, bytes) else str(c))
  if not images:
    raise DataError(f"tfds dataset {name!r} split {split!r} is empty")
  n = len(images)
  cols: dict[str, np.ndarray] = {"label": np.asarray(labels, np.int64),
                                 "id": np.arange(n, dtype=np.int64)}
  if len({im.shape for im in images}) == 1:
    cols["image"] = np.stack(images).astype(np.uint8)
  else:  # variable sizes: keep them encoded (lossless) rather than padded
    cols["image_bytes"] = np.asarray(
        [tf.io.encode_png(im).numpy() for im in images] + [b""], object)[:n]
  if caption_key:
    cols["caption"] = np.asarray(captions, object)
  return IndexedSource(name=f"tfds:{name}/{split}", columns=cols,
                       class_names=_class_names(info, label_key))



def _tfds_record_fn(image_key: str, label_key: str, caption_key: str | None):
  """A decoded tfds example (image left encoded) -> ``{image_bytes, label[, caption]}``."""
  def to_record(ex):
    rec = {"image_bytes": ex[image_key],
           "label": tf.cast(ex[label_key], tf.int64) if label_key in ex else tf.constant(
               -1, tf.int64)}
    if caption_key:  # "a/b" reads a nested feature (coco_captions: "captions/text")
      value = ex
      for part in caption_key.split("/"):
        value = value[part]
      rec["caption"] = value
    return rec
  return to_record


def tfds_stream(name: str, split: str, data_dir: str | None, process_index: int,
                process_count: int, image_key: str = "image", label_key: str = "label",
                caption_key: str | None = None) -> StreamSource:
  """This process's even sub-split of a tfds split (``builder.as_dataset``), images left
  encoded: a sequential stream without a shard layout (evaluation, and training where
  ``tfds_file_stream`` cannot serve)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  sub = tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]
  ds, info = _tfds_as_dataset(
      name, sub, data_dir, shuffle_files=False,
      decoders={image_key: tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(add_tfds_id=True))
  try:
    num = int(info.splits[sub].num_examples)
  except (KeyError, ValueError, TypeError):  # split metadata missing (e.g. mock data): count
    logging.warning("tfds %s split %r has no example count in its metadata: counting this "
                    "process's examples by reading them all, a full pass over the split at "
                    "every start", name, sub)
    num = count_examples(ds)
  try:  # the whole split: evaluation runs the largest process's number of batches
    total = int(info.splits[split].num_examples)
  except (KeyError, ValueError, TypeError):  # no split metadata (mock data)
    total = None
  to_record = _tfds_record_fn(image_key, label_key, caption_key)

  def record(ex):
    return {**to_record(ex), "id": tf.strings.to_hash_bucket_fast(ex["tfds_id"], 2**62)}

  return StreamSource(name=f"tfds:{name}/{sub}", dataset=ds.map(record),
                      num_examples=num, class_names=_class_names(info, label_key),
                      split_examples=total)


def tfds_file_stream(name: str, split: str, data_dir: str | None, process_index: int,
                     process_count: int, image_key: str = "image", label_key: str = "label",
                     caption_key: str | None = None) -> StreamSource | None:
  """This process's part of a prepared tfds split read from its TFRecord files, seekable as a
  TFRecord stream; None (with a log line saying why) where the split cannot be read so.

  The files and the per-file record ranges come from the split's metadata
  (``builder.info.splits[split].file_instructions``: shard lengths, and the parts of files
  that a sub-split such as ``train[:10%]`` covers), so nothing is read here. Record ranges go
  to processes as for TFRecord shards (``streaming.assign_files``); records are decoded by the
  dataset's own features (``info.features.deserialize_example``, image left encoded), and
  ``id`` hashes ``<file name>__<record index>``, tfds's own ``tfds_id``, so an example has the
  same id (and the same augmentation) as on the ``as_dataset`` path.

  None for splits that have no files on disk (``tfds.testing.mock_data`` patches
  ``as_dataset`` and writes nothing): they are read by ``tfds_stream``, and resume by replay.
  Datasets prepared as ArrayRecord files raise a DataError naming the fix: neither this
  reader nor tfds' ``as_dataset`` reads them with tf.data.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder, _ = tfds_builder(name, data_dir)
  info = builder.info
  why = None
  try:
    instructions = list(info.splits[split].file_instructions)
  except Exception as e:  # pylint: disable=broad-except  # no split / no file metadata
    instructions, why = [], (f"its split metadata names no files, as under "
                             f"tfds.testing.mock_data ({type(e).__name__}: {e})")
  if not why and not instructions:
    why = "its split metadata names no files"
  elif not why and not tf.io.gfile.exists(instructions[0].filename):
    why = (f"its file {instructions[0].filename} is not on disk (tfds.testing.mock_data, or "
           "not prepared)")
  if why:
    logging.warning("tfds %s split %r cannot be read by seeking: %s. Reading it through "
                    "tfds as_dataset instead, where a resume REPLAYS the records before the "
                    "resume point (bit-exact, but it reads them again).", name, split, why)
    return None
  fmt = getattr(info, "file_format", None)
  fmt = getattr(fmt, "value", fmt) or "tfrecord"
  if fmt != "tfrecord":  # tfds' own as_dataset cannot read ArrayRecord either
    raise DataError(f"tfds dataset {name!r} in data.data_dir={data_dir!r} is prepared as "
                    f"{fmt} files, which tf.data cannot read (tfds as_dataset does not read "
                    "them either). Fix: prepare it as TFRecord files (`tfds build "
                    f"{name} --file_format=tfrecord`, or file_format='tfrecord' in "
                    "tfds.builder).")
  instructions = [i for i in instructions if i.take > 0]
  shards = streaming.assign_files(
      [i.filename for i in instructions], [i.take for i in instructions], process_index,
      process_count, [i.skip for i in instructions])
  names = tf.constant([os.path.basename(f) for f in shards.files])
  to_record = _tfds_record_fn(image_key, label_key, caption_key)
  decoders = {image_key: tfds.decode.SkipDecoding()}
  features = info.features

  def parse(names, file_index, record_index, serialized):
    ex = features.deserialize_example(serialized, decoders=decoders)
    key = tf.strings.join([tf.gather(names, file_index), tf.strings.as_string(record_index)],
                          "__")
    return {**to_record(ex), "id": tf.strings.to_hash_bucket_fast(key, 2**62)}

  ds = tf.data.Dataset.range(len(shards.files)).flat_map(shards.record_dataset).map(
      lambda i, r, x: parse(names, i, r, x))
  return StreamSource(name=f"tfds:{name}/{split}[{process_index}/{process_count}]",
                      dataset=ds, num_examples=sum(shards.counts),
                      class_names=_class_names(info, label_key), shards=shards, parse=parse,
                      split_examples=sum(i.take for i in instructions))


