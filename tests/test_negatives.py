"""Debiased, hard-negative, decoupled and multi-positive losses (``losses.NegativeOptions``):
float64 references from the papers, sharded (all-gather and ring, 8 devices) against the
single-device loss with gradients, the exact reductions to InfoNCE, and the diagnostics."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax import distributed, losses
import loss_reference
import negatives_reference as ref

O = losses.NegativeOptions
N, D, K = 16, 8, 24
LABELS = np.array([0, 1, 2, 0, 1, -1, 2, 0, 1, 1, 2, 0, -1, 2, 0, 1], np.int32)
CAPTIONS = np.array([0, 1, 0, 2, 3, 1, 0, 4, 5, 2, 6, 7, 1, 8, 9, 0], np.int32)

# name -> (loss, options, scalar args, groups, float64 reference of (a, b, *scalars))
CASES = {
    "debiased": ("nt_xent", O(debias_tau_plus=0.1), (0.3,), None,
                 lambda a, b, t: ref.nt_xent(a, b, t, tau_plus=0.1)),
    # tau+ p outweighs the negatives for most anchors: the floor N exp(-1/T) is active.
    "debiased_floor": ("nt_xent", O(debias_tau_plus=0.5), (1.0,), None,
                       lambda a, b, t: ref.nt_xent(a, b, t, tau_plus=0.5)),
    "hard": ("nt_xent", O(hard_beta=1.0), (0.3,), None,
             lambda a, b, t: ref.nt_xent(a, b, t, beta=1.0)),
    "hard_debiased": ("nt_xent", O(debias_tau_plus=0.1, hard_beta=0.5), (0.2,), None,
                      lambda a, b, t: ref.nt_xent(a, b, t, tau_plus=0.1, beta=0.5)),
    "decoupled": ("nt_xent", O(decoupled=True), (0.3,), None,
                  lambda a, b, t: ref.nt_xent(a, b, t, decoupled=True)),
    "decoupled_debiased": ("nt_xent", O(decoupled=True, debias_tau_plus=0.05), (0.3,), None,
                           lambda a, b, t: ref.nt_xent(a, b, t, tau_plus=0.05,
                                                       decoupled=True)),
    "supcon": ("nt_xent", O(multi_positive=True), (0.3,), LABELS,
               lambda a, b, t: ref.nt_xent(a, b, t, labels=LABELS)),
    "supcon_decoupled": ("nt_xent", O(multi_positive=True, decoupled=True), (0.3,), LABELS,
                         lambda a, b, t: ref.nt_xent(a, b, t, labels=LABELS, decoupled=True)),
    "clip_captions": ("clip", O(multi_positive=True), (7.0,), CAPTIONS,
                      lambda a, b, s: ref.clip_loss(a, b, s, CAPTIONS)),
    "siglip_captions": ("siglip", O(multi_positive=True), (3.7, -1.3), CAPTIONS,
                        lambda a, b, s, bias: ref.siglip_loss(a, b, s, bias, CAPTIONS)),
}


def _inputs(seed):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(N, D))
  return a, a + 0.8 * rng.normal(size=(N, D))


def _value_and_grad(fn, args, groups):
  g = None if groups is None else jnp.asarray(groups)
  f = lambda *x: fn(*x, groups=g) if g is not None else fn(*x)
  argnums = tuple(range(len(args)))
  return jax.jit(jax.value_and_grad(lambda *x: f(*x)[0], argnums=argnums))(
      *[jnp.asarray(x, jnp.float32) for x in args])


@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_and_sharded_forms(case):
  """Single device = the float64 reference; 8-device all-gather and ring = single device,
  value and gradient with respect to both embeddings and the scalars."""
  name, options, scalars, groups, reference = CASES[case]
  a, b = _inputs(0)
  args = (a, b) + scalars
  single = losses.get_loss(name, options=options)
  v1, g1 = _value_and_grad(lambda *x, **k: single(*x, return_metrics=True, **k), args, groups)
  np.testing.assert_allclose(float(v1), reference(*args), rtol=2e-5, err_msg=case)
  mesh = distributed.make_mesh(8)
  for impl in losses.IMPLEMENTATIONS:
    fn = losses.sharded(losses.get_loss(name, impl, options=options), mesh,
                        return_metrics=True)
    v, g = _value_and_grad(fn, args, groups)
    np.testing.assert_allclose(float(v), float(v1), rtol=1e-5, err_msg=f"{case} {impl}")
    for i, (got, want) in enumerate(zip(g, g1)):
      want = np.asarray(want)
      np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4,
                                 atol=1e-5 * max(np.abs(want).max(), 1e-12),
                                 err_msg=f"{case} {impl} d/d arg {i}")


@pytest.mark.parametrize("case", ["hard_debiased", "supcon"])
def test_ring_gradient_against_float64_reference(case):
  """The ring's gradient against central differences of the paper's equation."""
  name, options, scalars, groups, reference = CASES[case]
  a, b = _inputs(1)
  fn = losses.sharded(losses.get_loss(name, "ring", options=options),
                      distributed.make_mesh(8))
  args = (a, b) + scalars
  _, grads = _value_and_grad(lambda *x, **k: (fn(*x, **k),), args, groups)
  for i in (0, 2):
    want = np.asarray(loss_reference.numerical_grad(reference, args, i))
    np.testing.assert_allclose(np.asarray(grads[i], np.float64), want, rtol=1e-3,
                               atol=1e-4 * np.max(np.abs(want)), err_msg=f"{case} arg {i}")


def test_moco_queue_options_against_reference():
  rng = np.random.default_rng(2)
  q, k = _inputs(2)
  queue = rng.normal(size=(K, D))
  queue /= np.linalg.norm(queue, axis=1, keepdims=True)
  mesh = distributed.make_mesh(8)
  for options, kw in [(O(debias_tau_plus=0.1, hard_beta=1.0), dict(tau_plus=0.1, beta=1.0)),
                      (O(decoupled=True), dict(decoupled=True))]:
    want = ref.moco_loss(q, k, queue, 0.2, **kw)
    fn = losses.sharded(losses.get_loss("moco", options=options), mesh)
    got = jax.jit(lambda *x: fn(*x, 0.2))(*[jnp.asarray(x, jnp.float32) for x in (q, k, queue)])
    np.testing.assert_allclose(float(got), want, rtol=2e-5, err_msg=str(options))


# The tiled ring (``tile=``, ``config.loss_tile``) with the options: 5 rows per device on 8
# devices, so NT-Xent blocks have 10 rows (tiles of 1 and 2 divide them, 3 pads to 12) and CLIP
# / SigLIP blocks 5 (1 divides, 2 and 3 pad to 6).
NT = 40
_rng = np.random.default_rng(7)
LABELS_T = np.where(_rng.random(NT) < 0.15, -1, _rng.integers(0, 4, NT)).astype(np.int32)
CAPTIONS_T = _rng.integers(0, 12, NT).astype(np.int32)

# name -> (loss, options, scalar args, groups, tile, float64 reference of (a, b, *scalars))
TILED = {
    "hard_debiased/3": ("nt_xent", O(debias_tau_plus=0.1, hard_beta=0.5), (0.2,), None, 3,
                        lambda a, b, t: ref.nt_xent(a, b, t, tau_plus=0.1, beta=0.5)),
    "debiased_floor/2": ("nt_xent", O(debias_tau_plus=0.5), (1.0,), None, 2,
                         lambda a, b, t: ref.nt_xent(a, b, t, tau_plus=0.5)),
    "decoupled/1": ("nt_xent", O(decoupled=True), (0.3,), None, 1,
                    lambda a, b, t: ref.nt_xent(a, b, t, decoupled=True)),
    "labels_infonce/3": ("nt_xent", O(), (0.3,), LABELS_T, 3,
                         lambda a, b, t: ref.nt_xent(a, b, t)),
    "supcon/3": ("nt_xent", O(multi_positive=True), (0.3,), LABELS_T, 3,
                 lambda a, b, t: ref.nt_xent(a, b, t, labels=LABELS_T)),
    "supcon_decoupled/2": ("nt_xent", O(multi_positive=True, decoupled=True), (0.3,), LABELS_T,
                           2, lambda a, b, t: ref.nt_xent(a, b, t, labels=LABELS_T,
                                                          decoupled=True)),
    "clip_captions/2": ("clip", O(multi_positive=True), (7.0,), CAPTIONS_T, 2,
                        lambda a, b, s: ref.clip_loss(a, b, s, CAPTIONS_T)),
    "clip_decoupled_captions/1": ("clip", O(multi_positive=True, decoupled=True), (7.0,),
                                  CAPTIONS_T, 1, lambda a, b, s: ref.clip_loss(
                                      a, b, s, CAPTIONS_T, decoupled=True)),
    "siglip_captions/3": ("siglip", O(multi_positive=True), (3.7, -1.3), CAPTIONS_T, 3,
                          lambda a, b, s, bias: ref.siglip_loss(a, b, s, bias, CAPTIONS_T)),
}


@pytest.mark.parametrize("case", sorted(TILED))
def test_tiled_ring_options(case):
  """The tiled ring on 8 devices (tiles that divide the block and tiles that pad it) = the
  float64 reference (value) and the single-device all-gather loss (value, metrics, and the
  gradient with respect to both embeddings and the scalars)."""
  name, options, scalars, groups, tile, reference = TILED[case]
  rng = np.random.default_rng(8)
  a = rng.normal(size=(NT, D))
  b = a + 0.8 * rng.normal(size=(NT, D))
  args = [jnp.asarray(x, jnp.float32) for x in (a, b) + scalars]
  kw = {} if groups is None else {"groups": jnp.asarray(groups)}
  argnums = tuple(range(len(args)))
  mesh = distributed.make_mesh(8)
  tiled = losses.sharded(losses.get_loss(name, "ring", tile=tile, options=options), mesh,
                         return_metrics=True)
  single = functools.partial(losses.LOSSES[name], options=options, return_metrics=True)
  out = {}
  for form, fn in (("tiled", tiled), ("single", single)):
    out[form] = jax.jit(jax.value_and_grad(lambda *x, fn=fn: fn(*x, **kw), argnums=argnums,
                                           has_aux=True))(*args)
  ((v, metrics), grads), ((v1, metrics1), grads1) = out["tiled"], out["single"]
  np.testing.assert_allclose(float(v), reference(a, b, *scalars), rtol=2e-5, err_msg=case)
  np.testing.assert_allclose(float(v), float(v1), rtol=1e-5, err_msg=case)
  assert metrics.keys() == metrics1.keys()
  for key in metrics:
    np.testing.assert_allclose(float(metrics[key]), float(metrics1[key]), rtol=1e-5,
                               err_msg=f"{case} {key}")
  for i, (got, want) in enumerate(zip(grads, grads1)):
    want = np.asarray(want)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4,
                               atol=1e-5 * max(np.abs(want).max(), 1e-12),
                               err_msg=f"{case} d/d arg {i}")


class _ForcedEstimator(losses.NegativeOptions):
  """tau+ = beta = 0 through the debiased / hard-negative estimator's code path."""

  @property
  def reweighted(self):
    return True


def test_zero_tau_and_beta_reduce_to_infonce():
  """The estimator with tau+ = 0 and beta = 0 is InfoNCE (to float32 rounding), in the library
  and in the reference; beta = 0 with tau+ > 0 is the debiased loss."""
  a, b = _inputs(3)
  args = [jnp.asarray(x, jnp.float32) for x in (a, b)]
  plain = float(losses.nt_xent(*args, 0.3))
  forced = float(losses.nt_xent(*args, 0.3, options=_ForcedEstimator()))
  np.testing.assert_allclose(forced, plain, rtol=1e-6)
  np.testing.assert_allclose(ref.nt_xent(a, b, 0.3), loss_reference.nt_xent(a, b, 0.3)[0],
                             rtol=1e-12)
  np.testing.assert_allclose(ref.nt_xent(a, b, 0.3, tau_plus=0.1, beta=0.0),
                             ref.nt_xent(a, b, 0.3, tau_plus=0.1), rtol=1e-12)


def test_same_class_negative_diagnostics():
  """Fraction of same-label InfoNCE negatives and their mean cosine, equal in the single-device,
  all-gather and ring forms and to the reference; labels -1 are left out."""
  a, b = _inputs(4)
  want_fraction, want_sim = ref.same_class_negatives(a, b, LABELS)
  args = [jnp.asarray(x, jnp.float32) for x in (a, b)]
  mesh = distributed.make_mesh(8)
  for form in ("single",) + losses.IMPLEMENTATIONS:
    if form == "single":
      fn = lambda *x, **k: losses.nt_xent(*x, return_metrics=True, **k)
    else:
      fn = losses.sharded(losses.get_loss("nt_xent", form), mesh, return_metrics=True)
    _, metrics = jax.jit(lambda x, y, g, fn=fn: fn(x, y, 0.3, groups=g))(
        *args[:2], jnp.asarray(LABELS))
    np.testing.assert_allclose(float(metrics["same_class_negative_fraction"]), want_fraction,
                               rtol=1e-6, err_msg=form)
    np.testing.assert_allclose(float(metrics["same_class_negative_similarity"]), want_sim,
                               rtol=1e-5, err_msg=form)


def test_bad_combinations_are_named():
  with pytest.raises(ValueError, match="multi_positive"):
    O(multi_positive=True, debias_tau_plus=0.1)
  with pytest.raises(ValueError, match="debias_tau_plus"):
    O(debias_tau_plus=1.0)
  with pytest.raises(ValueError, match="MoCo v3"):
    losses.get_loss("moco_v3", options=O(decoupled=True))


# ----------------------------------------------------------------------------- methods


def test_caption_ids_equal_exactly_for_identical_token_rows():
  from contrastive_jax.methods import base
  tokens = jnp.asarray([[5, 6, 7, 0], [5, 6, 7, 0], [5, 6, 8, 0], [7, 6, 5, 0], [5, 6, 7, 1]])
  ids = np.asarray(base.caption_ids(tokens))
  assert ids[0] == ids[1] and len(set(ids[[0, 2, 3, 4]])) == 4 and np.all(ids >= 0)


def test_simclr_method_passes_labels_and_logs_diagnostics():
  """SimCLR with multi_positive='labels' is SupCon over the batch labels; the diagnostics
  reach the metrics; bad settings fail when the method is built (before compiling)."""
  from contrastive_jax import methods
  from contrastive_jax.configs import simclr_mnist
  c = simclr_mnist.get_config("quick")
  c.global_batch = N
  c.negatives.multi_positive = "labels"
  mesh = distributed.make_mesh(8)
  method = methods.build_method(c, mesh)
  a, b = _inputs(5)
  emb = {"z1": jnp.asarray(a, jnp.float32), "z2": jnp.asarray(b, jnp.float32)}
  groups = method.group_ids({"label": jnp.asarray(LABELS)})
  loss, metrics = jax.jit(lambda e, g: method.loss_from_embeddings(None, {**e, **g}, None))(
      emb, groups)
  np.testing.assert_allclose(float(loss), ref.nt_xent(a, b, c.loss.temperature, labels=LABELS),
                             rtol=2e-5)
  assert "same_class_negative_fraction" in metrics
  for key, value, match in [("multi_positive", "captions", "not available"),
                            ("debias_tau_plus", 1.5, r"\[0, 1\)")]:
    bad = c.copy_and_resolve_references()
    bad.negatives[key] = value
    with pytest.raises(ValueError, match=match):
      methods.build_method(bad, mesh)


def test_clip_captions_grad_cache_equals_full_batch():
  """Multi-positive CLIP over duplicate captions: group ids come from the tokens, not the
  embeddings, so GradCache (M = 2, 8 devices) gives the full-batch step's loss and gradient."""
  import test_grad_cache as gc
  config = gc._clip_config()
  config.negatives.multi_positive = "captions"
  rs = np.random.RandomState(0)
  captions = rs.randint(1, 200, (4, 8)).astype(np.int32)
  batch = {"image": rs.rand(gc.BATCH, gc.SIZE, gc.SIZE, 3).astype(np.float32),
           "tokens": captions[rs.randint(0, 4, gc.BATCH)]}
  results = []
  for num_devices, micro in ((1, 1), (8, 2)):
    mesh = distributed.make_mesh(num_devices)
    method = gc._method(config, mesh, micro)
    from contrastive_jax import optim
    tx, _ = optim.build_optimizer(config.optim, global_batch=gc.BATCH, total_steps=10)
    state = jax.jit(functools.partial(method.init_state, tx=tx), **gc._FAST)(
        jax.random.key(0))
    x = jax.device_put(batch, distributed.data_sharding(mesh))
    (loss, (metrics, _)), grads = jax.jit(
        lambda s, x, method=method: method.value_and_grad(s.params, s, x, jax.random.key(1)),
        **gc._FAST)(state, x)
    results.append((float(loss), jax.device_get(grads)))
  np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-5)
  gc._assert_trees_close(results[1][1], results[0][1])


def test_clip_caption_positives_equal_infonce_when_captions_are_identical():
  """Multi-positive CLIP (SupCon L_out, positives in the denominator) over *identical*
  captions is InfoNCE: identical captions have identical text embeddings, so image->text gives
  each of a caption's k copies the same log-probability, and summed over the k identical text
  rows text->image is the same sum of k terms. Value and gradient (with respect to the images,
  the distinct captions' embeddings and the scale) equal; this is why the embedded CLIP run
  gains nothing from ``multi_positive="captions"`` (SigLIP's pairwise loss does change)."""
  rng = np.random.default_rng(9)
  img = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
  table = jnp.asarray(rng.normal(size=(5, D)), jnp.float32)          # 5 distinct captions
  ids = jnp.asarray(CAPTIONS % 5)

  def loss(options, img, table, scale):
    return losses.clip_loss(img, table[ids], scale, groups=ids, options=options)

  grad = lambda options: jax.jit(jax.value_and_grad(
      functools.partial(loss, options), argnums=(0, 1, 2)))(img, table, 7.0)
  (v0, g0), (v1, g1) = grad(O()), grad(O(multi_positive=True))
  np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
  for got, want in zip(g1, g0):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
