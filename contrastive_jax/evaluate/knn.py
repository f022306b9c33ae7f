"""Weighted k-nearest-neighbour monitor (Wu et al. 2018, InstDisc, Sec. 3.4; used by MoCo).

For a test feature ``f`` (L2-normalised) and the normalised train features ``v_j``:
``s_j = f . v_j`` (cosine similarity); the ``k`` most similar train items ``N_k`` vote with
weight ``alpha_j = exp(s_j / T)``; the score of class ``c`` is
``w_c = sum_{j in N_k} alpha_j 1[y_j = c]`` and the prediction is ``argmax_c w_c``.
Defaults ``k = 200``, ``T = 0.07`` as in InstDisc.

Computed in JAX on blocks of ``chunk`` test rows, so memory is ``O(chunk x N_train)`` besides
the train features themselves; with a mesh both are split over its devices by train rows. Every
process passes the whole train and test sets (gather the features first in a multi-host run).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from contrastive_jax.distributed import data_sharding
from contrastive_jax.evaluate.features import map_row_chunks
from contrastive_jax.evaluate.zero_shot import l2_normalize, top_k_hits


def _class_scores(test_rows: jax.Array, train_feats: jax.Array, train_labels: jax.Array,
                  train_valid: jax.Array, *, num_classes: int, k: int,
                  temperature: float) -> jax.Array:
  """``[b, C]`` weighted votes of the ``k`` nearest (normalised) train features.

  ``train_valid [N_pad] bool`` marks real rows; padding rows (added to shard the memory over the
  mesh) get similarity -inf, so they are never among the ``k <= N`` neighbours.
  """
  sims = l2_normalize(test_rows) @ train_feats.T  # [b, N_pad]; train_feats already normalised
  sims = jnp.where(train_valid[None, :], sims, -jnp.inf)
  top_sims, top_idx = jax.lax.top_k(sims, k)  # [b, k]
  weights = jnp.exp(top_sims / temperature)
  # Scatter-add rather than a one-hot [b, k, C] tensor: memory O(b x C), not O(b x k x C).
  rows = jnp.broadcast_to(jnp.arange(sims.shape[0])[:, None], top_idx.shape)
  return jnp.zeros((sims.shape[0], num_classes), jnp.float32).at[
      rows, train_labels[top_idx]].add(weights)


def _knn_hits(rows, labels, train_feats, train_labels, train_valid, *, num_classes, k,
              temperature, ks):
  """``[b, len(ks)] bool`` top-k hits of the weighted kNN class scores."""
  scores = _class_scores(rows, train_feats, train_labels, train_valid, num_classes=num_classes,
                         k=k, temperature=temperature)
  return jnp.stack([top_k_hits(scores, labels, kk) for kk in ks], axis=1)


def _check(train_feats, train_labels, test_feats, num_classes, k, temperature):
  if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
    raise ValueError(f"kNN needs train [N, F] and test [M, F] features with the same F; got "
                     f"{train_feats.shape} and {test_feats.shape}")
  if train_labels.shape != (train_feats.shape[0],):
    raise ValueError(f"train_labels of shape {train_labels.shape} for {train_feats.shape[0]} "
                     "train features; pass one int label per row")
  if train_labels.min() < 0 or train_labels.max() >= num_classes:
    raise ValueError(f"train labels must lie in [0, num_classes={num_classes})")
  if k < 1:
    raise ValueError(f"kNN k={k} must be at least 1")
  if temperature <= 0:
    raise ValueError(f"kNN temperature={temperature} must be positive (InstDisc uses 0.07)")


def _memory(train_feats: np.ndarray, train_labels: np.ndarray, mesh: Mesh | None):
  """Normalised train features, labels and a validity mask, on device (rows sharded on mesh)."""
  n = train_feats.shape[0]
  rows = n if mesh is None else -(-n // mesh.size) * mesh.size
  feats = np.zeros((rows, train_feats.shape[1]), np.float32)
  feats[:n] = train_feats
  labels = np.zeros((rows,), np.int32)
  labels[:n] = train_labels
  valid = np.arange(rows) < n
  memory = (l2_normalize(feats), jnp.asarray(labels), jnp.asarray(valid))
  if mesh is not None:
    memory = jax.device_put(memory, data_sharding(mesh))
  return memory


def knn_class_scores(train_feats: np.ndarray, train_labels: np.ndarray, test_feats: np.ndarray,
                     *, num_classes: int, k: int = 200, temperature: float = 0.07,
                     chunk: int = 1024, mesh: Mesh | None = None) -> np.ndarray:
  """``[M, C] float32`` class scores ``w_c`` of every test row (see the module docstring).

  ``k`` larger than the train set is clamped to ``N_train`` (every train item votes);
  ``chunk`` and ``mesh`` as in :func:`knn_accuracy`.
  """
  train_feats, test_feats = np.asarray(train_feats), np.asarray(test_feats)
  train_labels = np.asarray(train_labels).reshape(-1)
  _check(train_feats, train_labels, test_feats, num_classes, k, temperature)
  k = min(k, train_feats.shape[0])

  return map_row_chunks(_class_scores, test_feats.astype(np.float32),
                        *_memory(train_feats, train_labels, mesh), chunk=chunk,
                        static={"num_classes": num_classes, "k": k,
                                "temperature": float(temperature)})


def knn_accuracy(train_feats: np.ndarray, train_labels: np.ndarray, test_feats: np.ndarray,
                 test_labels: np.ndarray, *, num_classes: int, k: int = 200,
                 temperature: float = 0.07, chunk: int = 1024,
                 mesh: Mesh | None = None) -> dict[str, float]:
  """Weighted kNN accuracy of ``test_feats`` against the labelled ``train_feats``.

  Args:
    train_feats: ``[N, F]`` features of the labelled (memory) set, any scale (normalised here).
    train_labels: ``[N]`` int in ``[0, num_classes)``.
    test_feats: ``[M, F]`` features to classify.
    test_labels: ``[M]`` int.
    num_classes: ``C``.
    k: neighbours that vote. Rule when ``k > N``: ``k`` is clamped to ``N`` (all train items
      vote, still weighted by similarity) and the clamped value is returned as ``"k"``.
    temperature: ``T`` of the weights ``exp(s / T)``.
    chunk: test rows per similarity block (memory ``chunk x N`` floats).
    mesh: optional ``("data",)`` mesh: the train features (the kNN memory) are then split over
      its devices by rows, and so is each ``[chunk, N]`` similarity block, so a memory too large
      for one device still fits. Without it everything sits on the default device.

  Returns:
    ``{"top1", "top5" (only when C > 5), "k"}``; accuracies are fractions in [0, 1]. A class
    tied with the true class counts as ranked above it (a test row with no neighbour of its
    class is never a hit).
  """
  train_feats, test_feats = np.asarray(train_feats), np.asarray(test_feats)
  train_labels = np.asarray(train_labels).reshape(-1)
  test_labels = np.asarray(test_labels).reshape(-1)
  _check(train_feats, train_labels, test_feats, num_classes, k, temperature)
  if test_labels.shape[0] != test_feats.shape[0]:
    raise ValueError(f"{test_labels.shape[0]} test labels for {test_feats.shape[0]} test rows")
  if test_labels.min() < 0 or test_labels.max() >= num_classes:
    raise ValueError(f"test labels must lie in [0, num_classes={num_classes})")
  k_used = min(k, train_feats.shape[0])
  if k_used < k:
    logging.info("kNN: k=%d exceeds the %d train items; using k=%d", k, k_used, k_used)
  ks = (1, 5) if num_classes > 5 else (1,)

  h = map_row_chunks(_knn_hits, (test_feats.astype(np.float32), test_labels.astype(np.int32)),
                     *_memory(train_feats, train_labels, mesh), chunk=chunk,
                     static={"num_classes": num_classes, "k": k_used,
                             "temperature": float(temperature), "ks": ks})
  result = {f"top{kk}": float(np.mean(h[:, i])) for i, kk in enumerate(ks)}
  result["k"] = k_used
  return result
