"""Figures for inspecting representations and runs: 2-D embedding maps, sweep curves, image grids.

* ``save_embedding_plot``: frozen features projected to 2-D by PCA or t-SNE (van der Maaten &
  Hinton 2008, "Visualizing Data using t-SNE"), one colour per class. PCA shows the linear
  structure a linear probe sees; t-SNE shows neighbourhoods, which is what the kNN monitor sees
  (its distances between clusters mean little).
* ``save_line_plot``: a metric against a swept setting, one line per series (``launch/sweep.py``).
* ``save_image_grid``: rows of images with column and row titles
  (``launch/preview_augmentations.py``).

Figures are drawn on ``matplotlib.figure.Figure`` with an explicit Agg canvas, never through
``pyplot``: no global figure state, no GUI backend, safe in tests and on headless TPU hosts.
Every figure has a fixed size in inches and a fixed dpi (no ``bbox_inches="tight"``), so the PNG
size in pixels is ``figsize * dpi``.

Layer 1: numpy arrays in, PNG files out; no knowledge of methods or the trainer.
"""

from __future__ import annotations

import io
import os
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

DPI = 100
EMBEDDING_FIGSIZE = (7.0, 6.0)  # inches: 700 x 600 px at DPI
LINE_FIGSIZE = (6.0, 4.0)       # 600 x 400 px
GRID_CELL = 1.5                 # inches per image cell
GRID_HEADER = 0.7               # inches above the first row: a 3-line title and column titles


def _figure(figsize: tuple[float, float]):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=figsize, dpi=DPI)
  FigureCanvasAgg(fig)
  return fig


def _save(fig, path: str | os.PathLike) -> str:
  """Writes the PNG through ``etils.epath`` (local disk, ``gs://`` or any filesystem epath
  knows), creating the parent folders. The PNG is rendered into memory first and written in
  one call: matplotlib never sees the path, so it cannot fall back to the built-in ``open``."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  fig.savefig(buffer, dpi=DPI, format="png")
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  target.write_bytes(buffer.getvalue())
  return os.fspath(path)


def project_2d(features: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
  """``[N, F]`` features -> ``[N, 2] float64`` by PCA or t-SNE (scikit-learn).

  Features are standardised per dimension first for PCA (so that a few large-scale dimensions
  do not decide the map) and L2-normalised for t-SNE with the cosine metric, the geometry the
  contrastive losses and the kNN monitor use.
  """
  x = np.asarray(features, np.float64)
  if x.ndim != 2 or x.shape[0] < 3:
    raise ValueError(f"features must be [N, F] with N >= 3, got shape {x.shape}")
  if x.shape[1] < 2:
    x = np.concatenate([x, np.zeros_like(x)], axis=1)
  if method == "pca":
    from sklearn.decomposition import PCA  # pylint: disable=g-import-not-at-top
    std = x.std(axis=0)
    x = (x - x.mean(axis=0)) / np.where(std > 1e-12, std, 1.0)
    return PCA(n_components=2, random_state=seed).fit_transform(x)
  if method == "tsne":
    from sklearn.manifold import TSNE  # pylint: disable=g-import-not-at-top
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    perplexity = float(min(30.0, max(2.0, (x.shape[0] - 1) / 3.0)))
    return TSNE(n_components=2, perplexity=perplexity, metric="cosine", init="pca",
                random_state=seed).fit_transform(x)
  raise ValueError(f"embedding plot method={method!r} is unknown; use 'pca' or 'tsne'")


def save_embedding_plot(features: np.ndarray, labels: np.ndarray, path: str | os.PathLike, *,
                        method: str = "pca", title: str | None = None,
                        class_names: Sequence[str] | None = None, max_points: int = 2000,
                        seed: int = 0) -> str:
  """Writes a PNG of the 2-D projection of ``features`` coloured by ``labels``, with a legend.

  Args:
    features: ``[N, F]`` float features (e.g. the encoder's test-split features).
    labels: ``[N]`` integer class labels.
    path: output PNG path (parent directories are created).
    method: ``"pca"`` or ``"tsne"``.
    title: figure title (default: the method and the number of points).
    class_names: legend names indexed by label (default: the label numbers).
    max_points: a seeded random subset of at most this many points is drawn (t-SNE is
      quadratic in N).
    seed: seed of the subset and of the projection.

  Returns:
    ``path`` as a string. The PNG is ``EMBEDDING_FIGSIZE * DPI`` pixels.
  """
  features = np.asarray(features)
  labels = np.asarray(labels).reshape(-1)
  if features.ndim != 2 or features.shape[0] != labels.shape[0]:
    raise ValueError(f"features {features.shape} and labels {labels.shape} must be [N, F] and "
                     "[N] with the same N")
  if max_points and features.shape[0] > max_points:
    keep = np.sort(np.random.default_rng(seed).choice(features.shape[0], max_points,
                                                      replace=False))
    features, labels = features[keep], labels[keep]
  xy = project_2d(features, method, seed)
  fig = _figure(EMBEDDING_FIGSIZE)
  ax = fig.add_axes((0.08, 0.08, 0.72, 0.84))
  classes = np.unique(labels)
  cmap = _class_colours(len(classes))
  for i, c in enumerate(classes):
    rows = labels == c
    name = class_names[int(c)] if class_names is not None and 0 <= int(c) < len(class_names) \
        else str(c)
    ax.scatter(xy[rows, 0], xy[rows, 1], s=6, alpha=0.75, color=cmap[i], label=name,
               linewidths=0)
  ax.set_title(title or f"{method.upper()} of {features.shape[0]} embeddings")
  ax.set_xlabel(f"{method} 1")
  ax.set_ylabel(f"{method} 2")
  legend = ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, markerscale=2.5,
                     frameon=False, title="class")
  legend.get_title().set_fontsize(8)
  return _save(fig, path)


def _class_colours(n: int) -> list[Any]:
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  cmap = colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"]
  if n <= 20:
    return [cmap(i) for i in range(n)]
  return [cmap(i / max(1, n - 1)) for i in range(n)]


def save_line_plot(series: Mapping[str, tuple[Sequence[Any], Sequence[float]]],
                   path: str | os.PathLike, *, xlabel: str, ylabel: str,
                   title: str | None = None, logx: bool | None = None) -> str:
  """Writes a PNG of ``y`` against ``x`` for each named series (markers at every point).

  Args:
    series: ``{label: (xs, ys)}``; the label ``""`` draws a series without a legend entry.
      Non-finite ``y`` (a failed point) is left out. Numeric ``xs`` are drawn at their values;
      other ``xs`` (strings) as categories in order of first appearance.
    path: output PNG (``LINE_FIGSIZE * DPI`` pixels).
    xlabel, ylabel, title: axis labels and title.
    logx: log-scale x axis; default: when every x is a positive number and they span more
      than a factor of 4 (temperatures, learning rates).
  """
  fig = _figure(LINE_FIGSIZE)
  ax = fig.add_axes((0.13, 0.14, 0.82, 0.76))
  all_x = [x for xs, _ in series.values() for x in xs]
  numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in all_x)
  categories = list(dict.fromkeys(str(x) for x in all_x))
  for label, (xs, ys) in series.items():
    pos = [float(x) if numeric else categories.index(str(x)) for x in xs]
    pts = sorted((p, float(y)) for p, y in zip(pos, ys) if y is not None and np.isfinite(y))
    if pts:
      ax.plot([p for p, _ in pts], [y for _, y in pts], marker="o", label=label or None)
  if numeric and all_x:
    positive = [float(x) for x in all_x if float(x) > 0]
    if logx is None:
      logx = len(positive) == len(all_x) and max(positive) / min(positive) > 4
    if logx:
      ax.set_xscale("log")
    ax.set_xticks(sorted(set(float(x) for x in all_x)))
    ax.set_xticklabels([f"{x:g}" for x in sorted(set(float(x) for x in all_x))])
    ax.minorticks_off()
  elif categories:
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(categories, rotation=20, fontsize=8)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  if title:
    ax.set_title(title, fontsize=10)
  if any(label for label in series):
    ax.legend(fontsize=8)
  return _save(fig, path)


def image_grid_size(rows: int, cols: int) -> tuple[int, int]:
  """Pixel size ``(width, height)`` of ``save_image_grid``'s PNG."""
  return (round(cols * GRID_CELL * DPI), round((rows * GRID_CELL + GRID_HEADER) * DPI))


def save_image_grid(images: Sequence[Sequence[np.ndarray]], path: str | os.PathLike, *,
                    col_titles: Sequence[str] = (), row_titles: Sequence[str] = (),
                    title: str | None = None) -> str:
  """Writes a PNG grid: ``images[r][c]`` is a ``[H, W, 3]`` or ``[H, W]`` float image in [0, 1].

  Each cell is ``GRID_CELL`` inches square; images keep their aspect ratio, and small ones are
  drawn with nearest-neighbour pixels (blocky, but true to what the network sees).
  """
  rows = len(images)
  cols = max((len(r) for r in images), default=0)
  if rows == 0 or cols == 0:
    raise ValueError("save_image_grid needs at least one image")
  width, height = cols * GRID_CELL, rows * GRID_CELL + GRID_HEADER
  fig = _figure((width, height))
  if title:
    # Wrapped to the figure width (about 15 characters an inch at 7 pt), at most 3 lines.
    chars = max(20, int(width * 15))
    lines = [w for part in title.split("\n") for w in textwrap.wrap(part, chars)][:3]
    fig.text(0.5, 1 - 0.04 / height, "\n".join(lines), ha="center", va="top", fontsize=7)
  for r, row in enumerate(images):
    for c, image in enumerate(row):
      # Cell rectangles in figure fractions, leaving a small margin and room for titles.
      left = (c * GRID_CELL + 0.12) / width
      bottom = (height - GRID_HEADER - (r + 1) * GRID_CELL + 0.05) / height
      ax = fig.add_axes((left, bottom, (GRID_CELL - 0.16) / width, (GRID_CELL - 0.22) / height))
      img = np.clip(np.asarray(image, np.float32), 0.0, 1.0)
      if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
      ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0.0, vmax=1.0,
                interpolation="nearest" if max(img.shape[:2]) <= 64 else "antialiased")
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0 and c < len(col_titles):
        ax.set_title(col_titles[c], fontsize=7)
      if c == 0 and r < len(row_titles):
        ax.set_ylabel(row_titles[r], fontsize=6)
  return _save(fig, path)
