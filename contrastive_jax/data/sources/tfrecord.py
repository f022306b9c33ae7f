"""TFRecord image-text shards: the writer, the record-count index, and the two readers.

Records follow ``records.IMAGE_TEXT_FEATURES``. ``tfrecord_source`` loads small sets into
memory (``data.cache=True``); ``tfrecord_stream`` gives this process its record range of the
shards (``streaming.assign_files``), from which ``streaming.StreamOrder`` seeks.

Shard index: ``{output_prefix}.index.json`` next to the shards, ``{"format":
"contrastive_jax.tfrecord_index.v1", "files": {"<shard file name>": <records>, ...}}``
(``read_tfrecord_index``); ``index_tfrecords(glob)`` writes one for shards written elsewhere.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging

from contrastive_jax.data import streaming
from contrastive_jax.data.records import (IndexedSource, StreamSource, count_examples,
                                          parse_image_text, tfrecord_record)
from contrastive_jax.errors import DataError

INDEX_SUFFIX = ".index.json"  # TFRecord record-count index, see read_tfrecord_index
INDEX_FORMAT = "contrastive_jax.tfrecord_index.v1"


def write_image_text_tfrecords(examples: Iterable[tuple[bytes, str] | tuple[bytes, str, int]],
                               output_prefix: str, num_shards: int = 1) -> list[str]:
  """Writes (encoded image bytes, caption[, label]) pairs round-robin into shards.

  Files are ``{output_prefix}-{i:05d}-of-{num_shards:05d}.tfrecord``; returns their paths.
  The per-file record counts go to the index ``{output_prefix}.index.json``
  (``write_tfrecord_index``), so that a streaming reader starts without a pass over the data.
  """
  if num_shards < 1:
    raise ValueError(f"num_shards={num_shards} must be >= 1")
  paths = [f"{output_prefix}-{i:05d}-of-{num_shards:05d}.tfrecord" for i in range(num_shards)]
  counts = [0] * num_shards
  writers = [tf.io.TFRecordWriter(p) for p in paths]
  try:
    for k, ex in enumerate(examples):
      image, caption = ex[0], ex[1]
      label = int(ex[2]) if len(ex) > 2 else -1
      feats = {
          "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[bytes(image)])),
          "caption": tf.train.Feature(bytes_list=tf.train.BytesList(
              value=[caption.encode("utf-8")])),
          "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
      }
      writers[k % num_shards].write(
          tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())
      counts[k % num_shards] += 1
  finally:
    for w in writers:
      w.close()
  write_tfrecord_index(paths, counts, output_prefix + INDEX_SUFFIX)
  return paths


def write_tfrecord_index(files: Sequence[str], counts: Sequence[int], index_path: str) -> str:
  """Writes the record counts of ``files`` as a JSON index (format in ``read_tfrecord_index``).

  The index must sit in the same folder as the files; file names are stored without folder,
  so a copied folder keeps a valid index.
  """
  folder = os.path.dirname(index_path)
  for f in files:
    if os.path.dirname(f) != folder:
      raise ValueError(f"TFRecord index {index_path!r} must be in the folder of {f!r}")
  doc = {"format": INDEX_FORMAT,
         "files": {os.path.basename(f): int(n) for f, n in zip(files, counts, strict=True)}}
  with tf.io.gfile.GFile(index_path, "w") as fh:
    fh.write(json.dumps(doc, indent=1, sort_keys=True))
  return index_path


def index_tfrecords(pattern: str, index_path: str | None = None) -> str:
  """Counts the records of existing shards once (offline) and writes their index.

  ``index_path`` defaults to ``<folder>/tfrecords.index.json``.
  """
  files = tfrecord_files(pattern)
  counts = [count_examples(tf.data.TFRecordDataset(f)) for f in files]
  path = index_path or os.path.join(os.path.dirname(files[0]), "tfrecords" + INDEX_SUFFIX)
  return write_tfrecord_index(files, counts, path)


def read_tfrecord_index(folder: str) -> dict[str, int]:
  """``{file name: record count}`` from every ``*.index.json`` in ``folder``.

  Index format (JSON)::

    {"format": "contrastive_jax.tfrecord_index.v1",
     "files": {"<shard file name, no folder>": <number of records>, ...}}

  One index per written split (``write_image_text_tfrecords``); several may share a folder.
  """
  out: dict[str, int] = {}
  for path in sorted(tf.io.gfile.glob(os.path.join(folder, "*" + INDEX_SUFFIX))):
    with tf.io.gfile.GFile(path, "r") as fh:
      try:
        doc = json.loads(fh.read())
      except json.JSONDecodeError as e:
        raise ValueError(f"TFRecord index {path!r} is not valid JSON ({e}); delete it or "
                         "rewrite it with sources.index_tfrecords(<glob>)") from e
    if doc.get("format") != INDEX_FORMAT or not isinstance(doc.get("files"), dict):
      raise ValueError(f"TFRecord index {path!r} is not a {INDEX_FORMAT} index; delete it "
                       "or rewrite it with sources.index_tfrecords(<glob>)")
    out.update({str(k): int(v) for k, v in doc["files"].items()})
  return out


def tfrecord_counts(files: Sequence[str]) -> list[int]:
  """Record counts of ``files`` from the indexes of their folders (one glob and a few small
  reads per folder); files without an entry are counted by reading them, with a warning."""
  known: dict[str, int] = {}
  for folder in sorted({os.path.dirname(f) for f in files}):
    known.update({os.path.join(folder, k): v for k, v in read_tfrecord_index(folder).items()})
  missing = [f for f in files if f not in known]
  if missing:
    logging.warning(
        "%d of %d TFRecord files have no index entry (e.g. %s): counting their records by "
        "reading them all now, which costs a full read of those files at every start. "
        "Write an index once with contrastive_jax.data.sources.index_tfrecords(%r).",
        len(missing), len(files), missing[0], os.path.join(os.path.dirname(missing[0]), "*"))
    for f in missing:
      known[f] = count_examples(tf.data.TFRecordDataset(f))
  return [known[f] for f in files]


def damaged_tfrecord_files(files: Sequence[str]) -> list[str]:
  """The files among ``files`` whose records cannot be read (bad length or CRC)."""
  damaged = []
  for f in files:
    try:
      count_examples(tf.data.TFRecordDataset(f))
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError):
      damaged.append(f)
  return damaged


def tfrecord_files(pattern: str) -> list[str]:
  if not pattern:
    raise DataError("data.source='tfrecord' needs data.path=<glob of TFRecord shards>")
  files = sorted(f for f in tf.io.gfile.glob(pattern) if not f.endswith(INDEX_SUFFIX))
  if not files:
    raise DataError(f"no TFRecord files match data.path={pattern!r}")
  return files



def tfrecord_source(pattern: str) -> IndexedSource:
  """All records of the shards in memory (encoded), for small image-text sets."""
  files = tfrecord_files(pattern)
  cols: dict[str, list[Any]] = {"image_bytes": [], "caption": [], "label": []}
  for f in files:
    for r in tf.data.TFRecordDataset(f).map(parse_image_text).as_numpy_iterator():
      for k in cols:
        cols[k].append(r[k])
  n = len(cols["label"])
  if not n:
    raise DataError(f"TFRecord files {pattern!r} hold no records")
  return IndexedSource(
      name=f"tfrecord:{pattern}",
      columns={"image_bytes": np.asarray(cols["image_bytes"] + [b""], object)[:n],
               "caption": np.asarray([c.decode("utf-8") for c in cols["caption"]], object),
               "label": np.asarray(cols["label"], np.int64),
               "id": np.arange(n, dtype=np.int64)})



def tfrecord_stream(pattern: str, process_index: int, process_count: int) -> StreamSource:
  """This process's record range of the TFRecord shards (``streaming.assign_files``). Counts
  come from the files' index (``read_tfrecord_index``); no record is read here."""
  files = tfrecord_files(pattern)
  counts = tfrecord_counts(files)
  shards = streaming.assign_files(files, counts, process_index, process_count)
  largest = -(-sum(counts) // process_count)  # ranges differ by at most one record
  names = tf.constant([os.path.basename(f) for f in shards.files])
  ds = tf.data.Dataset.range(len(shards.files)).flat_map(shards.record_dataset).map(
      lambda i, r, x: tfrecord_record(names, i, r, x))
  return StreamSource(name=f"tfrecord:{pattern}[{process_index}/{process_count}]",
                      dataset=ds, num_examples=sum(shards.counts), shards=shards,
                      parse=tfrecord_record, max_process_examples=largest,
                      split_examples=sum(counts))
