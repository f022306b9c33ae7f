"""Memory-bounded ring forms of the in-batch losses: the values, gradients and metrics of
``gathered``, with per-device memory bounded by the local batch (or a tile), not the global one.

Each form checks and L2-normalises its inputs like ``gathered`` and runs ``ring_driver``:
the candidate blocks travel around the devices of ``axis_name`` and each device scores its
anchors against one ``[n, n]`` block at a time, or, with ``tile=t``, one ``[t, t]`` tile
(Inf-CL, Cheng et al. 2024), so the loss's temporary memory is O(n x D + t^2) instead of the
all-gather's O(n x N). ``axis_name=None`` is the ring of length one (the single-device loss).

Losses: SimCLR (Chen et al. 2020), CLIP (Radford et al. 2021), MoCo v3 (Chen et al. 2021),
SigLIP (Zhai et al. 2023); MoCo v2's queue loss (He et al. 2020) gathers nothing and is the
same function in both implementations. Communication: W hops of one ``[n, D]`` block per pass
(the block and its gradient buffer in the backward pass) instead of one all-gather: more
latencies, the price of the bounded memory; CLIP makes two passes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from contrastive_jax.losses import gathered
from contrastive_jax.losses.common import (PLAIN, NegativeOptions, check_embeddings,
                                           check_groups, check_positive, global_mean,
                                           l2_normalize, mean_and_metrics, result)
from contrastive_jax.losses.ring_driver import make_spec, run_ring


def _softmax_kind(groups, options: NegativeOptions) -> str:
  """The plain ring, or the row statistics when negatives are not plain InfoNCE's."""
  return "infonce" if groups is None and options.plain else "stats"


# ----------------------------------------------------------------------------- losses


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float | jax.Array,
            axis_name: str | None = None, *, return_metrics: bool = False,
            tile: int | None = None, groups: jax.Array | None = None,
            options: NegativeOptions = PLAIN):
  """SimCLR's NT-Xent over the global batch, ring form of ``gathered.nt_xent`` (same value).

  Args:
    z1, z2: [n, D] this shard's projections of the two views. Any float dtype.
    temperature: scalar tau > 0.
    axis_name: ring axis inside ``shard_map``; ``None`` on one device.
    return_metrics: also return ``{"accuracy": ...}`` (and, with ``groups``, the same-class
      negative diagnostics).
    tile: score at most ``tile`` anchors x ``tile`` candidates at once (see ``get_loss``).
    groups: optional [n] int group ids (class labels; -1 unknown).
    options: ``NegativeOptions``.

  Returns:
    Scalar float32 mean over the 2N anchors of ``-log softmax(sim / tau)[twin]``; the anchors
    are this shard's 2n views, each block of candidates is ``[z1_j; z2_j]`` [2n, D] of device
    j, and an anchor is masked out of its own block only.
  """
  check_embeddings("z1", z1, "z2", z2)
  check_positive("temperature", temperature)
  n = z1.shape[0]
  views = jnp.concatenate([l2_normalize(z1), l2_normalize(z2)], axis=0)     # [2n, D]
  both = None
  if groups is not None:
    check_groups(groups, n)
    both = jnp.concatenate([groups, groups])
  spec = make_spec(_softmax_kind(groups, options), divide=True, axis_name=axis_name,
                   tile=tile, pos_shift=n, mask_self=True, halves=2, options=options)
  per_anchor, hit, stats = run_ring(spec, views, views, temperature,
                                    groups=None if both is None else (both, both))
  return mean_and_metrics(per_anchor, hit, axis_name, return_metrics,
                          None if groups is None else stats, 1.0 / temperature)


def clip_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: float | jax.Array,
              axis_name: str | None = None, *, return_metrics: bool = False,
              tile: int | None = None, groups: jax.Array | None = None,
              options: NegativeOptions = PLAIN):
  """CLIP's symmetric InfoNCE, ring form of ``gathered.clip_loss`` (same value and metrics).

  Args:
    image_emb, text_emb: [n, D] this shard's image and text embeddings (pair r matches).
    logit_scale: scalar multiplier of the cosine similarities, > 0.
    axis_name: ring axis inside ``shard_map``; ``None`` on one device.
    return_metrics: also return image->text, text->image and mean top-1 accuracy.
    tile: score at most ``tile`` anchors x ``tile`` candidates at once (see ``get_loss``).
    groups: optional [n] int caption ids (identical captions share one).
    options: ``NegativeOptions``.

  Returns:
    Scalar float32 ``(CE(image->text) + CE(text->image)) / 2`` over the global batch. Two ring
    passes: the text blocks travel past the images, then the image blocks past the texts.
  """
  check_embeddings("image_emb", image_emb, "text_emb", text_emb)
  check_positive("logit_scale", logit_scale)
  img, txt = l2_normalize(image_emb), l2_normalize(text_emb)
  if groups is not None:
    check_groups(groups, img.shape[0])
  spec = make_spec(_softmax_kind(groups, options), divide=False, axis_name=axis_name,
                   tile=tile, options=options)
  both = None if groups is None else (groups, groups)
  i2t, hit_i2t, _ = run_ring(spec, img, txt, logit_scale, groups=both)
  t2i, hit_t2i, _ = run_ring(spec, txt, img, logit_scale, groups=both)
  loss = 0.5 * (global_mean(i2t, axis_name) + global_mean(t2i, axis_name))
  acc_i2t, acc_t2i = global_mean(hit_i2t, axis_name), global_mean(hit_t2i, axis_name)
  metrics = {"accuracy": 0.5 * (acc_i2t + acc_t2i), "i2t_accuracy": acc_i2t,
             "t2i_accuracy": acc_t2i}
  return result(loss, metrics, return_metrics)


def moco_v3_loss(q: jax.Array, k: jax.Array, temperature: float | jax.Array,
                 axis_name: str | None = None, *, return_metrics: bool = False,
                 tile: int | None = None):
  """MoCo v3's loss times ``2T``, ring form of ``gathered.moco_v3_loss`` (same value).

  Args:
    q: [n, D] predictor outputs of one view (gradient flows).
    k: [n, D] momentum-encoder projections of the other view; no gradient (the ring's
      backward pass skips the key-gradient buffer altogether).
    temperature: scalar tau > 0.
    axis_name: ring axis inside ``shard_map``; ``None`` on one device.
    return_metrics: also return ``{"accuracy": ...}``.
    tile: score at most ``tile`` queries x ``tile`` keys at once (see ``get_loss``).

  Returns:
    Scalar float32 ``2 tau * mean_i CE(q_i . K^T / tau, i)`` over the global batch.
  """
  check_embeddings("q", q, "k", k)
  check_positive("temperature", temperature)
  q = l2_normalize(q)
  k = jax.lax.stop_gradient(l2_normalize(k))
  spec = make_spec("infonce", divide=True, axis_name=axis_name, tile=tile, keys_grad=False)
  per_row, hit, _ = run_ring(spec, q, k, temperature)
  loss = 2.0 * temperature * global_mean(per_row, axis_name)
  return result(loss, {"accuracy": global_mean(hit, axis_name)}, return_metrics)


def siglip_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: float | jax.Array,
                logit_bias: float | jax.Array, axis_name: str | None = None, *,
                return_metrics: bool = False, tile: int | None = None,
                groups: jax.Array | None = None, options: NegativeOptions = PLAIN):
  """SigLIP's sigmoid loss, ring form of ``gathered.siglip_loss`` (same value and metrics).

  Args:
    image_emb, text_emb: [n, D] this shard's image and text embeddings (pair r matches).
    logit_scale: scalar multiplier t > 0.
    logit_bias: scalar b.
    axis_name: ring axis inside ``shard_map``; ``None`` on one device.
    return_metrics: also return ``{"accuracy": ...}``.
    tile: score at most ``tile`` images x ``tile`` texts at once (see ``get_loss``).
    groups: optional [n] int caption ids; with ``options.multi_positive`` every pair of the
      same caption is labelled +1.
    options: ``NegativeOptions`` (only ``multi_positive`` applies).

  Returns:
    Scalar float32 ``-(1/N) sum_ij log sigmoid(z_ij (t x_i.y_j + b))`` over the global batch;
    the text blocks travel past the images, each block's terms are added as it passes.
  """
  check_embeddings("image_emb", image_emb, "text_emb", text_emb)
  check_positive("logit_scale", logit_scale)
  if jnp.ndim(logit_bias) != 0:
    raise ValueError(f"logit_bias must be a scalar, got shape {jnp.shape(logit_bias)}")
  img, txt = l2_normalize(image_emb), l2_normalize(text_emb)
  if options.reweighted or options.decoupled:
    raise ValueError("SigLIP has no softmax denominator: debias_tau_plus, hard_beta and "
                     "decoupled do not apply (config.negatives); multi_positive does")
  both = None
  if groups is not None and options.multi_positive:
    check_groups(groups, img.shape[0])
    both = (groups, groups)
  spec = make_spec("sigmoid", divide=False, axis_name=axis_name, tile=tile, options=options)
  per_row, hit, _ = run_ring(spec, img, txt, logit_scale, logit_bias, groups=both)
  loss = global_mean(per_row, axis_name)
  return result(loss, {"accuracy": global_mean(hit, axis_name)}, return_metrics)


# MoCo v2's negatives are the queue, not the batch: nothing is gathered, so its loss is the
# same function in both implementations.
RING_LOSSES: dict[str, Callable[..., Any]] = {
    "nt_xent": nt_xent,
    "clip": clip_loss,
    "moco": gathered.moco_loss,
    "moco_v3": moco_v3_loss,
    "siglip": siglip_loss,
}

