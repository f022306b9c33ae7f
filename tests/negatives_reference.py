"""Float64 numpy references of the negative-handling losses, from the papers' equations.

Explicit loops over anchors, independent of ``contrastive_jax``:

* debiased (Chuang et al. 2020, eq. 6) with hard-negative weights (Robinson et al. 2021,
  Sec. 3; weights ``exp(beta * logit)`` normalised to mean 1, as the authors' code):
  ``Ng = max((sum_k w_k e_k - N tau+ p) / (1 - tau+), N exp(-1/T))``,
  loss ``-log(p / (p + Ng))``; decoupled (Yeh et al. 2022, eq. 3): ``-log(p / Ng)``;
* SupCon L_out (Khosla et al. 2020, eq. 2): ``-1/|P(i)| sum_{p in P(i)} log(exp(l_ip) /
  sum_{a in A(i)} exp(l_ia))``; decoupled: A(i) without P(i);
* multi-positive CLIP (the SupCon form in each direction) and SigLIP (z_ij = +1 for every pair
  of the same caption, Zhai et al. 2023 Alg. 1 otherwise).
"""

from __future__ import annotations

import numpy as np

from loss_reference import normalize


def _debiased_row(pos_logit, neg_logits, tau_plus, beta, min_logit, decoupled):
  p = np.exp(pos_logit)
  e = np.exp(neg_logits)
  n = len(neg_logits)
  w = np.exp(beta * neg_logits)
  w = w / w.mean()                                     # importance weights, mean 1
  ng = (np.sum(w * e) - n * tau_plus * p) / (1.0 - tau_plus)
  ng = max(ng, n * np.exp(min_logit))
  return -np.log(p / ng) if decoupled else -np.log(p / (p + ng))


def _supcon_row(logits, positives, candidates, decoupled):
  den_set = [a for a in candidates if not (decoupled and a in positives)]
  den = np.sum(np.exp(logits[den_set]))
  return -np.mean([np.log(np.exp(logits[p]) / den) for p in positives])


def nt_xent(z1, z2, temperature, *, tau_plus=0.0, beta=0.0, decoupled=False, labels=None):
  """SimCLR anchors over the 2N views; ``labels`` (with -1 unknown) switch to SupCon."""
  z = normalize(np.concatenate([z1, z2]))
  n2 = len(z)
  n = n2 // 2
  logits = z @ z.T / temperature
  out = []
  for i in range(n2):
    twin = (i + n) % n2
    others = [k for k in range(n2) if k != i]
    if labels is not None:
      y = np.concatenate([labels, labels])
      positives = [k for k in others if k == twin or (y[i] >= 0 and y[k] == y[i])]
      out.append(_supcon_row(logits[i], positives, others, decoupled))
    else:
      negs = [k for k in others if k != twin]
      out.append(_debiased_row(logits[i, twin], logits[i, negs], tau_plus, beta,
                               -1.0 / temperature, decoupled))
  return np.mean(out)


def moco_loss(q, k, queue, temperature, *, tau_plus=0.0, beta=0.0, decoupled=False):
  q, k = normalize(q), normalize(k)
  queue = np.asarray(queue, np.float64)
  return np.mean([_debiased_row(q[r] @ k[r] / temperature, queue @ q[r] / temperature,
                                tau_plus, beta, -1.0 / temperature, decoupled)
                  for r in range(len(q))])


def clip_loss(img, txt, scale, groups, *, decoupled=False):
  """Mean of the two directions; the positives of row r: every column of r's caption group."""
  i, t = normalize(img), normalize(txt)
  logits = scale * i @ t.T
  n = len(i)
  rows = range(n)
  pos = lambda r: [c for c in rows if groups[c] == groups[r]]
  i2t = np.mean([_supcon_row(logits[r], pos(r), list(rows), decoupled) for r in rows])
  t2i = np.mean([_supcon_row(logits[:, c], pos(c), list(rows), decoupled) for c in rows])
  return 0.5 * (i2t + t2i)


def siglip_loss(img, txt, scale, bias, groups):
  i, t = normalize(img), normalize(txt)
  total = 0.0
  for r in range(len(i)):
    for c in range(len(t)):
      z = 1.0 if groups[r] == groups[c] else -1.0
      total += np.log1p(np.exp(-z * (scale * i[r] @ t[c] + bias)))
  return total / len(i)


def same_class_negatives(z1, z2, labels):
  """(fraction of the InfoNCE negatives of labelled anchors that share the anchor's label,
  their mean cosine similarity)."""
  z = normalize(np.concatenate([z1, z2]))
  y = np.concatenate([labels, labels])
  n2 = len(z)
  same, total, sims = 0, 0, []
  for i in range(n2):
    if y[i] < 0:
      continue
    for k in range(n2):
      if k in (i, (i + n2 // 2) % n2):
        continue
      total += 1
      if y[k] == y[i]:
        same += 1
        sims.append(z[i] @ z[k])
  return same / total, np.mean(sims)
