"""Losses against float64 references from the papers, and sharded against single-device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax import distributed, losses
import loss_reference as ref

N, D, K = 16, 8, 32


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(N, D))
  b = a + 0.8 * rng.normal(size=(N, D))          # correlated pairs: a non-trivial loss
  queue = ref.normalize(rng.normal(size=(K, D)))
  return a, b, queue


# name -> (library fn, reference fn, args builder, indices of args to differentiate)
CASES = {
    "nt_xent": (losses.nt_xent, ref.nt_xent, lambda a, b, q: (a, b, 0.1), (0, 1, 2)),
    "nt_xent_t0.5": (losses.nt_xent, ref.nt_xent, lambda a, b, q: (a, b, 0.5), (0, 1, 2)),
    "clip": (losses.clip_loss, ref.clip_loss, lambda a, b, q: (a, b, 14.3), (0, 1, 2)),
    "moco": (losses.moco_loss, ref.moco_loss, lambda a, b, q: (a, b, q, 0.2), (0, 3)),
    "moco_v3": (losses.moco_v3_loss, ref.moco_v3_loss, lambda a, b, q: (a, b, 0.2), (0, 2)),
    "siglip": (losses.siglip_loss, ref.siglip_loss, lambda a, b, q: (a, b, 10.0, -10.0),
               (0, 1, 2, 3)),
    "siglip_uneven": (losses.siglip_loss, ref.siglip_loss, lambda a, b, q: (a, b, 3.7, 1.3),
                      (0, 1, 2, 3)),
}


def _f32(args):
  return [jnp.asarray(x, jnp.float32) for x in args]


def _assert_grad_close(got, want, name):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = max(np.max(np.abs(want)), 1e-12)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale, err_msg=name)


@pytest.mark.parametrize("case", sorted(CASES))
def test_value_and_grad_match_float64_reference(case):
  fn, ref_fn, build, grad_idx = CASES[case]
  args = build(*_inputs())
  want_loss, want_acc = ref_fn(*args)
  loss, metrics = fn(*_f32(args), return_metrics=True)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["accuracy"]), want_acc, atol=1e-6)

  grads = jax.grad(lambda *a: fn(*a), argnums=grad_idx)(*_f32(args))
  for g, i in zip(grads, grad_idx):
    want = ref.numerical_grad(lambda *a: ref_fn(*a)[0], args, i)
    _assert_grad_close(g, want, f"{case}: d/d arg {i}")


@pytest.mark.parametrize("fn, args", [
    (losses.moco_loss, "q k queue"), (losses.moco_v3_loss, "q k")])
def test_no_gradient_reaches_keys_or_queue(fn, args):
  a, b, queue = _inputs()
  call = (a, b, queue, 0.2) if "queue" in args else (a, b, 0.2)
  argnums = (1, 2) if "queue" in args else (1,)
  grads = jax.grad(fn, argnums=argnums)(*_f32(call))
  for g in grads:
    assert np.all(np.asarray(g) == 0.0)


def _single_and_sharded(case, mesh):
  fn, _, build, grad_idx = CASES[case]
  args = _f32(build(*_inputs(1)))
  single = jax.jit(jax.value_and_grad(lambda *a: fn(*a), argnums=grad_idx))
  global_fn = losses.sharded(fn, mesh)
  sharded = jax.jit(jax.value_and_grad(lambda *a: global_fn(*a), argnums=grad_idx))
  return single(*args), sharded(*args)


@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_equals_single_device(case):
  mesh = distributed.make_mesh(8)
  (v1, g1), (v8, g8) = _single_and_sharded(case, mesh)
  np.testing.assert_allclose(float(v8), float(v1), rtol=1e-6)
  for a, b in zip(g8, g1):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=1e-6 * max(np.max(np.abs(np.asarray(b))), 1e-12))


@pytest.mark.parametrize("case", ["nt_xent", "clip", "moco_v3", "siglip"])
def test_sharded_metrics_equal_single_device(case):
  fn, ref_fn, build, _ = CASES[case]
  args = build(*_inputs(2))
  want_loss, want_acc = ref_fn(*args)
  loss, metrics = jax.jit(
      losses.sharded(fn, distributed.make_mesh(8), return_metrics=True))(*_f32(args))
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["accuracy"]), want_acc, atol=1e-6)


def test_label_offset_matters():
  """Positives put at local columns (the classic bug) would change the sharded loss."""
  a, b, _ = _inputs(3)
  mesh = distributed.make_mesh(8)
  wrong = jax.shard_map(
      lambda x, y: jax.lax.pmean(losses.clip_loss(x, y, 10.0), "data"), mesh=mesh,
      in_specs=(jax.P("data"), jax.P("data")), out_specs=jax.P())
  right = losses.sharded(losses.clip_loss, mesh)(*_f32((a, b)), 10.0)
  # The per-device loss (local candidates only) differs from the global-batch loss.
  assert abs(float(wrong(*_f32((a, b)))) - float(right)) > 1e-3
  np.testing.assert_allclose(float(right), ref.clip_loss(a, b, 10.0)[0], rtol=1e-5)


@pytest.mark.parametrize("case", ["nt_xent", "clip", "moco", "moco_v3", "siglip"])
def test_bf16_inputs_give_float32_loss_within_rounding(case):
  fn, _, build, _ = CASES[case]
  args = list(build(*_inputs(4)))
  rounded = [np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64) if np.ndim(x) == 2 else x
             for x in args]
  bf16_args = [jnp.asarray(x, jnp.bfloat16) if np.ndim(x) == 2 else x for x in args]
  got = fn(*bf16_args)
  assert got.dtype == jnp.float32 and np.isfinite(float(got))
  np.testing.assert_allclose(float(got), float(fn(*_f32(rounded))), rtol=1e-5)
  np.testing.assert_allclose(float(got), float(fn(*_f32(args))), rtol=2e-2)


def test_low_temperature_and_max_scale_stay_finite():
  a, b, queue = _inputs(5)
  for value in (losses.nt_xent(*_f32((a, b)), 0.01), losses.clip_loss(*_f32((a, b)), 100.0),
                losses.moco_loss(*_f32((a, b, queue)), 0.01),
                losses.siglip_loss(*_f32((a, b)), 100.0, -10.0)):
    assert np.isfinite(float(value))
  grads = jax.grad(losses.nt_xent, argnums=(0, 1))(*_f32((a, b)), 0.01)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_bad_input_errors_name_the_fix():
  a, b, queue = _f32(_inputs())
  mesh = distributed.make_mesh(8)
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    losses.sharded(losses.nt_xent, mesh)(a[:12], b[:12], 0.1)
  with pytest.raises(ValueError, match="same shape"):
    losses.clip_loss(a, b[:, :4], 10.0)
  with pytest.raises(ValueError, match=r"\[batch, dim\]"):
    losses.nt_xent(a[None], b[None], 0.1)
  with pytest.raises(ValueError, match="temperature must be positive"):
    losses.nt_xent(a, b, 0.0)
  with pytest.raises(ValueError, match="temperature must be positive"):
    losses.sharded(losses.moco_v3_loss, mesh)(a, b, -0.2)
  with pytest.raises(ValueError, match="logit_scale must be positive"):
    losses.clip_loss(a, b, -1.0)
  with pytest.raises(ValueError, match="queue must be"):
    losses.moco_loss(a, b, queue[:, :4], 0.2)
  with pytest.raises(ValueError, match="logit_bias must be a scalar"):
    losses.siglip_loss(a, b, 10.0, jnp.zeros(3))


def test_l2_normalize_unit_rows_zero_row_and_finite_gradient():
  """The package's one L2 normalisation (losses, methods, models, evaluators): unit rows as in
  float64, float32 output for bf16 input, and a zero row stays zero with a finite gradient (a
  NaN there would reach every parameter through the loss)."""
  x = np.random.RandomState(0).randn(4, 5)
  x[2] = 0.0
  want = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  got = losses.l2_normalize(jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)
  assert losses.l2_normalize(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.float32
  grad = jax.grad(lambda v: jnp.sum(losses.l2_normalize(v) * jnp.arange(5.0)))(
      jnp.asarray(x, jnp.float32))
  assert np.all(np.isfinite(np.asarray(grad)))
