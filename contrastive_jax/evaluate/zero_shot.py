"""Zero-shot classification from text prompts (Radford et al. 2021, CLIP, Sec. 3.1.4).

Each class is represented by the text embedding of prompts such as ``"a photo of a {}."``.
With prompt ensembling (CLIP Sec. 3.1.4) each prompt embedding is L2-normalised, the
normalised embeddings of a class are averaged over the templates, and the mean is normalised
again. An image is assigned to the class of largest cosine similarity; the learned logit scale
of the model is a positive multiplier and does not change the ranking, so it is not needed here.

Accuracies in this package are fractions in ``[0, 1]``; top-5 is reported only when there are
more than 5 classes (with at most 5 it would be 1 by construction).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from contrastive_jax.evaluate.features import map_row_chunks
from contrastive_jax.losses import l2_normalize  # re-exported: knn, retrieval, the package


def top_k_hits(scores: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """``[N] bool``: whether ``labels[i]`` is among the ``k`` largest ``scores[i]``.

  Pessimistic on ties: a class tied with the true class counts as ranked above it, so a
  constant score (a collapsed model) is never credited with a hit (unless ``k`` covers all
  classes).

  Args:
    scores: ``[N, C]`` float.
    labels: ``[N]`` int in ``[0, C)``.
    k: how many of the best classes count.
  """
  scores = jnp.asarray(scores, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  true_score = jnp.take_along_axis(scores, labels[:, None], axis=1)
  classes = jnp.arange(scores.shape[1])
  ahead = jnp.sum((scores >= true_score) & (classes[None, :] != labels[:, None]), axis=1)
  return ahead < k


def class_text_embeddings(encode_text_fn: Callable[[np.ndarray], jax.Array],
                          tokenize_fn: Callable[[list[str]], np.ndarray],
                          class_names: Sequence[str],
                          templates: Sequence[str | Callable[[str], str]]) -> np.ndarray:
  """Prompt-ensembled class embeddings ``[C, E] float32``, rows L2-normalised.

  Args:
    encode_text_fn: ``[T, L] tokens -> [T, E]`` text embeddings (normalised or not); called once
      per class with the ``T = len(templates)`` prompts of that class, so a jitted function
      compiles once.
    tokenize_fn: list of ``T`` strings -> ``[T, L]`` token ids.
    class_names: ``C`` names, e.g. ``("airplane", "automobile", ...)``.
    templates: format strings with one ``{}`` for the class name (``"a photo of a {}."``) or
      callables ``name -> prompt``.
  """
  if not class_names:
    raise ValueError("class_text_embeddings needs at least one class name")
  if not templates:
    raise ValueError("class_text_embeddings needs at least one template, "
                     "e.g. ('a photo of a {}.',)")
  for t in templates:
    if isinstance(t, str) and "{}" not in t:
      raise ValueError(f"template {t!r} has no '{{}}' for the class name; write e.g. "
                       "'a photo of a {}.'")
  rows = []
  for name in class_names:
    prompts = [t.format(name) if isinstance(t, str) else t(name) for t in templates]
    rows.append(np.asarray(encode_text_fn(tokenize_fn(prompts)), np.float32))  # [T, E]
  return ensemble_class_embeddings(np.stack(rows))


def ensemble_class_embeddings(template_emb: np.ndarray) -> np.ndarray:
  """``[C, T, E]`` template embeddings -> ``[C, E] float32`` class embeddings: each template
  embedding L2-normalised, averaged over the T templates, the mean normalised again (CLIP's
  prompt ensemble, Sec. 3.1.4)."""
  template_emb = jnp.asarray(template_emb, jnp.float32)
  if template_emb.ndim != 3:
    raise ValueError(f"template embeddings must be [C, T, E]; got shape {template_emb.shape}")
  return np.asarray(l2_normalize(jnp.mean(l2_normalize(template_emb), axis=1)), np.float32)


def _zero_shot_hits(rows, labels, classes, *, ks):
  """``[b, len(ks)] bool`` top-k hits of cosine scores against normalised class embeddings."""
  scores = l2_normalize(rows) @ classes.T
  return jnp.stack([top_k_hits(scores, labels, k) for k in ks], axis=1)


def zero_shot_accuracy(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray, *,
                       chunk: int = 4096) -> dict[str, float]:
  """Top-1 (and top-5 when ``C > 5``) zero-shot accuracy.

  Args:
    image_emb: ``[N, E]`` image embeddings (normalised here; cosine similarity).
    class_emb: ``[C, E]`` class embeddings, e.g. from :func:`class_text_embeddings`.
    labels: ``[N]`` int class indices.
    chunk: image rows per similarity block (memory ``chunk x C``).

  Returns:
    ``{"top1": float, "top5": float}`` (``top5`` only when ``C > 5``), fractions in [0, 1].
  """
  image_emb, class_emb = np.asarray(image_emb), np.asarray(class_emb)
  labels = np.asarray(labels).reshape(-1)
  if image_emb.ndim != 2 or class_emb.ndim != 2 or image_emb.shape[1] != class_emb.shape[1]:
    raise ValueError(f"zero_shot_accuracy needs image_emb [N, E] and class_emb [C, E] with the "
                     f"same E; got {image_emb.shape} and {class_emb.shape}")
  if labels.shape[0] != image_emb.shape[0]:
    raise ValueError(f"{labels.shape[0]} labels for {image_emb.shape[0]} images")
  num_classes = class_emb.shape[0]
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"labels must lie in [0, {num_classes}); got [{labels.min()}, {labels.max()}]")
  ks = (1, 5) if num_classes > 5 else (1,)
  h = zero_shot_hits(image_emb, class_emb, labels, ks=ks, chunk=chunk)
  return {f"top{k}": float(np.mean(h[:, i])) for i, k in enumerate(ks)}


def zero_shot_hits(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray, *,
                   ks: Sequence[int] = (1, 5), chunk: int = 4096) -> np.ndarray:
  """``[N, len(ks)] bool``: whether each image's label is among its top-k classes (cosine),
  in blocks of ``chunk`` rows; hit counts add up over hosts."""
  labels = np.asarray(labels).reshape(-1).astype(np.int32)
  return map_row_chunks(_zero_shot_hits, (np.asarray(image_emb, np.float32), labels),
                        l2_normalize(np.asarray(class_emb, np.float32)), chunk=chunk,
                        static={"ks": tuple(ks)})
