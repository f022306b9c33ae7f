"""The all-gather forms of the losses: each device scores its rows against the global batch.

With ``axis_name="data"`` (called inside ``jax.shard_map``) the candidates are the *global*
batch: each function all-gathers what it needs, scores its ``n`` local rows against the ``N``
gathered columns, puts the positive of local row ``r`` at column ``axis_index * n + r`` (the
rank offset) and returns the mean over the global batch (``pmean`` of the local means; all
shards hold the same number of rows). ``all_gather`` is differentiable (its transpose is a
reduce-scatter), so each device receives the exact gradient of the global loss for its rows.
``axis_name=None`` is the plain single-device loss. Per-device memory holds ``[n, N]`` logits;
``ring`` is the memory-bounded form with the same values.

Papers and conventions: the package's front (``contrastive_jax/losses/__init__.py``):
SimCLR (Chen et al. 2020), CLIP (Radford et al. 2021), MoCo (He et al. 2020; Chen et al. 2021),
SigLIP (Zhai et al. 2023).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from contrastive_jax.losses.common import (PLAIN, NegativeOptions, check_embeddings,
                                           check_groups, check_positive, cross_entropy, gather,
                                           global_mean, group_masks, l2_normalize,
                                           loss_from_stats, mean_and_metrics, result,
                                           row_offset, row_stats, similarity)

def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float | jax.Array,
            axis_name: str | None = None, *, return_metrics: bool = False,
            groups: jax.Array | None = None, options: NegativeOptions = PLAIN):
  """SimCLR's NT-Xent loss over the global batch.

  Args:
    z1, z2: [n, D] this shard's projections of the two views (row r of z1 and z2 come from
      the same image). Any float dtype.
    temperature: scalar tau > 0.
    axis_name: mesh axis to gather over inside ``shard_map``; ``None`` on one device.
    return_metrics: also return ``{"accuracy": ...}`` (and, with ``groups``, the
      same-class negative diagnostics of ``common.diagnostics``).
    groups: optional [n] int group ids of this shard's images (class labels; -1 unknown),
      gathered like the embeddings; both views of an image share its id.
    options: ``NegativeOptions`` (debiased, hard negatives, decoupled, SupCon).

  Returns:
    Scalar float32 loss: the mean over the 2N anchors of the global batch of
    ``-log softmax(sim / tau)[positive]``, where each anchor's candidates are the other 2N-1
    views of the global batch (its twin, the positive, and 2N-2 negatives; itself excluded).
  """
  check_embeddings("z1", z1, "z2", z2)
  check_positive("temperature", temperature)
  n = z1.shape[0]
  z1, z2 = l2_normalize(z1), l2_normalize(z2)
  candidates = jnp.concatenate([gather(z1, axis_name), gather(z2, axis_name)], axis=0)
  num_global = candidates.shape[0] // 2
  anchors = jnp.concatenate([z1, z2], axis=0)                         # [2n, D]
  logits = similarity(anchors, candidates) / temperature                    # [2n, 2N]

  rows = row_offset(n, axis_name) + jnp.arange(n)                    # global ids of my images
  self_col = jnp.concatenate([rows, rows + num_global])               # anchor's own column
  pos_col = jnp.concatenate([rows + num_global, rows])                # its twin's column
  columns = jnp.arange(2 * num_global)
  self_mask = columns[None, :] == self_col[:, None]
  raw, logits = logits, jnp.where(self_mask, -jnp.inf, logits)
  if groups is None and options.plain:
    per_anchor, hit = cross_entropy(logits, pos_col)
    loss = global_mean(per_anchor, axis_name)
    return result(loss, {"accuracy": global_mean(hit, axis_name)}, return_metrics)

  twin = columns[None, :] == pos_col[:, None]
  a_groups = c_groups = None
  if groups is not None:
    check_groups(groups, n)
    a_groups = jnp.concatenate([groups, groups])
    gathered = gather(groups, axis_name)
    c_groups = jnp.concatenate([gathered, gathered])
  masks = group_masks(a_groups, c_groups, self_mask, twin, options)
  stats = row_stats(raw, *masks, options.hard_beta)      # the masks exclude the anchor
  per_anchor = loss_from_stats(stats, options, -1.0 / temperature)
  hit = (jnp.argmax(logits, axis=-1) == pos_col).astype(logits.dtype)
  return mean_and_metrics(per_anchor, hit, axis_name, return_metrics,
                          None if groups is None else stats, 1.0 / temperature)


def clip_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: float | jax.Array,
              axis_name: str | None = None, *, return_metrics: bool = False,
              groups: jax.Array | None = None, options: NegativeOptions = PLAIN):
  """CLIP's symmetric InfoNCE over the global batch.

  Args:
    image_emb, text_emb: [n, D] this shard's image and text embeddings (pair r matches).
    logit_scale: scalar multiplier of the cosine similarities (``exp`` of the learned
      log-scale, clipped at 100 by the method), > 0.
    axis_name: mesh axis to gather over inside ``shard_map``; ``None`` on one device.
    return_metrics: also return image->text, text->image and mean top-1 accuracy.
    groups: optional [n] int caption ids (identical captions share one); with
      ``options.multi_positive`` every pair of the same caption is a positive.
    options: ``NegativeOptions``.

  Returns:
    Scalar float32 loss ``(CE(image->text) + CE(text->image)) / 2``, each the mean over the N
    pairs of the global batch; the candidates of an image are all N texts and vice versa.
  """
  check_embeddings("image_emb", image_emb, "text_emb", text_emb)
  check_positive("logit_scale", logit_scale)
  n = image_emb.shape[0]
  img, txt = l2_normalize(image_emb), l2_normalize(text_emb)
  labels = row_offset(n, axis_name) + jnp.arange(n)
  if groups is None and options.plain:
    i2t, hit_i2t = cross_entropy(logit_scale * similarity(img, gather(txt, axis_name)), labels)
    t2i, hit_t2i = cross_entropy(logit_scale * similarity(txt, gather(img, axis_name)), labels)
  else:
    # Multi-positive (identical captions: same group id) is the same in both directions.
    if groups is not None:
      check_groups(groups, n)
    c_groups = None if groups is None else gather(groups, axis_name)

    def direction(a, b):
      logits = logit_scale * similarity(a, gather(b, axis_name))
      twin = jnp.arange(logits.shape[1])[None, :] == labels[:, None]
      masks = group_masks(groups, c_groups, jnp.zeros_like(twin), twin, options)
      stats = row_stats(logits, *masks, options.hard_beta)
      hit = (jnp.argmax(logits, axis=-1) == labels).astype(logits.dtype)
      return loss_from_stats(stats, options, -logit_scale), hit

    (i2t, hit_i2t), (t2i, hit_t2i) = direction(img, txt), direction(txt, img)
  loss = 0.5 * (global_mean(i2t, axis_name) + global_mean(t2i, axis_name))
  acc_i2t, acc_t2i = global_mean(hit_i2t, axis_name), global_mean(hit_t2i, axis_name)
  metrics = {"accuracy": 0.5 * (acc_i2t + acc_t2i), "i2t_accuracy": acc_i2t,
             "t2i_accuracy": acc_t2i}
  return result(loss, metrics, return_metrics)


def moco_loss(q: jax.Array, k: jax.Array, queue: jax.Array, temperature: float | jax.Array,
              axis_name: str | None = None, *, return_metrics: bool = False,
              options: NegativeOptions = PLAIN):
  """MoCo (v1/v2) InfoNCE: positive ``q.k``, negatives the K queued keys only.

  Args:
    q: [n, D] queries (gradient flows).
    k: [n, D] keys from the momentum encoder for the same images; no gradient.
    queue: [K, D] L2-normalised keys of past batches (the queue as it was *before* this
      step); used as given, no gradient.
    temperature: scalar tau > 0 (0.2 in MoCo v2).
    axis_name: mesh axis for the global mean inside ``shard_map``. MoCo's negatives are the
      queue, not the batch, so nothing is gathered here; the method enqueues the gathered keys.
    return_metrics: also return ``{"accuracy": ...}`` (positive ranked above all K negatives).
    options: ``NegativeOptions`` without ``multi_positive`` (the queue has no group ids):
      debiased / hard-negative / decoupled over the K queued negatives.

  Returns:
    Scalar float32 mean over the global batch of ``-log softmax([q.k, q.queue^T] / tau)[0]``.
  """
  check_embeddings("q", q, "k", k)
  check_positive("temperature", temperature)
  if queue.ndim != 2 or queue.shape[1] != q.shape[1]:
    raise ValueError(
        f"queue must be [K, {q.shape[1]}] to match the keys' feature size, got {queue.shape}; "
        "build the queue with the projection head's output dimension")
  q = l2_normalize(q)
  k = jax.lax.stop_gradient(l2_normalize(k))
  queue = jax.lax.stop_gradient(queue.astype(q.dtype))
  l_pos = jnp.sum(q * k, axis=-1, keepdims=True)                        # [n, 1]
  l_neg = similarity(q, queue)                                                 # [n, K]
  logits = jnp.concatenate([l_pos, l_neg], axis=1) / temperature
  labels = jnp.zeros((q.shape[0],), jnp.int32)
  if options.plain:
    per_row, hit = cross_entropy(logits, labels)
  else:
    if options.multi_positive:
      raise ValueError("moco_loss has no group ids for its queue; multi_positive is for "
                       "SimCLR (labels) and CLIP/SigLIP (captions)")
    twin = jnp.arange(logits.shape[1])[None, :] == 0
    twin = jnp.broadcast_to(twin, logits.shape)
    masks = group_masks(None, None, jnp.zeros_like(twin), twin, options)
    stats = row_stats(logits, *masks, options.hard_beta)
    per_row = loss_from_stats(stats, options, -1.0 / temperature)
    hit = (jnp.argmax(logits, axis=-1) == 0).astype(logits.dtype)
  loss = global_mean(per_row, axis_name)
  return result(loss, {"accuracy": global_mean(hit, axis_name)}, return_metrics)


def moco_v3_loss(q: jax.Array, k: jax.Array, temperature: float | jax.Array,
                 axis_name: str | None = None, *, return_metrics: bool = False):
  """MoCo v3's contrastive loss of queries against the global batch of keys, times ``2T``.

  Args:
    q: [n, D] predictor outputs of one view (gradient flows).
    k: [n, D] momentum-encoder projections of the *other* view; no gradient.
    temperature: scalar tau > 0 (1.0 for R50, 0.2 for ViT in MoCo v3).
    axis_name: mesh axis to gather the keys over inside ``shard_map``; ``None`` on one device.
    return_metrics: also return ``{"accuracy": ...}``.

  Returns:
    Scalar float32 ``2 tau * mean_i CE(q_i . K^T / tau, i)`` over the global batch, the N-1
    other keys being the negatives. The method sums it over the two view orders.
  """
  check_embeddings("q", q, "k", k)
  check_positive("temperature", temperature)
  n = q.shape[0]
  q = l2_normalize(q)
  k = jax.lax.stop_gradient(l2_normalize(k))
  logits = similarity(q, gather(k, axis_name)) / temperature                  # [n, N]
  per_row, hit = cross_entropy(logits, row_offset(n, axis_name) + jnp.arange(n))
  loss = 2.0 * temperature * global_mean(per_row, axis_name)
  return result(loss, {"accuracy": global_mean(hit, axis_name)}, return_metrics)


def siglip_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: float | jax.Array,
                logit_bias: float | jax.Array, axis_name: str | None = None, *,
                return_metrics: bool = False, groups: jax.Array | None = None,
                options: NegativeOptions = PLAIN):
  """SigLIP's pairwise sigmoid loss over the global batch.

  Args:
    image_emb, text_emb: [n, D] this shard's image and text embeddings (pair r matches).
    logit_scale: scalar multiplier t > 0 (``exp`` of the learned log-scale, init 10).
    logit_bias: scalar b (learned, init -10).
    axis_name: mesh axis to gather the texts over inside ``shard_map``; ``None`` on one device.
    return_metrics: also return ``{"accuracy": ...}`` (the matching text scores highest in
      its image's row).
    groups: optional [n] int caption ids; with ``options.multi_positive`` every pair of
      the same caption is labelled +1.
    options: ``NegativeOptions`` (only ``multi_positive`` applies).

  Returns:
    Scalar float32 ``-(1/N) sum_i sum_j log sigmoid(z_ij (t x_i.y_j + b))`` with z_ij = +1 for
    the matching pair and -1 otherwise, over the global batch of N pairs.
  """
  check_embeddings("image_emb", image_emb, "text_emb", text_emb)
  check_positive("logit_scale", logit_scale)
  if jnp.ndim(logit_bias) != 0:
    raise ValueError(f"logit_bias must be a scalar, got shape {jnp.shape(logit_bias)}")
  n = image_emb.shape[0]
  img, txt = l2_normalize(image_emb), l2_normalize(text_emb)
  logits = logit_scale * similarity(img, gather(txt, axis_name)) + logit_bias   # [n, N]
  pos_col = row_offset(n, axis_name) + jnp.arange(n)
  is_pos = jnp.arange(logits.shape[1])[None, :] == pos_col[:, None]
  if options.reweighted or options.decoupled:
    raise ValueError("SigLIP has no softmax denominator: debias_tau_plus, hard_beta and "
                     "decoupled do not apply (config.negatives); multi_positive does")
  if groups is not None and options.multi_positive:
    check_groups(groups, n)
    # Identical captions: z_ij = +1 for every pair of the same group (Zhai et al. 2023 treat
    # only the matching pair as positive; here a duplicate caption is not a negative).
    same = (groups[:, None] == gather(groups, axis_name)[None, :]) & (groups >= 0)[:, None]
    is_pos = is_pos | same           # -1 (unknown) keeps its single positive
  signs = jnp.where(is_pos, 1.0, -1.0).astype(logits.dtype)
  per_row = -jnp.sum(jax.nn.log_sigmoid(signs * logits), axis=1)          # [n]
  loss = global_mean(per_row, axis_name)
  hit = (jnp.argmax(logits, axis=-1) == pos_col).astype(logits.dtype)
  return result(loss, {"accuracy": global_mean(hit, axis_name)}, return_metrics)


LOSSES: dict[str, Callable[..., Any]] = {
    "nt_xent": nt_xent,
    "clip": clip_loss,
    "moco": moco_loss,
    "moco_v3": moco_v3_loss,
    "siglip": siglip_loss,
}

