"""The InfoNCE loss family, as pure per-shard functions.

Every loss takes per-device embeddings and an ``axis_name``:

* ``axis_name=None``: the plain single-device loss over the batch it is given.
* ``axis_name="data"`` (called inside ``jax.shard_map``): the candidates are the *global*
  batch. The function all-gathers what it needs, scores its ``n`` local rows against the ``N``
  gathered columns, puts the positive of local row ``r`` at column ``axis_index * n + r`` (the
  rank offset) and returns the mean over the global batch (``pmean`` of the local means; all
  shards hold the same number of rows). ``all_gather`` is differentiable (its transpose is a
  reduce-scatter), so each device receives the exact gradient of the global loss for its rows.

Embeddings may be raw: each loss L2-normalises them itself (normalising twice is harmless).
Similarities, logits and log-sum-exps are computed in float32 (float64 if the inputs are
float64) whatever the input dtype, with ``Precision.HIGHEST`` matmuls so that TPUs do not
round the logits to bf16. Masking uses ``-inf`` on float32 logits, never a large constant.

Conventions (how the directions combine differs between the papers and their code):

* ``nt_xent`` (SimCLR, Chen et al. 2020, eq. 1): mean over all 2N anchors (the paper's L).
  The original TF code sums its two directions, i.e. reports twice this value.
* ``clip_loss`` (Radford et al. 2021, Fig. 3): mean of the image->text and text->image
  cross-entropies.
* ``moco_loss`` (He et al. 2020, eq. 1; MoCo v2): logits ``[q.k, q.queue^T] / T``, label 0.
* ``moco_v3_loss`` (Chen et al. 2021, Alg. 1): in-batch InfoNCE times ``2T``; MoCo v3 sums
  ``moco_v3_loss(q1, k2) + moco_v3_loss(q2, k1)``, which the method does.
* ``siglip_loss`` (Zhai et al. 2023, Alg. 1): ``-log sigmoid(z_ij (t x_i.y_j + b))`` summed over
  all N^2 pairs and divided by N (the number of rows), not by N^2.

Negatives that are not negatives (``NegativeOptions``; ``config.negatives``): nt_xent, clip and
moco take ``options`` (debiased, Chuang et al. 2020; hard-negative weights, Robinson et al.
2021; decoupled, Yeh et al. 2022; multi-positive / SupCon, Khosla et al. 2020), and nt_xent,
clip and siglip take ``groups`` [n] int ids (labels or caption ids; -1 unknown), gathered like
the embeddings. Every option's per-row loss is a function of per-row sums over the candidates
(``row_stats``: log-sum-exps over positives and negatives, sums of positive logits, counts), so
the ring form accumulates the same statistics block by block and shares ``loss_from_stats``.

With ``return_metrics=True`` each returns ``(loss, metrics)`` where ``metrics["accuracy"]`` is
the contrastive top-1 accuracy (the positive scores highest among the anchor's candidates),
averaged over the global batch like the loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- validation


def _check_embeddings(name_a: str, a: jax.Array, name_b: str, b: jax.Array) -> None:
  if a.ndim != 2 or b.ndim != 2:
    raise ValueError(
        f"{name_a} and {name_b} must be [batch, dim] arrays, got shapes {a.shape} and "
        f"{b.shape}; flatten or pool the features first")
  if a.shape != b.shape:
    raise ValueError(
        f"{name_a} {a.shape} and {name_b} {b.shape} must have the same shape: one "
        "positive per row, same embedding size")


def _check_positive(name: str, value: Any) -> None:
  """Rejects non-positive concrete values; traced values (learned scales) are the caller's."""
  if jnp.ndim(value) != 0:
    raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}")
  if isinstance(value, jax.core.Tracer):
    return
  if not np.all(np.asarray(value) > 0):
    raise ValueError(f"{name} must be positive, got {value}; use a value > 0 (e.g. 0.1)")


# ----------------------------------------------------------------------------- building blocks


def _compute_dtype(x: jax.Array) -> jnp.dtype:
  return jnp.promote_types(x.dtype, jnp.float32)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """``x / max(||x||_2, eps)`` along ``axis`` in at least float32 (float64 stays float64);
  ``[..., D] -> [..., D]``. The package's one L2 normalisation (losses, methods, models,
  evaluators). ``rsqrt(max(||x||^2, eps^2))`` keeps the gradient finite at a zero row."""
  x = jnp.asarray(x)
  x = x.astype(_compute_dtype(x))
  sq = jnp.sum(x * x, axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def _gather(x: jax.Array, axis_name: str | None) -> jax.Array:
  """[n, D] local rows -> [N, D] global rows, in device order along ``axis_name``."""
  if axis_name is None:
    return x
  return jax.lax.all_gather(x, axis_name, axis=0, tiled=True)


def _row_offset(n: int, axis_name: str | None) -> jax.Array:
  """Global index of this shard's first row: ``axis_index * n`` (0 on one device)."""
  if axis_name is None:
    return jnp.zeros((), jnp.int32)
  return jax.lax.axis_index(axis_name) * n


def _global_mean(x: jax.Array, axis_name: str | None) -> jax.Array:
  """Mean of a per-row quantity over the global batch (equal rows on every shard)."""
  m = jnp.mean(x)
  return m if axis_name is None else jax.lax.pmean(m, axis_name)


def _sim(a: jax.Array, b: jax.Array) -> jax.Array:
  """[n, D] x [M, D] -> [n, M] dot products in the inputs' (>= float32) dtype."""
  return jnp.einsum("nd,md->nm", a, b, precision=_HIGHEST,
                    preferred_element_type=jnp.promote_types(a.dtype, b.dtype))


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-row softmax cross-entropy and top-1 hit, for integer ``labels`` [n]."""
  lse = jax.nn.logsumexp(logits, axis=-1)
  pos = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  hit = (jnp.argmax(logits, axis=-1) == labels).astype(logits.dtype)
  return lse - pos, hit


def _out(loss, metrics, return_metrics):
  return (loss, metrics) if return_metrics else loss


# ----------------------------------------------------------------------------- negatives


@dataclasses.dataclass(frozen=True)
class NegativeOptions:
  """How an InfoNCE loss treats its negatives (``config.negatives``); the defaults are InfoNCE.

  debias_tau_plus: class prior tau+ in [0, 1) of the debiased contrastive loss (Chuang et al.
    2020, "Debiased Contrastive Learning", eq. 6): with p = exp(l+) and the N negatives' logits
    l_i, ``Ng = max((N E_w[exp(l_i)] - N tau+ p) / (1 - tau+), N exp(l_min))`` replaces their
    sum and the loss is ``-log(p / (p + Ng))``. 0 is InfoNCE.
  hard_beta: concentration beta >= 0 of hard-negative sampling (Robinson et al. 2021,
    "Contrastive Learning with Hard Negative Samples", eq. 3 and the estimator of Sec. 3): the
    expectation above weights negative i by ``exp(beta l_i)`` normalised to mean 1 over the
    negatives (beta multiplies the logit ``s_i / T``, as in the authors' code); 0 is the
    uniform mean (debiased, or InfoNCE with tau+ = 0).
  decoupled: drop the positive(s) from the denominator (Yeh et al. 2022, "Decoupled
    Contrastive Learning", eq. 3): ``-l+ + log(Ng)``.
  multi_positive: candidates with the anchor's group id (same label, identical caption) are
    positives, not negatives; the loss is the mean over the anchor's positives of their
    log-probability, outside the log (SupCon "L_out", Khosla et al. 2020, eq. 2). Rows whose
    group is -1 (unknown) keep their single positive.
  """
  debias_tau_plus: float = 0.0
  hard_beta: float = 0.0
  decoupled: bool = False
  multi_positive: bool = False

  def __post_init__(self):
    if not 0.0 <= self.debias_tau_plus < 1.0:
      raise ValueError(f"debias_tau_plus={self.debias_tau_plus} must be in [0, 1) (e.g. 0.1 "
                       "for 10 balanced classes); set config.negatives.debias_tau_plus")
    if self.hard_beta < 0:
      raise ValueError(f"hard_beta={self.hard_beta} must be >= 0 (e.g. 0.5); set "
                       "config.negatives.hard_beta")
    if self.multi_positive and self.reweighted:
      raise ValueError("debias_tau_plus / hard_beta estimate the negatives of a single "
                       "positive; they do not combine with multi_positive (set one of them "
                       "to 0 or config.negatives.multi_positive='none')")

  @property
  def reweighted(self) -> bool:
    return self.debias_tau_plus > 0 or self.hard_beta > 0

  @property
  def plain(self) -> bool:
    return not (self.reweighted or self.decoupled or self.multi_positive)


PLAIN = NegativeOptions()

# The per-row statistics every option's loss is a function of, each a sum over the row's
# candidates; the log-sum-exps are kept as (max, sum of exp(x - max)) pairs so that the ring
# form accumulates them block by block (online log-sum-exp).
LSE_STATS = ("pos", "neg", "neg_hard", "neg_beta")   # of l, l, (1 + beta) l, beta l
SUM_STATS = ("pos_logit", "num_pos", "num_neg", "diag_count", "diag_logit", "diag_total")


def _masked_lse_terms(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(max, sum exp(x - max))`` over the masked entries of each row, the max without a
  gradient (the log-sum-exp does not depend on it); an empty row gives ``(-inf, 0)``."""
  m = jax.lax.stop_gradient(jnp.max(jnp.where(mask, x, -jnp.inf), axis=-1))
  shift = jnp.where(jnp.isfinite(m), m, 0.0)
  # -inf before the exp, not a zero after it: an excluded entry far above the max would give
  # exp = inf and a NaN gradient (0 x inf) through the select.
  return m, jnp.sum(jnp.exp(jnp.where(mask, x - shift[:, None], -jnp.inf)), axis=-1)


def combine_lse(a: tuple[jax.Array, jax.Array], b: tuple[jax.Array, jax.Array]):
  """Merges two ``(max, sum)`` pairs of the same rows (the online log-sum-exp step)."""
  m = jnp.maximum(a[0], b[0])
  shift = jnp.where(jnp.isfinite(m), m, 0.0)
  sa = jnp.where(jnp.isfinite(a[0]), a[0], 0.0)
  sb = jnp.where(jnp.isfinite(b[0]), b[0], 0.0)
  return m, a[1] * jnp.exp(sa - shift) + b[1] * jnp.exp(sb - shift)


def lse_value(pair: tuple[jax.Array, jax.Array]) -> jax.Array:
  m, s = pair
  return jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(s)


def row_stats(logits: jax.Array, pos: jax.Array, neg: jax.Array, diag: jax.Array,
              diag_total: jax.Array, beta: float) -> dict[str, Any]:
  """The per-row statistics of [n, M] ``logits`` with [n, M] boolean masks: ``pos`` (the
  anchor's positives), ``neg`` (its negatives), ``diag`` (same-class candidates among the
  InfoNCE negatives, for the diagnostics) and ``diag_total`` (all InfoNCE negatives of rows
  whose class is known)."""
  out = {"pos": _masked_lse_terms(logits, pos), "neg": _masked_lse_terms(logits, neg),
         "neg_hard": _masked_lse_terms((1.0 + beta) * logits, neg),
         "neg_beta": _masked_lse_terms(beta * logits, neg)}
  count = lambda mask: jnp.sum(mask.astype(logits.dtype), axis=-1)
  out["pos_logit"] = jnp.sum(jnp.where(pos, logits, 0.0), axis=-1)
  out["num_pos"], out["num_neg"] = count(pos), count(neg)
  out["diag_count"], out["diag_total"] = count(diag), count(diag_total)
  out["diag_logit"] = jax.lax.stop_gradient(jnp.sum(jnp.where(diag, logits, 0.0), axis=-1))
  return out


def combine_stats(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
  out = {k: combine_lse(a[k], b[k]) for k in LSE_STATS}
  out.update({k: a[k] + b[k] for k in SUM_STATS})
  return out


def loss_from_stats(stats: dict[str, Any], options: NegativeOptions,
                    min_logit: jax.Array) -> jax.Array:
  """Per-row loss [n] of the option's equation from the row statistics.

  ``min_logit`` is the smallest possible logit (``-1/T``: cosine -1), the floor
  ``N exp(min_logit)`` of the debiased estimator (Chuang et al. 2020, eq. 6)."""
  mean_pos = stats["pos_logit"] / stats["num_pos"]
  if options.reweighted:
    tau = options.debias_tau_plus
    n_neg = stats["num_neg"]
    # log(N E_w[exp(l)]) with weights exp(beta l) of mean 1: log N + LSE((1+b) l) - LSE(b l).
    log_mean = jnp.log(n_neg) + lse_value(stats["neg_hard"]) - lse_value(stats["neg_beta"])
    log_pos = jnp.log(n_neg * tau) + mean_pos if tau > 0 else jnp.full_like(mean_pos, -jnp.inf)
    # (exp(log_mean) - exp(log_pos)) / (1 - tau), in log space, clamped below at the floor.
    top = jnp.maximum(log_mean, log_pos)
    diff = jnp.exp(log_mean - top) - jnp.exp(log_pos - top)
    floor = jnp.log(n_neg) + min_logit
    log_ng = jnp.maximum(top + jnp.log(jnp.maximum(diff, 1e-30)) - jnp.log1p(-tau), floor)
  else:
    log_ng = lse_value(stats["neg"])
  if options.decoupled:
    return log_ng - mean_pos
  if options.reweighted:
    return jnp.logaddexp(mean_pos, log_ng) - mean_pos
  return jnp.logaddexp(lse_value(stats["pos"]), log_ng) - mean_pos


def diagnostics(stats: dict[str, Any], scale: jax.Array, axis_name: str | None
                ) -> dict[str, jax.Array]:
  """``same_class_negative_fraction``: of the InfoNCE negatives of rows whose class is known,
  the fraction that share the anchor's class; ``same_class_negative_similarity``: their mean
  cosine similarity (``scale`` divides the logits back to cosines). Global sums."""
  total = lambda x: jnp.sum(x) if axis_name is None else jax.lax.psum(jnp.sum(x), axis_name)
  count, known = total(stats["diag_count"]), total(stats["diag_total"])
  sim = total(stats["diag_logit"]) / scale
  return {"same_class_negative_fraction": count / jnp.maximum(known, 1.0),
          "same_class_negative_similarity": sim / jnp.maximum(count, 1.0)}


def _group_masks(a_groups, c_groups, self_mask, twin, options):
  """(pos, neg, diag, diag_total) [n, M] masks from group ids (``None``: none known)."""
  others = ~self_mask & ~twin
  if a_groups is None:
    same = jnp.zeros_like(twin)
    known = jnp.zeros(twin.shape[:1], bool)
  else:
    known = a_groups >= 0
    same = (a_groups[:, None] == c_groups[None, :]) & known[:, None]
  pos = twin | (same & ~self_mask) if options.multi_positive else twin
  return pos, ~self_mask & ~pos, same & others, others & known[:, None]


# ----------------------------------------------------------------------------- losses


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
      same-class negative diagnostics of ``diagnostics``).
    groups: optional [n] int group ids of this shard's images (class labels; -1 unknown),
      gathered like the embeddings; both views of an image share its id.
    options: ``NegativeOptions`` (debiased, hard negatives, decoupled, SupCon).

  Returns:
    Scalar float32 loss: the mean over the 2N anchors of the global batch of
    ``-log softmax(sim / tau)[positive]``, where each anchor's candidates are the other 2N-1
    views of the global batch (its twin, the positive, and 2N-2 negatives; itself excluded).
  """
  _check_embeddings("z1", z1, "z2", z2)
  _check_positive("temperature", temperature)
  n = z1.shape[0]
  z1, z2 = l2_normalize(z1), l2_normalize(z2)
  candidates = jnp.concatenate([_gather(z1, axis_name), _gather(z2, axis_name)], axis=0)
  num_global = candidates.shape[0] // 2
  anchors = jnp.concatenate([z1, z2], axis=0)                         # [2n, D]
  logits = _sim(anchors, candidates) / temperature                    # [2n, 2N]

  rows = _row_offset(n, axis_name) + jnp.arange(n)                    # global ids of my images
  self_col = jnp.concatenate([rows, rows + num_global])               # anchor's own column
  pos_col = jnp.concatenate([rows + num_global, rows])                # its twin's column
  columns = jnp.arange(2 * num_global)
  self_mask = columns[None, :] == self_col[:, None]
  raw, logits = logits, jnp.where(self_mask, -jnp.inf, logits)
  if groups is None and options.plain:
    per_anchor, hit = _cross_entropy(logits, pos_col)
    loss = _global_mean(per_anchor, axis_name)
    return _out(loss, {"accuracy": _global_mean(hit, axis_name)}, return_metrics)

  twin = columns[None, :] == pos_col[:, None]
  a_groups = c_groups = None
  if groups is not None:
    _check_groups(groups, n)
    a_groups = jnp.concatenate([groups, groups])
    gathered = _gather(groups, axis_name)
    c_groups = jnp.concatenate([gathered, gathered])
  masks = _group_masks(a_groups, c_groups, self_mask, twin, options)
  stats = row_stats(raw, *masks, options.hard_beta)      # the masks exclude the anchor
  per_anchor = loss_from_stats(stats, options, -1.0 / temperature)
  hit = (jnp.argmax(logits, axis=-1) == pos_col).astype(logits.dtype)
  metrics = {"accuracy": _global_mean(hit, axis_name)}
  if groups is not None:
    metrics.update(diagnostics(stats, 1.0 / temperature, axis_name))
  return _out(_global_mean(per_anchor, axis_name), metrics, return_metrics)


def _check_groups(groups: jax.Array, n: int) -> None:
  if groups.shape != (n,) or not jnp.issubdtype(groups.dtype, jnp.integer):
    raise ValueError(f"groups must be [{n}] integer ids (one per row; -1 unknown), got "
                     f"{groups.shape} {groups.dtype}")


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
  _check_embeddings("image_emb", image_emb, "text_emb", text_emb)
  _check_positive("logit_scale", logit_scale)
  n = image_emb.shape[0]
  img, txt = l2_normalize(image_emb), l2_normalize(text_emb)
  labels = _row_offset(n, axis_name) + jnp.arange(n)
  if groups is None and options.plain:
    i2t, hit_i2t = _cross_entropy(logit_scale * _sim(img, _gather(txt, axis_name)), labels)
    t2i, hit_t2i = _cross_entropy(logit_scale * _sim(txt, _gather(img, axis_name)), labels)
  else:
    # Multi-positive (identical captions: same group id) is the same in both directions.
    if groups is not None:
      _check_groups(groups, n)
    c_groups = None if groups is None else _gather(groups, axis_name)

    def direction(a, b):
      logits = logit_scale * _sim(a, _gather(b, axis_name))
      twin = jnp.arange(logits.shape[1])[None, :] == labels[:, None]
      masks = _group_masks(groups, c_groups, jnp.zeros_like(twin), twin, options)
      stats = row_stats(logits, *masks, options.hard_beta)
      hit = (jnp.argmax(logits, axis=-1) == labels).astype(logits.dtype)
      return loss_from_stats(stats, options, -logit_scale), hit

    (i2t, hit_i2t), (t2i, hit_t2i) = direction(img, txt), direction(txt, img)
  loss = 0.5 * (_global_mean(i2t, axis_name) + _global_mean(t2i, axis_name))
  acc_i2t, acc_t2i = _global_mean(hit_i2t, axis_name), _global_mean(hit_t2i, axis_name)
  metrics = {"accuracy": 0.5 * (acc_i2t + acc_t2i), "i2t_accuracy": acc_i2t,
             "t2i_accuracy": acc_t2i}
  return _out(loss, metrics, return_metrics)


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
  _check_embeddings("q", q, "k", k)
  _check_positive("temperature", temperature)
  if queue.ndim != 2 or queue.shape[1] != q.shape[1]:
    raise ValueError(
        f"queue must be [K, {q.shape[1]}] to match the keys' feature size, got {queue.shape}; "
        "build the queue with the projection head's output dimension")
  q = l2_normalize(q)
  k = jax.lax.stop_gradient(l2_normalize(k))
  queue = jax.lax.stop_gradient(queue.astype(q.dtype))
  l_pos = jnp.sum(q * k, axis=-1, keepdims=True)                        # [n, 1]
  l_neg = _sim(q, queue)                                                 # [n, K]
  logits = jnp.concatenate([l_pos, l_neg], axis=1) / temperature
  labels = jnp.zeros((q.shape[0],), jnp.int32)
  if options.plain:
    per_row, hit = _cross_entropy(logits, labels)
  else:
    if options.multi_positive:
      raise ValueError("moco_loss has no group ids for its queue; multi_positive is for "
                       "SimCLR (labels) and CLIP/SigLIP (captions)")
    twin = jnp.arange(logits.shape[1])[None, :] == 0
    twin = jnp.broadcast_to(twin, logits.shape)
    masks = _group_masks(None, None, jnp.zeros_like(twin), twin, options)
    stats = row_stats(logits, *masks, options.hard_beta)
    per_row = loss_from_stats(stats, options, -1.0 / temperature)
    hit = (jnp.argmax(logits, axis=-1) == 0).astype(logits.dtype)
  loss = _global_mean(per_row, axis_name)
  return _out(loss, {"accuracy": _global_mean(hit, axis_name)}, return_metrics)


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
  _check_embeddings("q", q, "k", k)
  _check_positive("temperature", temperature)
  n = q.shape[0]
  q = l2_normalize(q)
  k = jax.lax.stop_gradient(l2_normalize(k))
  logits = _sim(q, _gather(k, axis_name)) / temperature                  # [n, N]
  per_row, hit = _cross_entropy(logits, _row_offset(n, axis_name) + jnp.arange(n))
  loss = 2.0 * temperature * _global_mean(per_row, axis_name)
  return _out(loss, {"accuracy": _global_mean(hit, axis_name)}, return_metrics)


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
  _check_embeddings("image_emb", image_emb, "text_emb", text_emb)
  _check_positive("logit_scale", logit_scale)
  if jnp.ndim(logit_bias) != 0:
    raise ValueError(f"logit_bias must be a scalar, got shape {jnp.shape(logit_bias)}")
  n = image_emb.shape[0]
  img, txt = l2_normalize(image_emb), l2_normalize(text_emb)
  logits = logit_scale * _sim(img, _gather(txt, axis_name)) + logit_bias   # [n, N]
  pos_col = _row_offset(n, axis_name) + jnp.arange(n)
  is_pos = jnp.arange(logits.shape[1])[None, :] == pos_col[:, None]
  if options.reweighted or options.decoupled:
    raise ValueError("SigLIP has no softmax denominator: debias_tau_plus, hard_beta and "
                     "decoupled do not apply (config.negatives); multi_positive does")
  if groups is not None and options.multi_positive:
    _check_groups(groups, n)
    # Identical captions: z_ij = +1 for every pair of the same group (Zhai et al. 2023 treat
    # only the matching pair as positive; here a duplicate caption is not a negative).
    same = (groups[:, None] == _gather(groups, axis_name)[None, :]) & (groups >= 0)[:, None]
    is_pos = is_pos | same           # -1 (unknown) keeps its single positive
  signs = jnp.where(is_pos, 1.0, -1.0).astype(logits.dtype)
  per_row = -jnp.sum(jax.nn.log_sigmoid(signs * logits), axis=1)          # [n]
  loss = _global_mean(per_row, axis_name)
  hit = (jnp.argmax(logits, axis=-1) == pos_col).astype(logits.dtype)
  return _out(loss, {"accuracy": _global_mean(hit, axis_name)}, return_metrics)


LOSSES: dict[str, Callable[..., Any]] = {
    "nt_xent": nt_xent,
    "clip": clip_loss,
    "moco": moco_loss,
    "moco_v3": moco_v3_loss,
    "siglip": siglip_loss,
}


# ----------------------------------------------------------------------------- global wrapper


def sharded(loss_fn: Callable[..., Any], mesh: jax.sharding.Mesh, *, axis_name: str = "data",
            num_batch_args: int = 2, return_metrics: bool = False) -> Callable[..., Any]:
  """Runs ``loss_fn`` on global arrays: batch-split over ``axis_name`` with ``shard_map``.

  The first ``num_batch_args`` positional arguments are [N, D] global batches, split over the
  mesh axis; the remaining ones (temperature, scale, bias, the MoCo queue) are replicated.
  Shapes are checked before anything is traced or compiled: a global batch that does not split
  evenly over the devices raises a ``ValueError`` naming the fix.

  Usable inside or outside ``jit``; differentiable with respect to every argument.
  """
  num_shards = mesh.shape[axis_name]

  def wrapped(*args, **batch_kwargs):
    # Keyword arrays (``groups``) are [N] batch arrays split like the embeddings; None: absent.
    batch_kwargs = {k: v for k, v in batch_kwargs.items() if v is not None}
    names = sorted(batch_kwargs)
    args = tuple(args) + tuple(batch_kwargs[k] for k in names)
    num_pos_args = len(args) - len(names)
    for i, x in enumerate(args[:num_batch_args] + args[num_pos_args:]):
      rows = jnp.shape(x)[0]
      if rows % num_shards:
        raise ValueError(
            f"global batch of {rows} rows (argument {i}) is not divisible by the "
            f"{num_shards} devices of mesh axis '{axis_name}'; use a global batch that is a "
            f"multiple of {num_shards}")
    # Python numbers stay static (so the loss validates them); arrays go through shard_map.
    is_batch = [i < num_batch_args or i >= num_pos_args for i in range(len(args))]
    is_static = [not b and isinstance(x, (int, float)) for x, b in zip(args, is_batch)]
    dynamic = [x for x, s in zip(args, is_static) if not s]

    def per_shard(*dyn):
      it = iter(dyn)
      full = [x if s else next(it) for x, s in zip(args, is_static)]
      kwargs = dict(zip(names, full[num_pos_args:]))
      return loss_fn(*full[:num_pos_args], axis_name=axis_name,
                     return_metrics=return_metrics, **kwargs)

    specs = tuple(P(axis_name) if b else P()
                  for b, s in zip(is_batch, is_static) if not s)
    return jax.shard_map(per_shard, mesh=mesh, in_specs=specs, out_specs=P())(*dynamic)

  return wrapped
