"""Sources read from files a user points at: image folders, CSV image-text pairs, and the
Karpathy-split caption files of the Flickr30k / COCO retrieval evaluation.

All three are ``IndexedSource``s of file paths: the list is read here, the images are
decoded by the pipeline as they are used.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import tensorflow as tf

from contrastive_jax.data.records import IndexedSource
from contrastive_jax.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


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


