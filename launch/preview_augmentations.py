"""Preview a recipe's two augmented views: what invariances does it teach?

  python launch/preview_augmentations.py --recipe=simclr --strength=0.5 [--image_size=28] \
      [--source=mnist|skimage] [--num=8] [--seed=0] [--set crop_area=(0.25,1.0) ...] \
      --out=preview.png

Writes a PNG grid, one row per image, columns original | view 1 | view 2. The views come from
``data.augment.two_views`` with ``recipe_config(recipe, image_size, {"strength": ..., ...})``,
the exact code and parameters the training pipeline uses (nothing is reimplemented here), with
the example seed of epoch 0, so a row shows the pair a run with ``--seed`` sees for that image in
its first epoch. Normalised recipes (mocov2, mocov3, clip) are un-normalised for display.

Sources: ``mnist``, the embedded 5k digits at their native 28 px (one digit per class, in class
order); ``skimage``, a few photographs shipped with scikit-image (astronaut, coffee, cat, ...),
which show colour jitter, grayscale and blur better than digits do. A contrastive encoder learns
to map the two views of a row to the same point, so whatever differs between them (position,
scale, colour, blur) is what it learns to ignore: at strength 1.0 on MNIST the crops can cut
a digit until a 7 and a 1 look alike.

The figure's title lists the recipe's main parameters. Figure size: see
``evaluate.plots.image_grid_size(num, 3)``.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry",
                  "hubble_deep_field", "coins")


def source_images(source: str, num: int) -> tuple[list[np.ndarray], list[str], list[int]]:
  """``num`` images ``[h, w, c] uint8``, their row titles and example ids."""
  if num < 1:
    raise ValueError(f"--num={num} must be at least 1")
  if source == "mnist":
    from contrastive_jax.data import sources  # pylint: disable=g-import-not-at-top
    src = sources.mnist_source("train", image_size=28)
    images, labels, ids = src.columns["image"], src.columns["label"], src.columns["id"]
    # One digit per class in class order, then the next digit of each class, and so on.
    order = [np.flatnonzero(labels == c) for c in range(10)]
    rows = [order[i % 10][i // 10] for i in range(num)]
    return ([images[r] for r in rows], [f"digit {int(labels[r])}" for r in rows],
            [int(ids[r]) for r in rows])
  if source == "skimage":
    from skimage import data as skdata  # pylint: disable=g-import-not-at-top
    if num > len(SKIMAGE_PHOTOS):
      raise ValueError(f"--num={num}: the skimage source has {len(SKIMAGE_PHOTOS)} photos")
    out = []
    for name in SKIMAGE_PHOTOS[:num]:
      img = np.asarray(getattr(skdata, name)())
      if img.ndim == 2:
        img = img[..., None]
      out.append(img[..., :3].astype(np.uint8))
    return out, list(SKIMAGE_PHOTOS[:num]), list(range(num))
  raise ValueError(f"--source={source!r} is unknown; use 'mnist' or 'skimage'")


def _display(view: np.ndarray, normalize: str | None) -> np.ndarray:
  """A training view back in [0, 1] for display (undoes the recipe's mean/std normalisation)."""
  from contrastive_jax.data import augment  # pylint: disable=g-import-not-at-top
  view = np.asarray(view, np.float32)
  if normalize:
    mean, std = augment.NORMALIZATIONS[normalize]
    view = view * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
  return np.clip(view, 0.0, 1.0)


def describe(cfg: Any) -> str:
  """The recipe's main parameters in one line, for the figure title."""
  parts = [f"crop area {tuple(round(v, 2) for v in cfg.crop_area)}",
           f"flip {cfg.flip_prob:g}",
           f"jitter p {cfg.jitter_prob:g} (b {cfg.brightness:.2g}, c {cfg.contrast:.2g}, "
           f"s {cfg.saturation:.2g}, h {cfg.hue:.2g})",
           f"gray {cfg.grayscale_prob:g}",
           f"blur {tuple(cfg.blur_prob)}"]
  if max(cfg.solarize_prob) > 0:
    parts.append(f"solarize {tuple(cfg.solarize_prob)}")
  return ", ".join(parts)


def make_preview(recipe: str, strength: float, out: str, *, image_size: int | None = None,
                 source: str = "mnist", num: int = 8, seed: int = 0,
                 overrides: dict[str, Any] | None = None) -> str:
  """Writes the preview PNG and returns its path."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from contrastive_jax.data import augment  # pylint: disable=g-import-not-at-top
  from contrastive_jax.evaluate import plots  # pylint: disable=g-import-not-at-top

  if image_size is None:
    image_size = 28 if source == "mnist" else 224
  cfg = augment.recipe_config(recipe, image_size, dict(overrides or {}, strength=strength))
  images, names, ids = source_images(source, num)
  grid = []
  for image, example_id in zip(images, ids):
    ex_seed = augment.example_seed(seed, 0, example_id)
    view1, view2 = augment.two_views(tf.constant(image), ex_seed, cfg)
    original = image.astype(np.float32) / 255.0
    grid.append([original, _display(view1.numpy(), cfg.normalize),
                 _display(view2.numpy(), cfg.normalize)])
  title = (f"{recipe}, strength {strength:g}, {image_size}px, seed {seed}\n{describe(cfg)}")
  return plots.save_image_grid(grid, out, col_titles=("original", "view 1", "view 2"),
                               row_titles=names, title=title)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--recipe", default="simclr",
                      help="simclr | mocov2 | mocov3 | byol | clip")
  parser.add_argument("--strength", type=float, default=1.0,
                      help="colour-jitter strength s (SimCLR: 1.0 ImageNet, 0.5 CIFAR)")
  parser.add_argument("--image_size", type=int, default=None,
                      help="view size in pixels (default 28 for mnist, 224 for skimage)")
  parser.add_argument("--source", default="mnist", choices=("mnist", "skimage"))
  parser.add_argument("--num", type=int, default=8, help="number of images (rows)")
  parser.add_argument("--seed", type=int, default=0, help="the run seed of the views")
  parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                      help="AugmentConfig overrides, e.g. crop_area=(0.25,1.0) blur=False")
  parser.add_argument("--out", required=True, help="output PNG path")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  overrides = {}
  for text in args.set:
    key, sep, value = text.partition("=")
    if not sep:
      raise ValueError(f"--set {text!r} must look like key=value, e.g. crop_area=(0.25,1.0)")
    try:
      overrides[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      overrides[key.strip()] = value.strip()
  path = make_preview(args.recipe, args.strength, args.out, image_size=args.image_size,
                      source=args.source, num=args.num, seed=args.seed, overrides=overrides)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
