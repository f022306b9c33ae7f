"""Linear and few-label probes on frozen features.

The linear evaluation protocol of the self-supervised literature (Zhang et al. 2016; Kolesnikov
et al. 2019; used by SimCLR, Chen et al. 2020, Appendix B.5, and by CLIP's linear probes,
Radford et al. 2021, Appendix A.3): a multinomial logistic regression is trained on frozen,
pre-extracted features, with its L2 penalty chosen on a validation split held out from the
training set, then refit on the whole training set and scored once on the test set.

Objective (full batch, minimised with L-BFGS, ``optax.lbfgs`` with its zoom line search):

    L(W, b) = (1 / sum_i m_i) sum_i m_i CE(softmax(x_i W + b), y_i) + (l2 / 2) ||W||_F^2

with ``x_i`` the features standardised by the training set's per-dimension mean and standard
deviation, ``m_i`` in {0, 1} row weights (padding rows and held-out rows get 0, so every fit
of a sweep has the same shapes and compiles once), and the bias not penalised. In terms of
scikit-learn's ``C``: ``l2 = 1 / (C * N)``.

Few-label probe: the same classifier trained on ``k`` labelled examples per class, ``draws``
seeded random subsets per ``k``, mean and standard deviation of the test accuracy over the
draws. Feature standardisation there uses the whole training set's statistics (they need no
labels, and unlabelled data is what the setting assumes is plentiful).

Accuracies are fractions in [0, 1]; top-5 is reported only when there are more than 5 classes.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu
from jax.sharding import Mesh

from contrastive_jax.distributed import data_sharding, replicated
from contrastive_jax.evaluate.features import map_row_chunks
from contrastive_jax.evaluate.zero_shot import top_k_hits

DEFAULT_L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
_STD_FLOOR = 1e-6


# ----------------------------------------------------------------------------------------------
# The solver


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _fit(x: jax.Array, y: jax.Array, weight: jax.Array, l2: jax.Array, max_iter: jax.Array,
         tol: jax.Array, *, num_classes: int):
  """L-BFGS on the weighted, L2-penalised softmax regression; returns (params, iterations).

  ``x [N, D] float32``, ``y [N] int32``, ``weight [N] float32``; ``l2``, ``max_iter``, ``tol``
  are traced scalars so that a whole regulariser sweep reuses one compilation.
  """
  targets = jax.nn.one_hot(y, num_classes, dtype=jnp.float32)
  total = jnp.maximum(jnp.sum(weight), 1.0)

  def objective(params):
    logits = x @ params["w"] + params["b"]
    ce = optax.softmax_cross_entropy(logits, targets)
    return jnp.sum(weight * ce) / total + 0.5 * l2 * jnp.sum(jnp.square(params["w"]))

  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)
  params = {"w": jnp.zeros((x.shape[1], num_classes), jnp.float32),
            "b": jnp.zeros((num_classes,), jnp.float32)}

  def step(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad,
                                   value_fn=objective)
    return optax.apply_updates(params, updates), state

  def not_done(carry):
    _, state = carry
    count = otu.tree_get(state, "count")
    grad_norm = otu.tree_norm(otu.tree_get(state, "grad"))
    return (count == 0) | ((count < max_iter) & (grad_norm >= tol))

  params, state = jax.lax.while_loop(not_done, step, (params, solver.init(params)))
  return params, otu.tree_get(state, "count")


def _padded_rows(n: int, multiple: int) -> int:
  """Row count after padding: few distinct sizes, so repeated probes reuse compilations."""
  size = 1 << max(n - 1, 0).bit_length() if n <= 4096 else -(-n // 1024) * 1024
  return -(-size // multiple) * multiple


class _Problem:
  """Standardised training rows, padded and put on device once for a whole sweep."""

  def __init__(self, x: np.ndarray, y: np.ndarray, num_classes: int, mesh: Mesh | None):
    n = x.shape[0]
    self.n, self.num_classes, self.mesh = n, num_classes, mesh
    rows = _padded_rows(n, mesh.size if mesh is not None else 1)
    x = np.concatenate([x, np.zeros((rows - n, x.shape[1]), np.float32)])
    y = np.concatenate([y, np.zeros((rows - n,), np.int32)])
    if mesh is not None:
      self.x = jax.device_put(x, data_sharding(mesh))
      self.y = jax.device_put(y, data_sharding(mesh))
    else:
      self.x, self.y = jnp.asarray(x), jnp.asarray(y)

  def fit(self, weight: np.ndarray, l2: float, max_iter: int, tol: float):
    """``weight [n]`` in {0, 1} selects the rows this fit trains on."""
    w = np.zeros((self.x.shape[0],), np.float32)
    w[:self.n] = weight
    w = jax.device_put(w, data_sharding(self.mesh)) if self.mesh is not None else jnp.asarray(w)
    scalars = (jnp.float32(l2), jnp.int32(max_iter), jnp.float32(tol))
    if self.mesh is not None:
      scalars = jax.device_put(scalars, replicated(self.mesh))
    params, iters = _fit(self.x, self.y, w, *scalars, num_classes=self.num_classes)
    if int(iters) >= max_iter:
      logging.info("linear probe: L-BFGS stopped at max_iter=%d (l2=%g) before the gradient "
                   "norm reached tol=%g", max_iter, l2, tol)
    return jax.device_get(params)


def _linear(rows, w, b):
  return rows @ w + b


def _scores(params, x: np.ndarray, chunk: int = 8192) -> np.ndarray:
  """``[M, C]`` logits of the fitted probe."""
  return map_row_chunks(_linear, x.astype(np.float32), params["w"], params["b"], chunk=chunk)


def _accuracies(scores: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
  ks = (1, 5) if num_classes > 5 else (1,)
  return {f"top{k}": float(np.mean(np.asarray(top_k_hits(scores, labels, k)))) for k in ks}


def _mean_ce(scores: np.ndarray, labels: np.ndarray) -> float:
  scores = scores.astype(np.float64)
  m = scores.max(axis=1, keepdims=True)
  log_z = m[:, 0] + np.log(np.exp(scores - m).sum(axis=1))
  return float(np.mean(log_z - scores[np.arange(len(labels)), labels]))


def _better(candidate: tuple[float, float], best: tuple[float, float] | None) -> bool:
  """Validation (accuracy, cross-entropy): higher accuracy wins, ties go to the lower CE."""
  return best is None or candidate[0] > best[0] or (
      candidate[0] == best[0] and candidate[1] < best[1])


# ----------------------------------------------------------------------------------------------
# Inputs


def _standardizer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-dimension mean and std of ``x``; constant dimensions (std ~ 0) are left unscaled."""
  x = np.asarray(x, np.float64)
  mean, std = x.mean(axis=0), x.std(axis=0)
  return mean.astype(np.float32), np.where(std < _STD_FLOOR, 1.0, std).astype(np.float32)


def _check_xy(name: str, x: np.ndarray, y: np.ndarray, num_classes: int) -> None:
  if x.ndim != 2:
    raise ValueError(f"{name}_x must be [N, D] features; got shape {x.shape} (flatten pixels "
                     "with x.reshape(len(x), -1) for a raw-pixel baseline)")
  if y.shape != (x.shape[0],):
    raise ValueError(f"{name}_y of shape {y.shape} for {x.shape[0]} rows of {name}_x")
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise ValueError(f"{name}_y must lie in [0, num_classes={num_classes})")


def stratified_split(labels: np.ndarray, val_fraction: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Seeded, stratified split into (train indices, validation indices), both sorted.

  Class ``c`` with ``n_c`` examples gives ``round(val_fraction * n_c)`` of them, but never all,
  to the validation split (a class with one example stays in training).
  """
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction={val_fraction} must lie strictly between 0 and 1")
  labels = np.asarray(labels).reshape(-1)
  val = []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_val = min(int(round(val_fraction * len(idx))), len(idx) - 1)
    val.append(idx[:n_val])
  val = np.sort(np.concatenate(val)).astype(np.int64)
  train = np.setdiff1d(np.arange(labels.shape[0]), val)
  return train, val


def balanced_subset(labels: np.ndarray, shots: int, num_classes: int,
                    rng: np.random.Generator) -> np.ndarray:
  """``[shots * num_classes]`` sorted indices: ``shots`` distinct examples of every class."""
  labels = np.asarray(labels).reshape(-1)
  picked = []
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c)
    if len(idx) < shots:
      raise ValueError(f"class {c} has {len(idx)} examples, fewer than shots={shots}")
    picked.append(rng.choice(idx, size=shots, replace=False))
  return np.sort(np.concatenate(picked))


# ----------------------------------------------------------------------------------------------
# Public probes


def fit_logistic_regression(x: np.ndarray, y: np.ndarray, *, num_classes: int, l2: float,
                            max_iter: int = 1000, tol: float = 1e-5,
                            mesh: Mesh | None = None) -> dict[str, np.ndarray]:
  """Minimises the module docstring's objective (all row weights 1) on ``x`` as given.

  No standardisation here (the probes standardise before calling the solver).

  Args:
    x: ``[N, D]`` features; y: ``[N]`` int labels; l2: the penalty; others as in
      :func:`linear_probe`.

  Returns:
    ``{"w": [D, C] float32, "b": [C] float32}``; logits are ``x @ w + b``.
  """
  x, y = np.asarray(x, np.float32), np.asarray(y).reshape(-1)
  _check_xy("train", x, y, num_classes)
  problem = _Problem(x, y.astype(np.int32), num_classes, mesh)
  return problem.fit(np.ones((len(y),), np.float32), l2, max_iter, tol)


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, *, num_classes: int,
                 l2_grid: Sequence[float] = DEFAULT_L2_GRID, val_fraction: float = 0.2,
                 seed: int = 0, max_iter: int = 1000, tol: float = 1e-5,
                 mesh: Mesh | None = None) -> dict:
  """Logistic-regression probe with the L2 penalty chosen on a held-out validation split.

  Args:
    train_x: ``[N, D]`` frozen features (or flattened pixels for a raw-pixel baseline).
    train_y: ``[N]`` int labels in ``[0, num_classes)``.
    test_x: ``[M, D]`` test features.
    test_y: ``[M]`` int labels.
    num_classes: ``C``.
    l2_grid: penalties tried (see the module docstring for the objective's scale).
    val_fraction: per-class share of the training set held out to pick the penalty
      (stratified, seeded by ``seed``). The selection maximises validation top-1, ties going to
      the lower validation cross-entropy.
    seed: seed of the split.
    max_iter: L-BFGS iterations at most per fit.
    tol: stop when the gradient norm of the objective falls below it.
    mesh: optional ``("data",)`` mesh; the training rows are then sharded over its devices
      (each process must pass the same full arrays).

  Returns:
    ``{"top1", "top5" (C > 5), "l2", "val_top1", "val_top1_per_l2": {l2: acc}}``; ``top1`` and
    ``top5`` are test accuracies of the refit on the whole training set.
  """
  train_x, test_x = np.asarray(train_x, np.float32), np.asarray(test_x, np.float32)
  train_y, test_y = np.asarray(train_y).reshape(-1), np.asarray(test_y).reshape(-1)
  _check_xy("train", train_x, train_y, num_classes)
  _check_xy("test", test_x, test_y, num_classes)
  if test_x.shape[1] != train_x.shape[1]:
    raise ValueError(f"train_x has {train_x.shape[1]} features, test_x {test_x.shape[1]}")
  if not l2_grid or min(l2_grid) < 0:
    raise ValueError(f"l2_grid={tuple(l2_grid)} must be non-empty and non-negative")
  train_idx, val_idx = stratified_split(train_y, val_fraction, np.random.default_rng(seed))
  if len(val_idx) == 0:
    raise ValueError("the validation split is empty (every class has a single example); use "
                     "few_label_probe, or pass more labelled data")

  mean, std = _standardizer(train_x)
  xs, test_xs = (train_x - mean) / std, (test_x - mean) / std
  problem = _Problem(xs, train_y.astype(np.int32), num_classes, mesh)
  fit_on_train = np.zeros((len(train_y),), np.float32)
  fit_on_train[train_idx] = 1.0

  best, best_l2, per_l2 = None, None, {}
  for l2 in l2_grid:
    params = problem.fit(fit_on_train, l2, max_iter, tol)
    scores = _scores(params, xs[val_idx])
    key = (_accuracies(scores, train_y[val_idx], num_classes)["top1"],
           _mean_ce(scores, train_y[val_idx]))
    per_l2[float(l2)] = key[0]
    if _better(key, best):
      best, best_l2 = key, float(l2)

  params = problem.fit(np.ones((len(train_y),), np.float32), best_l2, max_iter, tol)
  result = _accuracies(_scores(params, test_xs), test_y, num_classes)
  result.update(l2=best_l2, val_top1=best[0], val_top1_per_l2=per_l2)
  return result


def few_label_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                    test_y: np.ndarray, *, num_classes: int, shots: Sequence[int] = (1, 10, 100),
                    draws: int = 5, seed: int = 0, l2_grid: Sequence[float] = DEFAULT_L2_GRID,
                    cv_folds: int = 5, max_iter: int = 500, tol: float = 1e-5,
                    mesh: Mesh | None = None) -> dict:
  """Probe accuracy with ``k`` labelled examples per class, over seeded random draws.

  For each ``k`` in ``shots`` and each draw ``d`` a balanced subset (``k`` distinct examples of
  every class, ``numpy.random.default_rng((seed, k, d))``) is labelled. The penalty is chosen
  on the subset itself:

  - ``k >= 2``: stratified ``min(cv_folds, k)``-fold cross-validation on the subset (each fold
    holds out the same number of examples of every class, up to one), by mean fold top-1, ties
    to the lower cross-entropy; then a refit on the whole subset.
  - ``k == 1``: nothing can be held out, so the largest penalty of ``l2_grid`` is used; with a
    strong penalty the probe approaches a nearest-class-mean classifier, the usual one-shot
    baseline.

  A ``k`` larger than the smallest class (over all ``num_classes``) is skipped: its entry is
  ``{"skipped": reason}`` and a warning is logged.

  Args:
    train_x, train_y: the labelled pool ``[N, D]``, ``[N]``.
    test_x, test_y: ``[M, D]``, ``[M]``.
    num_classes: ``C``.
    shots: the ``k`` values.
    draws: random subsets per ``k``.
    seed: base seed of the draws.
    l2_grid, cv_folds, max_iter, tol, mesh: as in :func:`linear_probe`.

  Returns:
    ``{k: {"top1_mean", "top1_std", "top5_mean", "top5_std" (C > 5), "top1_per_draw",
    "l2_per_draw", "num_labelled", "draws"}}``; std is the sample standard deviation over
    the draws (``ddof=1``; 0 for a single draw).
  """
  train_x, test_x = np.asarray(train_x, np.float32), np.asarray(test_x, np.float32)
  train_y, test_y = np.asarray(train_y).reshape(-1), np.asarray(test_y).reshape(-1)
  _check_xy("train", train_x, train_y, num_classes)
  _check_xy("test", test_x, test_y, num_classes)
  if draws < 1:
    raise ValueError(f"draws={draws} must be at least 1")
  if cv_folds < 2:
    raise ValueError(f"cv_folds={cv_folds} must be at least 2")
  if not l2_grid:
    raise ValueError("l2_grid must be non-empty")
  smallest = int(np.bincount(train_y, minlength=num_classes).min())
  mean, std = _standardizer(train_x)
  xs, test_xs = (train_x - mean) / std, (test_x - mean) / std

  results: dict = {}
  for k in shots:
    if k < 1 or k > smallest:
      reason = (f"shots={k} needs {k} examples of every class; the smallest class has "
                f"{smallest}")
      logging.warning("few_label_probe: skipping %s", reason)
      results[k] = {"skipped": reason}
      continue
    per_draw: dict[str, list] = {"top1": [], "top5": [], "l2": []}
    for d in range(draws):
      rng = np.random.default_rng((seed, k, d))
      subset = balanced_subset(train_y, k, num_classes, rng)
      sx, sy = xs[subset], train_y[subset].astype(np.int32)
      problem = _Problem(sx, sy, num_classes, mesh)
      l2 = (max(l2_grid) if k == 1 else
            _cross_validated_l2(problem, sy, k, cv_folds, l2_grid, rng, max_iter, tol, sx))
      params = problem.fit(np.ones((len(sy),), np.float32), l2, max_iter, tol)
      acc = _accuracies(_scores(params, test_xs), test_y, num_classes)
      per_draw["top1"].append(acc["top1"])
      per_draw["top5"].append(acc.get("top5"))
      per_draw["l2"].append(l2)
    entry = {"num_labelled": k * num_classes, "draws": draws,
             "top1_per_draw": per_draw["top1"], "l2_per_draw": per_draw["l2"]}
    for name in ("top1", "top5") if num_classes > 5 else ("top1",):
      vals = np.asarray(per_draw[name], np.float64)
      entry[f"{name}_mean"] = float(vals.mean())
      entry[f"{name}_std"] = float(vals.std(ddof=1)) if draws > 1 else 0.0
    results[k] = entry
  return results


def _cross_validated_l2(problem: _Problem, labels: np.ndarray, shots: int, cv_folds: int,
                        l2_grid: Sequence[float], rng: np.random.Generator, max_iter: int,
                        tol: float, x: np.ndarray) -> float:
  """The penalty of best stratified k-fold accuracy on a balanced labelled subset."""
  folds = min(cv_folds, shots)
  fold_of = np.empty((len(labels),), np.int64)
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    fold_of[idx] = np.arange(len(idx)) % folds
  best, best_l2 = None, None
  for l2 in l2_grid:
    accs, ces = [], []
    for f in range(folds):
      held = fold_of == f
      params = problem.fit((~held).astype(np.float32), l2, max_iter, tol)
      scores = _scores(params, x[held])
      accs.append(_accuracies(scores, labels[held], problem.num_classes)["top1"])
      ces.append(_mean_ce(scores, labels[held]))
    key = (float(np.mean(accs)), float(np.mean(ces)))
    if _better(key, best):
      best, best_l2 = key, float(l2)
  return best_l2
