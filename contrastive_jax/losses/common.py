"""The per-shard building blocks of the loss package: input checks, the L2 normalisation,
gathers and global means, and the row statistics that every option of ``NegativeOptions``
is a function of (shared by ``gathered`` and ``ring``).

Negatives that are not negatives (``NegativeOptions``; ``config.negatives``): debiased
(Chuang et al. 2020), hard-negative weights (Robinson et al. 2021), decoupled (Yeh et al.
2022), multi-positive / SupCon (Khosla et al. 2020). Every option's per-row loss is a function
of per-row sums over the candidates (``row_stats``: log-sum-exps over positives and negatives,
sums of positive logits, counts), so the ring form accumulates the same statistics block by
block and shares ``loss_from_stats``.

Similarities, logits and log-sum-exps are computed in float32 (float64 if the inputs are
float64) whatever the input dtype, with ``Precision.HIGHEST`` matmuls so that TPUs do not
round the logits to bf16. Masking uses ``-inf`` on float32 logits, never a large constant.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST

# ----------------------------------------------------------------------------- validation


def check_embeddings(name_a: str, a: jax.Array, name_b: str, b: jax.Array) -> None:
  if a.ndim != 2 or b.ndim != 2:
    raise ValueError(
        f"{name_a} and {name_b} must be [batch, dim] arrays, got shapes {a.shape} and "
        f"{b.shape}; flatten or pool the features first")
  if a.shape != b.shape:
    raise ValueError(
        f"{name_a} {a.shape} and {name_b} {b.shape} must have the same shape: one "
        "positive per row, same embedding size")


def check_positive(name: str, value: Any) -> None:
  """Rejects non-positive concrete values; traced values (learned scales) are the caller's."""
  if jnp.ndim(value) != 0:
    raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}")
  if isinstance(value, jax.core.Tracer):
    return
  if not np.all(np.asarray(value) > 0):
    raise ValueError(f"{name} must be positive, got {value}; use a value > 0 (e.g. 0.1)")


def check_groups(groups: jax.Array, n: int) -> None:
  if groups.shape != (n,) or not jnp.issubdtype(groups.dtype, jnp.integer):
    raise ValueError(f"groups must be [{n}] integer ids (one per row; -1 unknown), got "
                     f"{groups.shape} {groups.dtype}")


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


def gather(x: jax.Array, axis_name: str | None) -> jax.Array:
  """[n, D] local rows -> [N, D] global rows, in device order along ``axis_name``."""
  if axis_name is None:
    return x
  return jax.lax.all_gather(x, axis_name, axis=0, tiled=True)


def row_offset(n: int, axis_name: str | None) -> jax.Array:
  """Global index of this shard's first row: ``axis_index * n`` (0 on one device)."""
  if axis_name is None:
    return jnp.zeros((), jnp.int32)
  return jax.lax.axis_index(axis_name) * n


def global_mean(x: jax.Array, axis_name: str | None) -> jax.Array:
  """Mean of a per-row quantity over the global batch (equal rows on every shard)."""
  m = jnp.mean(x)
  return m if axis_name is None else jax.lax.pmean(m, axis_name)


def similarity(a: jax.Array, b: jax.Array) -> jax.Array:
  """[n, D] x [M, D] -> [n, M] dot products in the inputs' (>= float32) dtype."""
  return jnp.einsum("nd,md->nm", a, b, precision=HIGHEST,
                    preferred_element_type=jnp.promote_types(a.dtype, b.dtype))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-row softmax cross-entropy and top-1 hit, for integer ``labels`` [n]."""
  lse = jax.nn.logsumexp(logits, axis=-1)
  pos = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  hit = (jnp.argmax(logits, axis=-1) == labels).astype(logits.dtype)
  return lse - pos, hit


def result(loss, metrics, return_metrics):
  """What a loss returns: ``(loss, metrics)`` with ``return_metrics``, else ``loss``."""
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


def masked_lse_terms(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
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
  out = {"pos": masked_lse_terms(logits, pos), "neg": masked_lse_terms(logits, neg),
         "neg_hard": masked_lse_terms((1.0 + beta) * logits, neg),
         "neg_beta": masked_lse_terms(beta * logits, neg)}
  count = lambda mask: jnp.sum(mask.astype(logits.dtype), axis=-1)
  out["pos_logit"] = jnp.sum(jnp.where(pos, logits, 0.0), axis=-1)
  out["num_pos"], out["num_neg"] = count(pos), count(neg)
  out["diag_count"], out["diag_total"] = count(diag), count(diag_total)
  out["diag_logit"] = jax.lax.stop_gradient(jnp.sum(jnp.where(diag, logits, 0.0), axis=-1))
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


def mean_and_metrics(per_row: jax.Array, hit: jax.Array, axis_name: str | None,
                     return_metrics: bool, stats: dict[str, Any] | None = None,
                     scale: jax.Array | None = None):
  """A loss's global mean of ``per_row`` [n] and its metrics: the accuracy (mean of ``hit``
  [n]) and, given the row ``stats``, their ``diagnostics`` (``scale``: logits per cosine)."""
  metrics = {"accuracy": global_mean(hit, axis_name)}
  if stats is not None:
    metrics.update(diagnostics(stats, scale, axis_name))
  return result(global_mean(per_row, axis_name), metrics, return_metrics)


def group_masks(a_groups, c_groups, self_mask, twin, options):
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


