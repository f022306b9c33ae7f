"""Image-text retrieval recall@K (the COCO / Flickr30k protocol of Karpathy & Fei-Fei 2015,
reported by CLIP, Radford et al. 2021, Table 13).

Similarity is the cosine of L2-normalised embeddings. Each caption belongs to one image; an
image may have several captions (five in COCO and Flickr30k).

- image -> text R@K: the fraction of images for which *any* of their captions is among the K
  captions most similar to the image (equivalently, the best-ranked own caption has rank < K).
- text -> image R@K: the fraction of captions whose image is among the K images most similar
  to the caption.

Identical captions (``text_groups``): when several images have the same caption text, as with
class-template captions ("a scan of a handwritten 7" for every 7), no model can tell those
captions apart, and counting one image's copy as a wrong answer for another would make recall
zero by construction. Captions with equal group ids are therefore one text: the image -> text
gallery holds each group once, scored by its best caption (identical captions have identical
embeddings), and a caption is relevant to every image that has a caption of its group, in both
directions. Without groups (the default) every caption is distinct: the COCO protocol above.

Ranks are pessimistic on ties: an irrelevant candidate whose similarity equals that of the best
relevant one counts as ranked above it, so a collapsed model (all similarities equal) scores
zero rather than a perfect recall. Images without any caption are left out of the
image -> text average. Recalls are fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from contrastive_jax.evaluate.features import map_row_chunks
from contrastive_jax.evaluate.zero_shot import l2_normalize


def _image_to_text_rank(img_rows, img_groups, text, text_groups, *, num_groups):
  """``[b]`` number of irrelevant texts (groups) scoring >= the image's best relevant one.

  ``img_groups [b, G]``: the caption groups of each image (-1 pads); ``text_groups [N_txt]``
  in ``[0, num_groups)``. A group's score is its best caption's.
  """
  sims = l2_normalize(img_rows) @ text.T  # [b, N_txt]
  group_sims = jax.ops.segment_max(sims.T, text_groups, num_segments=num_groups).T  # [b, T]
  own = jnp.any(jnp.arange(num_groups)[None, None, :] == img_groups[:, :, None], axis=1)
  best_own = jnp.max(jnp.where(own, group_sims, -jnp.inf), axis=1, keepdims=True)
  return jnp.sum((group_sims >= best_own) & ~own, axis=1)


def _text_to_image_rank(txt_rows, txt_groups, images, image_groups):
  """``[b]`` number of irrelevant images scoring >= the caption's best relevant image."""
  sims = l2_normalize(txt_rows) @ images.T  # [b, N_img]
  own = jnp.any(image_groups[None, :, :] == txt_groups[:, None, None], axis=2)
  best_own = jnp.max(jnp.where(own, sims, -jnp.inf), axis=1, keepdims=True)
  return jnp.sum((sims >= best_own) & ~own, axis=1)


def _groups_per_image(text_to_image: np.ndarray, text_groups: np.ndarray,
                      n_img: int) -> np.ndarray:
  """``[N_img, G]`` int32: the distinct caption groups of each image, padded with -1."""
  pairs = np.unique(np.stack([text_to_image, text_groups], axis=1), axis=0)  # sorted by image
  counts = np.bincount(pairs[:, 0], minlength=n_img)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  out = np.full((n_img, max(int(counts.max()), 1)), -1, np.int32)
  out[pairs[:, 0], np.arange(len(pairs)) - starts[pairs[:, 0]]] = pairs[:, 1]
  return out


def retrieval_recall(image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: np.ndarray,
                     ks: Sequence[int] = (1, 5, 10), *, text_groups: np.ndarray | None = None,
                     chunk: int = 1024) -> dict[str, float]:
  """Recall@K in both directions.

  Args:
    image_emb: ``[N_img, E]`` image embeddings (normalised here).
    text_emb: ``[N_txt, E]`` caption embeddings (normalised here).
    text_to_image: ``[N_txt]`` int, the index in ``image_emb`` of each caption's image.
    ks: the K of recall@K.
    text_groups: optional ``[N_txt]`` int >= 0; captions with equal ids have the same text and
      are interchangeable (see the module docstring). ``None``: all captions are distinct.
    chunk: query rows per similarity block (memory ``chunk x N_txt x G`` or
      ``chunk x N_img x G`` booleans, G the most caption groups of one image).

  Returns:
    ``{"image_to_text/R@1": ..., "text_to_image/R@1": ..., ...}`` for every K, plus
    ``"num_images"`` (images with at least one caption), ``"num_texts"`` (captions) and
    ``"num_distinct_texts"`` (groups).
  """
  image_emb, text_emb = np.asarray(image_emb, np.float32), np.asarray(text_emb, np.float32)
  text_to_image = np.asarray(text_to_image).reshape(-1).astype(np.int32)
  n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
  if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
    raise ValueError(f"retrieval_recall needs image_emb [N_img, E] and text_emb [N_txt, E] with "
                     f"the same E; got {image_emb.shape} and {text_emb.shape}")
  if text_to_image.shape[0] != n_txt:
    raise ValueError(f"text_to_image has {text_to_image.shape[0]} entries for {n_txt} captions; "
                     "give the image index of every caption")
  if text_to_image.min() < 0 or text_to_image.max() >= n_img:
    raise ValueError(f"text_to_image entries must index the {n_img} images")
  if not ks or min(ks) < 1:
    raise ValueError(f"ks={tuple(ks)} must be positive integers, e.g. (1, 5, 10)")

  if text_groups is None:
    text_groups = np.arange(n_txt, dtype=np.int32)
  text_groups = np.asarray(text_groups).reshape(-1)
  if text_groups.shape[0] != n_txt or (n_txt and text_groups.min() < 0):
    raise ValueError(f"text_groups must give one id >= 0 per caption ({n_txt}); got shape "
                     f"{text_groups.shape}")
  _, text_groups = np.unique(text_groups, return_inverse=True)   # ids 0 .. num_groups - 1
  text_groups = text_groups.reshape(-1).astype(np.int32)
  num_groups = int(text_groups.max()) + 1

  has_caption = np.bincount(text_to_image, minlength=n_img) > 0
  image_groups = _groups_per_image(text_to_image, text_groups, n_img)
  i2t_rank = map_row_chunks(_image_to_text_rank, (image_emb, image_groups),
                            l2_normalize(text_emb), text_groups, chunk=chunk,
                            static={"num_groups": num_groups})[has_caption]
  t2i_rank = map_row_chunks(_text_to_image_rank, (text_emb, text_groups),
                            l2_normalize(image_emb), image_groups, chunk=chunk)
  result: dict[str, float] = {}
  for k in ks:
    result[f"image_to_text/R@{k}"] = float(np.mean(i2t_rank < k))
  for k in ks:
    result[f"text_to_image/R@{k}"] = float(np.mean(t2i_rank < k))
  result["num_images"] = int(has_caption.sum())
  result["num_texts"] = n_txt
  result["num_distinct_texts"] = num_groups
  return result
