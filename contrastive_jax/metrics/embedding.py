"""Alignment and uniformity of embeddings on the hypersphere (Wang & Isola 2020, Sec. 4.1).

- Alignment (Eq. 2 of the paper): ``L_align = E_{(x, y) positive} ||f(x) - f(y)||_2^alpha``.
- Uniformity (Eq. 3): ``L_uniform = log E_{x, y i.i.d.} exp(-t ||f(x) - f(y)||_2^2)``, estimated
  over the distinct pairs ``i != j`` of a batch.

Both are lower-is-better and defined for L2-normalised features; these functions normalise
their inputs first (a no-op for embeddings that already are). Pure ``jnp`` functions of a
batch, computed in float32 (float64 inputs stay float64), usable inside ``jit`` (the trainer logs
them every step on the global batch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from contrastive_jax.losses import l2_normalize as _normalize


def alignment(z1: jax.Array, z2: jax.Array, alpha: float = 2.0) -> jax.Array:
  """Mean ``||z1_i - z2_i||^alpha`` over positive pairs; a float32 scalar in ``[0, 2^alpha]``.

  Args:
    z1: ``[N, D]`` embeddings of the first views (normalised here).
    z2: ``[N, D]`` embeddings of their positives, row ``i`` paired with ``z1[i]``.
    alpha: exponent (the paper uses 2).
  """
  if z1.shape != z2.shape or z1.ndim != 2:
    raise ValueError(f"alignment needs two [N, D] arrays of the same shape; got {z1.shape} and "
                     f"{z2.shape}")
  diff = _normalize(z1) - _normalize(z2)
  sq = jnp.sum(diff * diff, axis=-1)
  # ||d||^alpha = (||d||^2)^(alpha/2): no sqrt, so the gradient stays finite at d = 0 for alpha=2.
  return jnp.mean(sq ** (alpha / 2.0))


def uniformity(z: jax.Array, t: float = 2.0) -> jax.Array:
  """``log mean_{i != j} exp(-t ||z_i - z_j||^2)``; a float32 scalar in ``[-4t, 0]``.

  Args:
    z: ``[N, D]`` embeddings (normalised here), ``N >= 2``.
    t: the paper's ``t`` (2 in its experiments).
  """
  if z.ndim != 2 or z.shape[0] < 2:
    raise ValueError(f"uniformity needs [N, D] embeddings with N >= 2; got shape {z.shape}")
  n = z.shape[0]
  zn = _normalize(z)
  # For unit vectors ||a - b||^2 = 2 - 2 a.b; clipping at 0 removes round-off below zero.
  sq_dist = jnp.maximum(2.0 - 2.0 * (zn @ zn.T), 0.0)
  off_diagonal = ~jnp.eye(n, dtype=bool)
  # logsumexp over the N (N - 1) ordered distinct pairs: same mean as over i < j (symmetric),
  # stable where exp(-t d^2) underflows.
  log_sum = jax.nn.logsumexp(jnp.where(off_diagonal, -t * sq_dist, -jnp.inf))
  return log_sum - jnp.log(float(n * (n - 1)))
