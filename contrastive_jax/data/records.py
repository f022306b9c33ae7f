"""What every source yields: record columns, the two source types, decoding, corrupt images.

A record is a dict of tensors: an image (``image`` decoded ``[h, w, c] uint8``,
``image_bytes`` encoded, or ``path`` of a file), ``id`` (int64, stable across process
counts: the row index, or a hash of the tfds id / ``file:position``), ``label`` (int64, -1 if
none) and, where present, ``caption``.

Two kinds of source (``sources/`` builds them, ``orders.py`` reads them in training order):

* ``IndexedSource``: random access by example id, columns held in host memory as numpy
  (decoded pixels, encoded bytes or file paths). The pipeline shuffles it with an exact
  per-epoch permutation of ids.
* ``StreamSource``: a sequential ``tf.data.Dataset`` of encoded records for one process
  (tfds splits or TFRecord shards too large to hold in memory). Seekable streams also carry
  this process's files and their record counts (``streaming.ShardedFiles``), from which
  ``streaming.py`` builds a seekable order.

TFRecord image-text feature spec (``IMAGE_TEXT_FEATURES``, written by
``sources.write_image_text_tfrecords``)::

  "image":   tf.io.FixedLenFeature([], tf.string)              encoded JPEG or PNG bytes
  "caption": tf.io.FixedLenFeature([], tf.string)              UTF-8 text
  "label":   tf.io.FixedLenFeature([], tf.int64, default -1)   optional class id
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from contrastive_jax.errors import DataError

if TYPE_CHECKING:
  from contrastive_jax.data.streaming import ShardedFiles

GENERIC_TEMPLATES = ("a photo of a {name}.",)

IMAGE_TEXT_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "caption": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
}


class CorruptImageError(DataError):
  """An image that cannot be decoded; the message names the file and the fix."""


def format_captions(templates: Sequence[str], class_names: Sequence[str]) -> list[list[str]]:
  """``[T][C]`` captions ``template.format(name=..., label=...)``."""
  return [[t.format(name=n, label=i) for i, n in enumerate(class_names)] for t in templates]


def decode_image_bytes(data: tf.Tensor) -> tf.Tensor:
  """Encoded JPEG/PNG/GIF/BMP bytes -> ``[h, w, 3] uint8``."""
  image = tf.io.decode_image(data, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


@dataclasses.dataclass
class IndexedSource:
  """Random-access examples as numpy columns of equal length ``N``.

  Exactly one of the image columns is present: ``image`` (``[N, h, w, c] uint8`` decoded),
  ``image_bytes`` (``[N] object`` encoded) or ``path`` (``[N] str`` files). ``id`` and
  ``label`` are ``[N] int64``; ``caption`` (``[N] str``) is optional.
  """
  name: str
  columns: dict[str, np.ndarray]
  class_names: tuple[str, ...] | None = None
  train_templates: tuple[str, ...] = GENERIC_TEMPLATES
  eval_templates: tuple[str, ...] = GENERIC_TEMPLATES
  corrupt_files: tuple[str, ...] = ()

  def __len__(self) -> int:
    return len(self.columns["id"])

  @property
  def image_column(self) -> str:
    for k in ("image", "image_bytes", "path"):
      if k in self.columns:
        return k
    raise ValueError(f"source {self.name} has no image column")

  def describe(self, i: int) -> str:
    """Human-readable name of row ``i`` for error messages."""
    if "path" in self.columns:
      return str(self.columns["path"][i])
    return f"{self.name} example id {int(self.columns['id'][i])}"

  def take(self, rows: np.ndarray) -> IndexedSource:
    return dataclasses.replace(self, columns={k: v[rows] for k, v in self.columns.items()})

  def tf_columns(self) -> dict[str, tf.Tensor]:
    """Columns as tensors to ``tf.gather`` from inside tf.data functions."""
    out = {}
    for k, v in self.columns.items():
      if v.dtype == object or v.dtype.kind in "US":  # [N] or [N, K] (K captions per image)
        flat = [x if isinstance(x, bytes) else str(x).encode() for x in v.reshape(-1)]
        out[k] = tf.reshape(tf.constant(flat, tf.string), v.shape)
      else:
        out[k] = tf.constant(v)
    return out


def decode_record(record: dict[str, tf.Tensor]) -> tf.Tensor:
  """The record's image as ``[h, w, 3] uint8`` (decodes bytes / reads files)."""
  if "image" in record:
    image = record["image"]
    if image.shape[-1] == 1:
      image = tf.tile(image, [1, 1, 3])
    return image
  if "image_bytes" in record:
    return decode_image_bytes(record["image_bytes"])
  return decode_image_bytes(tf.io.read_file(record["path"]))


def find_corrupt(source: IndexedSource, rows: Iterable[int] | None = None) -> list[int]:
  """Rows of ``source`` whose image does not decode (tf.data scan, decode errors ignored)."""
  if "image" in source.columns:
    return []
  rows = np.arange(len(source)) if rows is None else np.asarray(list(rows), np.int64)
  cols = source.tf_columns()
  ds = tf.data.Dataset.from_tensor_slices(rows)

  def check(row):
    rec = {k: tf.gather(v, row) for k, v in cols.items()}
    image = decode_record(rec)
    return row, tf.shape(image)[0]

  ds = ds.map(check, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
  good = {int(r) for r, _ in ds.as_numpy_iterator()}
  return [int(r) for r in rows if int(r) not in good]


def drop_corrupt(source: IndexedSource) -> IndexedSource:
  """``source`` without undecodable images; their names are kept in ``corrupt_files``."""
  bad = find_corrupt(source)
  if not bad:
    return source
  keep = np.setdiff1d(np.arange(len(source)), np.asarray(bad))
  out = source.take(keep)
  out.corrupt_files = tuple(source.describe(i) for i in bad)
  return out


def corrupt_error(source_name: str, names: Sequence[str]) -> CorruptImageError:
  shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
  return CorruptImageError(
      f"{len(names)} image(s) of {source_name} cannot be decoded: {shown}. Fix: replace or "
      "delete the file(s), or set data.skip_corrupt=True to skip corrupt images (they are "
      "counted in the iterator's stats['corrupt_skipped']).")


@dataclasses.dataclass
class StreamSource:
  """This process's shard as a sequential dataset of records (not decoded).

  ``dataset`` yields ``{image_bytes, label, id[, caption]}`` in a fixed order; ``num_examples``
  is its length. Seekable streams (TFRecord, tfds splits prepared as TFRecord files) also carry
  their shard layout (``ShardedFiles``) and ``parse``: ``(names [F] string, file index, record
  index, serialized record) -> {image_bytes, label, id[, caption]}``, ``names`` being the
  files' base names (``tfrecord_record`` when None).
  """
  name: str
  dataset: tf.data.Dataset
  num_examples: int
  class_names: tuple[str, ...] | None = None
  train_templates: tuple[str, ...] = GENERIC_TEMPLATES
  eval_templates: tuple[str, ...] = GENERIC_TEMPLATES
  shards: ShardedFiles | None = None
  parse: Any = None
  # The most examples any process's shard holds (None: at most ceil(total / P)). Evaluation
  # runs that many batches on every process, so that all hosts stay in lockstep.
  max_process_examples: int | None = None
  # Examples of the split over all processes (None: unknown).
  split_examples: int | None = None


def count_examples(ds: tf.data.Dataset) -> int:
  """Length of a finite dataset, by reading it once (no decoding)."""
  return int(ds.reduce(np.int64(0), lambda c, _: c + 1).numpy())


def parse_image_text(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
  ex = tf.io.parse_single_example(serialized, IMAGE_TEXT_FEATURES)
  return {"image_bytes": ex["image"], "caption": ex["caption"], "label": ex["label"]}


def _record_id(name: tf.Tensor, position: tf.Tensor) -> tf.Tensor:
  """A stable int64 id from a string key (file name / tfds id) and a position."""
  key = tf.strings.join([name, tf.strings.as_string(position)], ":")
  return tf.strings.to_hash_bucket_fast(key, 2**62)


def tfrecord_record(names: tf.Tensor, file_index, record_index, serialized
                    ) -> dict[str, tf.Tensor]:
  """Parses one serialized record into ``{image_bytes, caption, label, id}``; the id hashes
  ``<name>:<record index>`` (``names``: the files' base names), stable across process
  counts."""
  return {**parse_image_text(serialized),
          "id": _record_id(tf.gather(names, file_index), record_index)}


