"""Float64 numpy references of the contrastive losses, written from the papers' formulas.

Independent of ``contrastive_jax.losses``: explicit loops over anchors where the paper writes
a sum, so that a vectorisation or label-offset mistake in the library cannot hide here.
Gradients come from central finite differences of these references in float64.
"""

from __future__ import annotations

import numpy as np


def normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _neg_log_softmax_at(logits_row, index, exclude=()):
  keep = [j for j in range(len(logits_row)) if j not in exclude]
  den = np.log(np.sum(np.exp(logits_row[keep] - logits_row[keep].max()))) + logits_row[keep].max()
  return den - logits_row[index]


def nt_xent(z1, z2, temperature):
  """SimCLR eq. (1): l(i,j) = -log exp(s_ij/t) / sum_{k != i} exp(s_ik/t); L = mean over 2N."""
  z = normalize(np.concatenate([z1, z2]))
  n2 = len(z)
  n = n2 // 2
  sim = z @ z.T / temperature
  losses, hits = [], []
  for i in range(n2):
    pos = (i + n) % n2
    losses.append(_neg_log_softmax_at(sim[i], pos, exclude=(i,)))
    masked = sim[i].copy()
    masked[i] = -np.inf
    hits.append(np.argmax(masked) == pos)
  return np.mean(losses), np.mean(hits)


def clip_loss(img, txt, scale):
  """CLIP: (CE over rows of s*I.T^T + CE over its columns) / 2, mean over N pairs."""
  i, t = normalize(img), normalize(txt)
  logits = scale * i @ t.T
  n = len(i)
  i2t = np.mean([_neg_log_softmax_at(logits[r], r) for r in range(n)])
  t2i = np.mean([_neg_log_softmax_at(logits[:, c], c) for c in range(n)])
  acc = 0.5 * (np.mean(np.argmax(logits, 1) == np.arange(n))
               + np.mean(np.argmax(logits, 0) == np.arange(n)))
  return 0.5 * (i2t + t2i), acc


def moco_loss(q, k, queue, temperature):
  """MoCo eq. (1): -log exp(q.k+/t) / (exp(q.k+/t) + sum_queue exp(q.k-/t))."""
  q, k = normalize(q), normalize(k)
  queue = np.asarray(queue, np.float64)
  losses, hits = [], []
  for r in range(len(q)):
    row = np.concatenate([[q[r] @ k[r]], queue @ q[r]]) / temperature
    losses.append(_neg_log_softmax_at(row, 0))
    hits.append(np.argmax(row) == 0)
  return np.mean(losses), np.mean(hits)


def moco_v3_loss(q, k, temperature):
  """MoCo v3 Alg. 1: CrossEntropy(q k^T / t, arange(N)) * 2t."""
  q, k = normalize(q), normalize(k)
  logits = q @ k.T / temperature
  n = len(q)
  loss = np.mean([_neg_log_softmax_at(logits[r], r) for r in range(n)])
  return 2 * temperature * loss, np.mean(np.argmax(logits, 1) == np.arange(n))


def siglip_loss(img, txt, scale, bias):
  """SigLIP Alg. 1: -sum_ij log sigmoid(z_ij (t x_i.y_j + b)) / N."""
  x, y = normalize(img), normalize(txt)
  n = len(x)
  total = 0.0
  for i in range(n):
    for j in range(n):
      z = 1.0 if i == j else -1.0
      total += np.logaddexp(0.0, -z * (scale * x[i] @ y[j] + bias))  # -log sigmoid
  logits = scale * x @ y.T + bias
  return total / n, np.mean(np.argmax(logits, 1) == np.arange(n))


def numerical_grad(f, args, index, h=1e-6):
  """Central-difference gradient of scalar ``f(*args)`` w.r.t. ``args[index]`` (float64)."""
  args = [np.array(a, np.float64) if np.ndim(a) else float(a) for a in args]
  x = np.array(args[index], np.float64)
  grad = np.zeros_like(x)
  flat, gflat = x.reshape(-1), grad.reshape(-1)
  for p in range(flat.size):
    orig = flat[p]
    vals = []
    for delta in (h, -h):
      flat[p] = orig + delta
      a = list(args)
      a[index] = x.copy() if x.ndim else float(x)
      vals.append(f(*a))
    flat[p] = orig
    gflat[p] = (vals[0] - vals[1]) / (2 * h)
  return grad if x.ndim else float(grad)
