"""Tests of contrastive_jax.evaluate against float64 numpy references and hand-built cases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax.distributed import make_mesh
from contrastive_jax.evaluate import (
    balanced_subset, class_text_embeddings, extract_features, extract_features_from_iterator,
    few_label_probe, fit_logistic_regression, knn_accuracy, knn_class_scores, linear_probe,
    retrieval_recall, stratified_split, top_k_hits, zero_shot_accuracy)
from contrastive_jax.metrics import alignment, uniformity


def _clusters(rng, n, num_classes, dim, spread=6.0, centers=None):
  """Gaussian blobs around well-separated centres; returns (x, y, centers)."""
  if centers is None:
    centers = rng.normal(size=(num_classes, dim)) * spread
  y = rng.integers(0, num_classes, n)
  return (centers[y] + rng.normal(size=(n, dim))).astype(np.float32), y, centers


def _normalize64(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------- kNN


def _knn_reference(train, train_y, test, num_classes, k, temperature):
  """InstDisc weighted kNN in float64, by an explicit loop."""
  tr, te = _normalize64(train), _normalize64(test)
  scores = np.zeros((len(te), num_classes))
  for i, f in enumerate(te):
    sims = tr @ f
    for j in np.argsort(-sims)[:k]:
      scores[i, train_y[j]] += np.exp(sims[j] / temperature)
  return scores


def test_knn_weighting_matches_float64_reference():
  rng = np.random.default_rng(0)
  train = rng.normal(size=(30, 5)) * rng.uniform(0.5, 3.0, size=(30, 1))  # norms vary
  train_y = rng.integers(0, 4, 30)
  test = rng.normal(size=(11, 5))
  ref = _knn_reference(train, train_y, test, 4, k=7, temperature=0.07)
  # No ties at the k-th neighbour (random floats), and chunk=4 does not divide 11 rows.
  got = knn_class_scores(train, train_y, test, num_classes=4, k=7, temperature=0.07, chunk=4)
  np.testing.assert_allclose(got, ref, rtol=2e-5)
  test_y = rng.integers(0, 4, 11)
  acc = knn_accuracy(train, train_y, test, test_y, num_classes=4, k=7, chunk=4)
  assert acc["top1"] == pytest.approx(np.mean(ref.argmax(1) == test_y))
  assert "top5" not in acc and acc["k"] == 7


def test_knn_memory_sharded_over_mesh():
  rng = np.random.default_rng(11)
  train, train_y = rng.normal(size=(30, 5)), rng.integers(0, 4, 30)  # 30 rows: 2 padding rows
  test = rng.normal(size=(9, 5))
  ref = _knn_reference(train, train_y, test, 4, k=30, temperature=0.07)
  got = knn_class_scores(train, train_y, test, num_classes=4, k=100, mesh=make_mesh(8))
  np.testing.assert_allclose(got, ref, rtol=2e-5)


def test_knn_top5_and_k_clamped_to_train_size():
  rng = np.random.default_rng(1)
  train, train_y = rng.normal(size=(25, 6)), rng.integers(0, 9, 25)
  test, test_y = rng.normal(size=(13, 6)), rng.integers(0, 9, 13)
  ref = _knn_reference(train, train_y, test, 9, k=25, temperature=0.1)
  acc = knn_accuracy(train, train_y, test, test_y, num_classes=9, k=200, temperature=0.1)
  assert acc["k"] == 25
  ranks = np.sum(ref > ref[np.arange(13), test_y][:, None], axis=1)
  assert acc["top1"] == pytest.approx(np.mean(ranks < 1))
  assert acc["top5"] == pytest.approx(np.mean(ranks < 5))


def test_knn_clusters_and_random_labels():
  rng = np.random.default_rng(2)
  train, train_y, centers = _clusters(rng, 600, 10, 16)
  test, test_y, _ = _clusters(rng, 400, 10, 16, centers=centers)
  assert knn_accuracy(train, train_y, test, test_y, num_classes=10)["top1"] > 0.99
  # Labels independent of the features: chance is 0.1 (std 0.011 over 800 rows).
  rand_train_y = rng.integers(0, 10, 600)
  test2, _, _ = _clusters(rng, 800, 10, 16, centers=centers)
  acc = knn_accuracy(train, rand_train_y, test2, rng.integers(0, 10, 800), num_classes=10)
  assert abs(acc["top1"] - 0.1) < 0.05
  assert abs(acc["top5"] - 0.5) < 0.08


# -------------------------------------------------------------------------------- linear probe


def test_logistic_regression_reaches_the_optimum():
  """The gradient of the documented objective, in float64, vanishes at the returned solution."""
  rng = np.random.default_rng(3)
  x, y, _ = _clusters(rng, 90, 3, 4, spread=1.0)  # overlapping: a finite, interior optimum
  l2 = 1e-2
  p = fit_logistic_regression(x, y, num_classes=3, l2=l2, max_iter=500, tol=1e-6)
  w, b = np.asarray(p["w"], np.float64), np.asarray(p["b"], np.float64)
  logits = x.astype(np.float64) @ w + b
  prob = np.exp(logits - logits.max(1, keepdims=True))
  prob /= prob.sum(1, keepdims=True)
  resid = (prob - np.eye(3)[y]) / len(y)
  grad_w, grad_b = x.T @ resid + l2 * w, resid.sum(0)
  assert np.linalg.norm(grad_w) < 1e-4 and np.linalg.norm(grad_b) < 1e-4
  assert np.linalg.norm(w) > 0.1  # not stuck at the zero initialisation
  # Sharded rows (8 devices, 90 rows padded with zero-weight rows) give the same solution.
  p8 = fit_logistic_regression(x, y, num_classes=3, l2=l2, max_iter=500, tol=1e-6,
                               mesh=make_mesh(8))
  np.testing.assert_allclose(p8["w"], p["w"], atol=1e-3)


def test_linear_probe_clusters_and_random_labels():
  rng = np.random.default_rng(4)
  train, train_y, centers = _clusters(rng, 300, 10, 12)
  test, test_y, _ = _clusters(rng, 1000, 10, 12, centers=centers)
  grid = (1e-4, 1e-2, 1e-1)
  res = linear_probe(train, train_y, test, test_y, num_classes=10, l2_grid=grid, max_iter=200)
  assert res["top1"] > 0.98 and res["top5"] > 0.99
  assert res["l2"] in grid and set(res["val_top1_per_l2"]) == set(grid)
  res = linear_probe(train, rng.integers(0, 10, 300), test, test_y, num_classes=10,
                     l2_grid=grid, max_iter=200)
  assert abs(res["top1"] - 0.1) < 0.05  # chance; std 0.0095 over 1000 test rows


def test_linear_probe_picks_l2_on_held_out_train_rows_not_on_test():
  """A case where the two selections disagree. Train: class 0 (60 rows) and class 1 (40 rows)
  cleanly separated along one feature. Test: class-0 labels on class-1 features. A weak penalty
  separates the held-out train rows (top-1 1.0) and gets every test row wrong; a strong one
  predicts the majority class everywhere (held-out 12 / 20 = 0.6, test 1.0). Choosing on the
  held-out train rows must pick the weak one; choosing on the test split would pick the
  strong one."""
  rng = np.random.default_rng(5)
  train_y = np.repeat([0, 1], [60, 40])
  train = rng.normal(size=(100, 4)).astype(np.float32)  # 3 noise features
  train[:, 0] = np.where(train_y == 1, 2.0, -2.0) + 0.3 * rng.normal(size=100)
  test = rng.normal(size=(50, 4)).astype(np.float32)
  test[:, 0] = 2.0 + 0.3 * rng.normal(size=50)
  test_y = np.zeros(50, np.int64)
  weak, strong = 1e-4, 1e3
  # 3 classes (the third unused) and 4 features: the solver's compilation of the test above.
  res = linear_probe(train, train_y, test, test_y, num_classes=3, l2_grid=(strong, weak),
                     max_iter=200)
  assert res["val_top1_per_l2"] == {strong: 0.6, weak: 1.0}, res
  assert res["l2"] == weak and res["val_top1"] == 1.0, res
  assert res["top1"] == 0.0, res  # the weak-penalty refit on the whole training set


def test_stratified_split_and_balanced_subset():
  y = np.repeat(np.arange(4), [10, 20, 5, 1])
  train, val = stratified_split(y, 0.2, np.random.default_rng(0))
  assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(y)))
  np.testing.assert_array_equal(np.bincount(y[val], minlength=4), [2, 4, 1, 0])
  # A large fraction never empties a class from training (the singleton class stays).
  train, val = stratified_split(y, 0.8, np.random.default_rng(0))
  np.testing.assert_array_equal(np.bincount(y[train], minlength=4), [2, 4, 1, 1])
  a = balanced_subset(y, 3, 3, np.random.default_rng(5))
  assert len(a) == 9 and len(set(a)) == 9
  np.testing.assert_array_equal(np.bincount(y[a], minlength=4), [3, 3, 3, 0])
  np.testing.assert_array_equal(a, balanced_subset(y, 3, 3, np.random.default_rng(5)))


def test_few_label_probe_draws_and_subset_sizes():
  rng = np.random.default_rng(6)
  train, train_y, centers = _clusters(rng, 200, 6, 8, spread=1.0)  # overlapping: draws vary
  test, test_y, _ = _clusters(rng, 200, 6, 8, centers=centers)
  smallest = np.bincount(train_y).min()
  res = few_label_probe(train, train_y, test, test_y, num_classes=6, shots=(1, 3, 1000),
                        draws=5, l2_grid=(1e-3, 1e-1), max_iter=100)
  assert set(res) == {1, 3, 1000}
  assert "skipped" in res[1000] and str(smallest) in res[1000]["skipped"]
  for k in (1, 3):
    r = res[k]
    assert r["num_labelled"] == 6 * k and r["draws"] == 5 and len(r["top1_per_draw"]) == 5
    assert r["top1_mean"] == pytest.approx(np.mean(r["top1_per_draw"]))
    assert r["top1_std"] == pytest.approx(np.std(r["top1_per_draw"], ddof=1))
    assert np.ptp(r["top1_per_draw"]) > 0  # distinct draws (the std test below has teeth)
    assert 0.3 < r["top1_mean"] < 1.0  # well above chance (1/6) with a few labels
    assert "top5_mean" in r and "top5_std" in r
  assert res[1]["l2_per_draw"] == [0.1] * 5  # the documented one-shot rule


# ----------------------------------------------------------------------------------- zero-shot


def test_class_text_embeddings_prompt_ensembling():
  # Two templates whose (unnormalised) embeddings differ in norm: per-prompt normalisation
  # before averaging gives the bisector; averaging raw embeddings would not.
  table = {"a cat": [2.0, 0.0, 0.0], "the cat": [0.0, 5.0, 0.0],
           "a dog": [0.0, 0.0, 1.0], "the dog": [0.0, 0.0, 3.0]}
  names = sorted(table)
  tokenize = lambda prompts: np.asarray([[names.index(p)] for p in prompts])
  vectors = jnp.asarray([table[n] for n in names])
  encode = lambda tokens: vectors[tokens[:, 0]]
  emb = class_text_embeddings(encode, tokenize, ["cat", "dog"], ["a {}", lambda c: f"the {c}"])
  np.testing.assert_allclose(emb, [[2 ** -0.5, 2 ** -0.5, 0.0], [0.0, 0.0, 1.0]], atol=1e-6)
  with pytest.raises(ValueError, match="template"):
    class_text_embeddings(encode, tokenize, ["cat"], ["no placeholder"])


def test_zero_shot_accuracy_known_ranks():
  num_classes = 7
  class_emb = np.eye(num_classes) * 3.0  # any positive scale: cosine similarity
  # Image i gets its true class at a chosen rank among decreasing, distinct scores.
  ranks = [0, 0, 0, 1, 2, 4, 5, 6]
  labels = np.asarray([3, 0, 6, 2, 5, 1, 4, 0])
  images = np.zeros((len(ranks), num_classes))
  rng = np.random.default_rng(7)
  for i, (r, c) in enumerate(zip(ranks, labels)):
    order = [o for o in rng.permutation(num_classes) if o != c]
    order.insert(r, c)
    images[i, order] = np.linspace(1.0, 0.1, num_classes)
  res = zero_shot_accuracy(images, class_emb, labels, chunk=3)
  assert res["top1"] == pytest.approx(3 / 8) and res["top5"] == pytest.approx(6 / 8)


def test_top_k_hits_ties_count_against_the_true_class():
  scores = np.asarray([[1.0, 1.0, 1.0], [0.2, 0.5, 0.1], [0.3, 0.3, 0.9]])
  labels = np.asarray([0, 1, 0])
  np.testing.assert_array_equal(top_k_hits(scores, labels, 1), [False, True, False])
  # Row 2: class 0 ties class 1 below class 2, so the pessimistic rank of class 0 is 2.
  np.testing.assert_array_equal(top_k_hits(scores, labels, 2), [False, True, False])
  np.testing.assert_array_equal(top_k_hits(scores, labels, 3), [True, True, True])
  # A collapsed image encoder (all embeddings equal) scores zero, not 1/C or 1.
  res = zero_shot_accuracy(np.ones((4, 3)), np.eye(3), np.asarray([0, 1, 2, 0]))
  assert res["top1"] == 0.0


# ----------------------------------------------------------------------------------- retrieval


def test_retrieval_recall_several_captions_per_image():
  # Unit-norm captions; images are the basis vectors, so cos(image i, caption j) = t_j[i].
  texts = np.asarray([[0.8, 0.6, 0.0],     # image 0
                      [0.0, 0.6, 0.8],     # image 0
                      [0.0, 0.8, 0.6],     # image 1
                      [0.64, 0.48, 0.6],   # image 1
                      [0.6, 0.64, 0.48]])  # image 2 (a single caption)
  owner = np.asarray([0, 0, 1, 1, 2])
  # Image 0: its t0 (0.8) is first. Image 1: its t2 (0.8) is first. Image 2: its t4 (0.48)
  # has t1, t2, t3 above it (rank 3). Captions' own-image ranks: 0, 2, 0, 2, 2.
  expected = {"image_to_text/R@1": 2 / 3, "image_to_text/R@3": 2 / 3, "image_to_text/R@5": 1.0,
              "text_to_image/R@1": 2 / 5, "text_to_image/R@3": 1.0, "text_to_image/R@5": 1.0}
  scale = np.asarray([[1.0], [2.0], [0.5], [3.0], [1.5]])  # cosine ignores norms
  perm = np.asarray([3, 0, 4, 2, 1])  # caption order is arbitrary
  res = retrieval_recall(np.eye(3) * 2.0, (texts * scale)[perm], owner[perm], ks=(1, 3, 5),
                         chunk=2)
  for key, value in expected.items():
    assert res[key] == pytest.approx(value), key
  assert res["num_images"] == 3 and res["num_texts"] == 5
  # A collapsed model (all similarities tied) is not credited with any top-1 hit.
  res = retrieval_recall(np.ones((3, 4)), np.ones((5, 4)), owner, ks=(1,))
  assert res["image_to_text/R@1"] == 0.0 and res["text_to_image/R@1"] == 0.0


def test_retrieval_recall_matches_float64_argsort():
  rng = np.random.default_rng(8)
  img, txt = rng.normal(size=(20, 8)), rng.normal(size=(60, 8))
  owner = rng.permutation(np.repeat(np.arange(20), 3))
  sims = _normalize64(img) @ _normalize64(txt).T
  res = retrieval_recall(img, txt, owner, ks=(1, 5, 10), chunk=7)
  for k in (1, 5, 10):
    i2t = np.mean([np.isin(np.argsort(-sims[i])[:k], np.flatnonzero(owner == i)).any()
                   for i in range(20)])
    t2i = np.mean([owner[j] in np.argsort(-sims[:, j])[:k] for j in range(60)])
    assert res[f"image_to_text/R@{k}"] == pytest.approx(i2t)
    assert res[f"text_to_image/R@{k}"] == pytest.approx(t2i)


def test_retrieval_recall_identical_captions_are_one_text():
  # Four images of two classes, each captioned with its class's one template: captions 0 and 1
  # are the same string, as are 2 and 3. Images of a class sit near each other and their text.
  img = np.asarray([[1.0, 0.1], [1.0, -0.1], [0.1, 1.0], [-0.1, 1.0]])
  txt = np.asarray([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])   # identical copies
  owner, groups = np.arange(4), np.asarray([0, 0, 1, 1])
  # Distinct captions: each image's own copy ties with its twin's, and ties count against.
  res = retrieval_recall(img, txt, owner, ks=(1, 2))
  assert res["image_to_text/R@1"] == 0.0 and res["image_to_text/R@2"] == 1.0
  # One text per group: every image finds its class's text first, every caption a same-class
  # image first.
  res = retrieval_recall(img, txt, owner, ks=(1,), text_groups=groups, chunk=3)
  assert res["image_to_text/R@1"] == 1.0 and res["text_to_image/R@1"] == 1.0
  # The gallery holds each distinct text once: an image whose text is second has rank 1, not
  # rank 2 (behind both copies of the other text).
  res = retrieval_recall(img[:, ::-1], txt, owner, ks=(1, 2), text_groups=groups)
  assert res["image_to_text/R@1"] == 0.0 and res["image_to_text/R@2"] == 1.0
  # Image 1 moves next to the other class's text: it misses its text, while every caption
  # still finds a relevant image first (image 0 for class 0; image 2, nearer than 1, class 1).
  img[1] = [0.2, 1.0]
  res = retrieval_recall(img, txt, owner, ks=(1,), text_groups=groups)
  assert res["image_to_text/R@1"] == 0.75 and res["text_to_image/R@1"] == 1.0
  with pytest.raises(ValueError, match="text_groups must give one id"):
    retrieval_recall(img, txt, owner, text_groups=np.asarray([0, 1]))


def test_retrieval_recall_with_groups_matches_float64_argsort():
  rng = np.random.default_rng(11)
  img, txt = rng.normal(size=(15, 6)), rng.normal(size=(30, 6))
  owner = rng.permutation(np.repeat(np.arange(15), 2))
  groups = rng.integers(0, 12, size=30)          # shared texts across images
  relevant = np.zeros((15, 30), bool)             # relevant[i, t]: image i has t's text
  for t in range(30):
    relevant[:, t] = np.isin(np.arange(15), owner[groups == groups[t]])
  sims = _normalize64(img) @ _normalize64(txt).T
  res = retrieval_recall(img, txt, owner, ks=(1, 3), text_groups=groups, chunk=4)
  # image -> text ranks distinct texts: a group scores its best caption.
  ids = np.unique(groups)
  group_sims = np.stack([sims[:, groups == g].max(axis=1) for g in ids], axis=1)
  group_relevant = np.stack([relevant[:, groups == g].any(axis=1) for g in ids], axis=1)
  assert res["num_distinct_texts"] == len(ids)
  for k in (1, 3):
    i2t = np.mean([group_relevant[i, np.argsort(-group_sims[i])[:k]].any() for i in range(15)])
    t2i = np.mean([relevant[np.argsort(-sims[:, t])[:k], t].any() for t in range(30)])
    assert res[f"image_to_text/R@{k}"] == pytest.approx(i2t)
    assert res[f"text_to_image/R@{k}"] == pytest.approx(t2i)


# ------------------------------------------------------------------------------ extraction


def test_sharded_extraction_equals_single_device_in_order():
  rng = np.random.default_rng(9)
  n = 37  # not a multiple of the batch of 16: a padded last batch
  images = rng.uniform(size=(n, 4, 4, 3)).astype(np.float32)
  images[:, 0, 0, 0] = np.arange(n)  # each image carries its index
  w = jnp.asarray(rng.normal(size=(48, 5)), jnp.float32)
  traces = []

  def encode(x):
    traces.append(x.shape)  # runs at trace time only
    flat = x.reshape(x.shape[0], -1)
    return jnp.concatenate([flat[:, :1], jnp.tanh(flat @ w)], axis=1)

  feats8 = extract_features(encode, images, mesh=make_mesh(8), batch_size=16)
  assert traces == [(16, 4, 4, 3)]  # one trace and compilation for all 3 batches
  feats1 = extract_features(encode, images, mesh=make_mesh(1), batch_size=16)
  assert feats8.shape == (n, 6) and feats8.dtype == np.float32
  np.testing.assert_array_equal(feats8[:, 0], np.arange(n))  # every example once, in order
  np.testing.assert_allclose(feats8, feats1, rtol=1e-6, atol=1e-6)
  ref = np.tanh(images.reshape(n, -1).astype(np.float64) @ np.asarray(w, np.float64))
  np.testing.assert_allclose(feats8[:, 1:], ref, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="divisible"):
    extract_features(encode, images, mesh=make_mesh(8), batch_size=12)


def test_extraction_with_variables_compiles_once_per_function():
  images = np.arange(20, dtype=np.float32).reshape(5, 2, 2, 1)
  traces = []

  def encode(variables, x):
    traces.append(x.shape)
    return x.reshape(x.shape[0], -1) * variables["scale"]

  mesh = make_mesh(8)
  for scale in (1.0, 3.0):  # new parameters, same function: no new trace
    feats = extract_features(encode, images, mesh=mesh, batch_size=8,
                             variables={"scale": jnp.float32(scale)})
    np.testing.assert_allclose(feats, images.reshape(5, 4) * scale)
  assert len(traces) == 1


def test_extraction_from_masked_iterator():
  images = np.arange(24, dtype=np.float32).reshape(24, 1, 1, 1) * np.ones((1, 2, 2, 3),
                                                                          np.float32)
  mask = np.ones(24, bool)
  mask[[3, 17, 20, 21, 22, 23]] = False
  batches = ({"image": images[i:i + 8], "mask": mask[i:i + 8]} for i in range(0, 24, 8))
  encode = lambda x: x.reshape(x.shape[0], -1)[:, :2] * 2.0
  feats = extract_features_from_iterator(encode, batches, mesh=make_mesh(8))
  np.testing.assert_array_equal(feats[:, 0], 2.0 * np.flatnonzero(mask))


# --------------------------------------------------------------------- alignment, uniformity


def test_alignment_and_uniformity_match_float64():
  rng = np.random.default_rng(10)
  z1, z2 = rng.normal(size=(16, 8)), rng.normal(size=(16, 8))
  a, b = _normalize64(z1), _normalize64(z2)
  for alpha in (2.0, 1.0):
    ref = np.mean(np.linalg.norm(a - b, axis=1) ** alpha)
    got = jax.jit(alignment, static_argnums=2)(jnp.asarray(z1, jnp.float32),
                                               jnp.asarray(z2, jnp.float32), alpha)
    assert float(got) == pytest.approx(ref, rel=1e-5)
  for t in (2.0, 0.5):
    pairs = [np.exp(-t * np.sum((a[i] - a[j]) ** 2)) for i in range(16) for j in range(i + 1, 16)]
    got = jax.jit(uniformity, static_argnums=1)(jnp.asarray(z1, jnp.float32), t)
    assert float(got) == pytest.approx(np.log(np.mean(pairs)), rel=1e-5)
  # Usable in a training step: finite gradients, also at perfectly aligned pairs.
  grad_fn = jax.jit(jax.grad(lambda z: alignment(z, z) + uniformity(z)))
  grads = grad_fn(jnp.asarray(z1, jnp.float32))
  assert np.all(np.isfinite(np.asarray(grads)))
  # Two antipodal points: ||a - b||^2 = 4, so uniformity = -4t exactly.
  antipodal = jnp.asarray([[1.0, 0.0], [-3.0, 0.0]])
  assert float(jax.jit(uniformity)(antipodal)) == pytest.approx(-8.0)
  # Orthogonal unit vectors: ||a - b||^2 = 2.
  orthogonal = jax.jit(alignment)(jnp.asarray([[1.0, 0.0]]), jnp.asarray([[0.0, 2.0]]))
  assert float(orthogonal) == pytest.approx(2.0)
