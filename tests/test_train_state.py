"""TrainState updates against float64 numpy references written from MoCo's formulas."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax import train_state as ts


def _tree(rng, scale=1.0):
  return {
      "conv": {"kernel": scale * rng.standard_normal((3, 3, 2, 4)).astype(np.float32)},
      "BatchNorm_0": {"scale": scale * rng.standard_normal(4).astype(np.float32),
                      "bias": scale * rng.standard_normal(4).astype(np.float32)},
  }


@pytest.mark.parametrize("momentum", [0.0, 0.99, 0.999, 1.0])
def test_ema_update_matches_formula(momentum):
  rng = np.random.default_rng(0)
  old, new = _tree(rng), _tree(rng, scale=3.0)
  out = jax.jit(ts.ema_update)(old, new, momentum)  # momentum traced
  ref = jax.tree.map(
      lambda o, n: momentum * o.astype(np.float64) + (1.0 - momentum) * n.astype(np.float64),
      old, new)
  for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-6, atol=1e-6)


def test_ema_update_batch_stats_keeps_structure():
  stats = {"bn": {"mean": np.zeros(3, np.float32), "var": np.ones(3, np.float32)}}
  online = {"bn": {"mean": np.full(3, 2.0, np.float32), "var": np.full(3, 5.0, np.float32)}}
  out = ts.ema_update(stats, online, jnp.float32(0.75))
  assert jax.tree.structure(out) == jax.tree.structure(stats)
  np.testing.assert_allclose(out["bn"]["mean"], 0.25 * 2.0)
  np.testing.assert_allclose(out["bn"]["var"], 0.75 + 0.25 * 5.0)


def test_enqueue_fifo_with_wraparound():
  num_rows, dim, batch = 8, 3, 2
  queue = ts.init_queue(jax.random.key(0), num_rows, dim)
  ptr = jnp.zeros((), jnp.int32)
  ref_queue = np.asarray(queue, np.float64).copy()
  ref_ptr = 0
  step = jax.jit(ts.enqueue)
  rng = np.random.default_rng(1)
  for i in range(7):  # 7 * 2 = 14 rows written into 8: wraps around once and a half
    keys = rng.standard_normal((batch, dim)).astype(np.float32)
    queue, ptr = step(queue, ptr, keys)
    for row in keys:  # independent reference: one row at a time into a ring buffer
      ref_queue[ref_ptr] = row
      ref_ptr = (ref_ptr + 1) % num_rows
    assert int(ptr) == ref_ptr, i
    np.testing.assert_array_equal(np.asarray(queue, np.float64), ref_queue)
  assert ptr.dtype == jnp.int32


def test_enqueue_rejects_indivisible_queue():
  queue = jnp.zeros((10, 4))
  with pytest.raises(ValueError, match="multiple of the global batch"):
    ts.enqueue(queue, jnp.int32(0), jnp.zeros((4, 4)))
  with pytest.raises(ValueError, match="dimension"):
    ts.enqueue(queue, jnp.int32(0), jnp.zeros((5, 3)))


def test_init_queue_unit_rows():
  q = ts.init_queue(jax.random.key(3), 16, 5)
  assert q.shape == (16, 5) and q.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(np.asarray(q), axis=1), 1.0, rtol=1e-6)


def test_cosine_momentum_schedule():
  m0, total = 0.99, 100
  fn = jax.jit(ts.cosine_momentum, static_argnums=1)
  np.testing.assert_allclose(float(fn(0, total, m0)), m0, rtol=1e-7)
  np.testing.assert_allclose(float(fn(50, total, m0)), (1 + m0) / 2, rtol=1e-7)
  np.testing.assert_allclose(float(fn(total, total, m0)), 1.0, rtol=1e-7)
  np.testing.assert_allclose(float(fn(3 * total, total, m0)), 1.0, rtol=1e-7)  # clamped
  t = 17
  want = 1 - (1 - m0) * (math.cos(math.pi * t / total) + 1) / 2
  np.testing.assert_allclose(float(fn(t, total, m0)), want, rtol=1e-7)


def test_train_state_defaults_and_replace():
  state = ts.TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.ones(2)},
                        batch_stats={}, opt_state=(), rng=jax.random.key(0))
  assert state.ema_params is None and state.queue is None and state.queue_ptr is None
  # Absent fields contribute no leaves, so SimCLR's state is just its real arrays.
  assert len(jax.tree.leaves(state)) == 3
  state2 = state.replace(step=state.step + 1, queue=jnp.zeros((4, 2)),
                         queue_ptr=jnp.zeros((), jnp.int32))
  assert int(state2.step) == 1 and state2.queue.shape == (4, 2) and int(state.step) == 0
