"""Image-text retrieval recall@K (the COCO / Flickr30k protocol of Karpathy & Fei-Fei 2015,
reported by CLIP, Radford et al. 2021, Table 13).

Similarity is the cosine of L2-normalised embeddings. Each caption belongs to exactly one
image; an image may have several captions (five in COCO and Flickr30k).

- image -> text R@K: the fraction of images for which *any* of their captions is among the K
  captions most similar to the image (equivalently, the best-ranked own caption has rank < K).
- text -> image R@K: the fraction of captions whose one image is among the K images most
  similar to the caption.

Ranks are pessimistic on ties: a candidate whose similarity equals that of the correct one
counts as ranked above it, so a collapsed model (all similarities equal) scores zero rather than
a perfect recall. Images without any caption are left out of the image -> text average.
Recalls are fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from contrastive_jax.evaluate.features import map_row_chunks
from contrastive_jax.evaluate.zero_shot import l2_normalize


def _image_to_text_rank(img_rows, img_ids, text, text_to_image):
  """``[b]`` number of foreign captions scoring >= the image's best own caption."""
  sims = l2_normalize(img_rows) @ text.T  # [b, N_txt]
  own = text_to_image[None, :] == img_ids[:, None]
  best_own = jnp.max(jnp.where(own, sims, -jnp.inf), axis=1, keepdims=True)
  return jnp.sum((sims >= best_own) & ~own, axis=1)


def _text_to_image_rank(txt_rows, txt_image, images):
  """``[b]`` number of other images scoring >= the caption's own image."""
  sims = l2_normalize(txt_rows) @ images.T  # [b, N_img]
  own_sim = jnp.take_along_axis(sims, txt_image[:, None], axis=1)
  others = jnp.arange(images.shape[0])[None, :] != txt_image[:, None]
  return jnp.sum((sims >= own_sim) & others, axis=1)


def retrieval_recall(image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: np.ndarray,
                     ks: Sequence[int] = (1, 5, 10), *, chunk: int = 1024) -> dict[str, float]:
  """Recall@K in both directions.

  Args:
    image_emb: ``[N_img, E]`` image embeddings (normalised here).
    text_emb: ``[N_txt, E]`` caption embeddings (normalised here).
    text_to_image: ``[N_txt]`` int, the index in ``image_emb`` of each caption's image.
    ks: the K of recall@K.
    chunk: query rows per similarity block (memory ``chunk x N_txt`` or ``chunk x N_img``).

  Returns:
    ``{"image_to_text/R@1": ..., "text_to_image/R@1": ..., ...}`` for every K, plus
    ``"num_images"`` (images with at least one caption) and ``"num_texts"``.
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

  has_caption = np.bincount(text_to_image, minlength=n_img) > 0
  i2t_rank = map_row_chunks(_image_to_text_rank, (image_emb, np.arange(n_img, dtype=np.int32)),
                            l2_normalize(text_emb), text_to_image, chunk=chunk)[has_caption]
  t2i_rank = map_row_chunks(_text_to_image_rank, (text_emb, text_to_image),
                            l2_normalize(image_emb), chunk=chunk)
  result: dict[str, float] = {}
  for k in ks:
    result[f"image_to_text/R@{k}"] = float(np.mean(i2t_rank < k))
  for k in ks:
    result[f"text_to_image/R@{k}"] = float(np.mean(t2i_rank < k))
  result["num_images"] = int(has_caption.sum())
  result["num_texts"] = n_txt
  return result
