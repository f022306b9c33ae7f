"""MoCo v2 and v3 training losses and gradients against float64 references from the papers.

The references never call the methods' own forward or loss code. Queries and keys come from the
model-level pieces (``models`` builders inside ``EncoderWithHeads``) applied with flax ``apply``
on ``state.params`` (queries) and ``state.ema_params`` (keys), one BN batch per view (or per
device block with MoCo v2's shuffle-BN); the losses are written in numpy float64 from the
papers' formulas:

* MoCo (He et al. 2020, Eq. 1): ``L = -log exp(q.k+ / T) / (exp(q.k+ / T) + sum_i exp(q.k_i / T))``
  with q, k L2-normalised and the k_i the queue as it was before this step's keys are enqueued
  (Alg. 1: ``enqueue`` comes after the update);
* MoCo v3 (Chen et al. 2021, Alg. 1): ``ctr(q1, k2) + ctr(q2, k1)``, ``ctr(q, k)`` the
  cross-entropy of ``q k^T / T`` against the diagonal, times ``2 T``.

The gradient reference is d loss / d q in float64 (closed form of the softmax cross-entropy,
chained through the L2 normalisation), pulled back through the query forward pass with
``jax.vjp``; it is compared with ``jax.grad`` of the method's ``loss_fn``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax.configs import mocov2_mnist, mocov3_mnist
from contrastive_jax import distributed, methods, models, optim, runs
from contrastive_jax.methods.base import EncoderWithHeads

BATCH = 16
DEVICES = 4
SIZE = 16


def _tiny(module, **moco):
  c = module.get_config("quick")
  c.eval.enabled = False
  c.data.image_size = SIZE
  c.global_batch = BATCH
  c.num_devices = DEVICES
  c.model.kwargs = dict(widths=(8, 16), strides=(2, 2))
  c.head.hidden_dim = 32
  c.head.out_dim = 16
  if "predictor" in c:
    c.predictor.hidden_dim, c.predictor.out_dim = 32, 16
  c.optim.schedule = "constant"
  c.optim.warmup_fraction = 0.0
  for key, value in moco.items():
    c.moco[key] = value
  return c


def _setup(config, state=None):
  """``(method, tx, lr_schedule, state)``; ``state`` from ``method.init_state`` unless given."""
  method = methods.build_method(config, distributed.make_mesh(DEVICES))
  tx, lr = optim.build_optimizer(config.optim, global_batch=config.global_batch,
                                 total_steps=config.total_steps)
  if state is None:
    state = jax.jit(lambda r: method.init_state(r, tx))(jax.random.key(0))
  return method, tx, lr, state


def _mocov2_config(shuffle_bn):
  return _tiny(mocov2_mnist, shuffle_bn=shuffle_bn, queue_size=2 * BATCH, momentum=0.9)


@pytest.fixture(scope="module")
def mocov2_state():
  """One initial MoCo v2 state for both BN modes (the parameters do not depend on it)."""
  return _setup(_mocov2_config(shuffle_bn=False))[-1]


def _views(seed):
  r1, r2 = jax.random.split(jax.random.key(seed))
  return {"view1": jax.random.uniform(r1, (BATCH, SIZE, SIZE, 3)),
          "view2": jax.random.uniform(r2, (BATCH, SIZE, SIZE, 3))}


def _encoder(config):
  return models.build_model(config.model.name, **dict(config.model.kwargs))


def mocov2_model(config):
  return EncoderWithHeads(encoder=_encoder(config), head=models.mocov2_head(**dict(config.head)))


def _mocov3_model(config, predictor=True):
  pred = models.mocov3_predictor(**dict(config.predictor)) if predictor else None
  return EncoderWithHeads(encoder=_encoder(config),
                          head=models.mocov3_projector(**dict(config.head)), predictor=pred)


def forward(model, params, batch_stats, x, groups=1, output=1):
  """Train-mode forward of ``x [N, H, W, 3]``; each of ``groups`` contiguous blocks is its own BN
  batch (a separate call, as on separate devices). Returns output ``output`` of (h, z, p)."""
  outs = []
  for block in jnp.split(x, groups):
    out, _ = model.apply({"params": params, "batch_stats": batch_stats}, block, train=True,
                         mutable=["batch_stats"])
    outs.append(out[output])
  return jnp.concatenate(outs)


def _normalize_with_vjp(x):
  """``x / |x|`` row-wise in float64 and the pull-back of a cotangent through it."""
  x = np.asarray(x, np.float64)
  norm = np.linalg.norm(x, axis=1, keepdims=True)
  xn = x / norm
  return xn, lambda g: (g - xn * np.sum(xn * g, axis=1, keepdims=True)) / norm


def _softmax_ce(logits, labels):
  """Mean cross-entropy and its gradient w.r.t. ``logits [N, C]`` (float64)."""
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  n = logits.shape[0]
  onehot = np.zeros_like(logits)
  onehot[np.arange(n), labels] = 1.0
  return -np.mean(log_p[np.arange(n), labels]), (np.exp(log_p) - onehot) / n


def moco_eq1(q, k, queue, t):
  """MoCo Eq. 1 (mean over the batch): ``(loss, d loss / d q [N, D], accuracy)``, float64."""
  qn, q_vjp = _normalize_with_vjp(q)
  kn, _ = _normalize_with_vjp(k)
  queue = np.asarray(queue, np.float64)
  logits = np.concatenate([np.sum(qn * kn, axis=1, keepdims=True), qn @ queue.T], axis=1) / t
  loss, d_logits = _softmax_ce(logits, np.zeros(len(q), np.int64))
  d_qn = (d_logits[:, :1] * kn + d_logits[:, 1:] @ queue) / t
  return loss, q_vjp(d_qn), float(np.mean(np.argmax(logits, axis=1) == 0))


def mocov3_ctr(q, k, t):
  """MoCo v3 Alg. 1 ``ctr(q, k)``: ``(loss, d loss / d q)``, float64."""
  qn, q_vjp = _normalize_with_vjp(q)
  kn, _ = _normalize_with_vjp(k)
  loss, d_logits = _softmax_ce(qn @ kn.T / t, np.arange(len(q)))
  return 2 * t * loss, q_vjp(2 * t * d_logits @ kn / t)


def _pullback(fwd, params, d_out):
  """d loss / d params from d loss / d out through ``fwd`` (float32 forward, jax.vjp)."""
  _, vjp = jax.vjp(jax.jit(fwd), params)
  return vjp(jnp.asarray(d_out, jnp.float32))[0]


def _method_loss_and_grads(method, state, batch, rng):
  def loss(params):
    value, (metrics, updates) = method.loss_fn(params, state, batch, rng)
    return value, (metrics, updates)
  (value, (metrics, updates)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      state.params)
  return float(value), metrics, updates, grads


def _assert_grads_close(got, want):
  """Leaf by leaf: the error is below 1e-4 of the leaf's norm (float32 forward passes)."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    scale = max(np.linalg.norm(w), 1e-12)
    assert np.linalg.norm(g - w) <= 1e-4 * scale, (jax.tree_util.keystr(path),
                                                   np.linalg.norm(g - w) / scale)
  assert any(np.any(np.asarray(w)) for w in jax.tree.leaves(want))


def _distinct_key_encoder(state):
  """A key encoder clearly different from the query encoder (as after many EMA steps), so a
  forward pass on the wrong weights shows in the loss."""
  leaves, treedef = jax.tree.flatten(state.ema_params)
  rngs = jax.random.split(jax.random.key(7), len(leaves))
  noisy = [x + 0.3 * jnp.std(x) * jax.random.normal(r, x.shape) for x, r in zip(leaves, rngs)]
  return state.replace(ema_params=jax.tree.unflatten(treedef, noisy))


# ----------------------------------------------------------------------------- MoCo v2


def test_mocov2_step_against_eq1_with_pre_step_queue_and_ema_keys(mocov2_state):
  """Sync BN (shuffle_bn=False). Step 0 through the trainer's step function: its loss, the EMA
  of the key encoder after it and the keys it enqueued. Step 1 (a queue holding step 0's keys
  and a key encoder unlike the query encoder): loss, accuracy and gradients of ``loss_fn``."""
  config = _mocov2_config(shuffle_bn=False)
  method, tx, lr, state0 = _setup(config, mocov2_state)
  model, t, m = mocov2_model(config), float(config.loss.temperature), 0.9
  batch0 = _views(1)
  step = jax.jit(runs.make_train_step(method, tx, lr))
  state1, metrics0 = step(state0, batch0)

  # Step 0: the keys come from the key encoder of step 0 (= the initial copy) on view 2; the
  # loss uses the initial queue, which does not yet hold them.
  q0 = forward(model, state0.params, state0.batch_stats, batch0["view1"])
  k0 = forward(model, state0.ema_params, state0.ema_batch_stats, batch0["view2"])
  loss0, _, _ = moco_eq1(q0, k0, state0.queue, t)
  np.testing.assert_allclose(float(metrics0["loss"]), loss0, rtol=2e-5)
  # MoCo Eq. 2 with the query parameters this step produced (the key encoder of step 1).
  want_ema = jax.tree.map(lambda e, p: m * np.float64(e) + (1 - m) * np.float64(p),
                          state0.ema_params, state1.params)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(np.float64(g), w, rtol=1e-6, atol=1e-7),
               state1.ema_params, want_ema)
  # FIFO: rows [0, B) now hold step 0's normalised keys, the rest is unchanged.
  k0n, _ = _normalize_with_vjp(k0)
  queue1 = np.asarray(state1.queue)
  np.testing.assert_allclose(queue1[:BATCH], k0n, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(queue1[BATCH:], np.asarray(state0.queue)[BATCH:])
  assert int(state1.queue_ptr) == BATCH

  # Step 1's loss_fn: queries from params, keys from ema_params (made distinct), the queue as it
  # was before this step.
  state = _distinct_key_encoder(state1)
  batch = _views(2)
  value, metrics, _, grads = _method_loss_and_grads(method, state, batch, jax.random.key(3))
  fwd = lambda p: forward(model, p, state.batch_stats, batch["view1"])  # noqa: E731
  q = fwd(state.params)
  k = forward(model, state.ema_params, state.ema_batch_stats, batch["view2"])
  loss, d_q, accuracy = moco_eq1(q, k, state.queue, t)
  np.testing.assert_allclose(value, loss, rtol=2e-5)
  np.testing.assert_allclose(float(metrics["contrastive_accuracy"]), accuracy, atol=1e-6)
  _assert_grads_close(grads, _pullback(fwd, state.params, d_q))
  # The references can tell the bugs apart: keys from the query encoder, or this step's keys
  # already in the queue, give other losses.
  k_online = forward(model, state.params, state.ema_batch_stats, batch["view2"])
  assert abs(moco_eq1(q, k_online, state.queue, t)[0] - loss) > 1e-3
  kn, _ = _normalize_with_vjp(k)
  post = np.concatenate([np.asarray(state.queue)[:BATCH], kn])  # ptr = B: rows [B, 2B)
  assert abs(moco_eq1(q, k, post, t)[0] - loss) > 1e-3


def test_mocov2_shuffle_bn_queries_use_per_device_statistics(mocov2_state):
  """Shuffle-BN on a mesh of 4: the query encoder normalises each device's contiguous block of
  the global batch with that block's statistics (MoCo Sec. 3.3, per-GPU BN). The keys are
  those the step enqueues (their permutation is drawn inside the step)."""
  config = _mocov2_config(shuffle_bn=True)
  method, _, _, state = _setup(config, mocov2_state)
  state = _distinct_key_encoder(state)
  model, t = mocov2_model(config), float(config.loss.temperature)
  batch = _views(4)
  value, _, updates, grads = _method_loss_and_grads(method, state, batch, jax.random.key(5))
  after = method.post_update(state.replace(step=state.step + 1), updates)
  ptr = int(state.queue_ptr)
  keys = np.asarray(after.queue)[ptr:ptr + BATCH]

  fwd = lambda p: forward(model, p, state.batch_stats, batch["view1"], groups=DEVICES)  # noqa
  q = fwd(state.params)
  loss, d_q, _ = moco_eq1(q, keys, state.queue, t)
  np.testing.assert_allclose(value, loss, rtol=2e-5)
  _assert_grads_close(grads, _pullback(fwd, state.params, d_q))
  # Sync-BN queries (statistics of the global batch) would give another loss.
  q_sync = forward(model, state.params, state.batch_stats, batch["view1"])
  assert abs(moco_eq1(q_sync, keys, state.queue, t)[0] - loss) > 1e-3
  # The enqueued keys are the key encoder's, with per-device statistics of some 4 rows each:
  # they are not the sync-BN keys, and not the query encoder's.
  k_sync = forward(model, state.ema_params, state.ema_batch_stats, batch["view2"])
  assert not np.allclose(keys, _normalize_with_vjp(k_sync)[0], atol=1e-3)


# ----------------------------------------------------------------------------- MoCo v3


def test_mocov3_loss_and_grads_against_algorithm_1():
  """``ctr(q1, k2) + ctr(q2, k1)`` with q from the predictor of the query encoder and k from the
  momentum encoder (encoder + projector), each view its own sync-BN batch."""
  config = _tiny(mocov3_mnist)
  method, _, _, state = _setup(config)
  state = _distinct_key_encoder(state)
  assert "predictor" in state.params and "predictor" not in state.ema_params
  query, key = _mocov3_model(config), _mocov3_model(config, predictor=False)
  t = float(config.loss.temperature)
  batch = _views(6)
  value, _, _, grads = _method_loss_and_grads(method, state, batch, jax.random.key(7))

  def fwd(params):  # [2, B, E]: the predictions of view 1 and of view 2, BN per view
    return jnp.stack([forward(query, params, state.batch_stats, batch[v], output=2)
                      for v in ("view1", "view2")])
  q1, q2 = fwd(state.params)
  k1, k2 = (forward(key, state.ema_params, state.ema_batch_stats, batch[v])
            for v in ("view1", "view2"))
  l12, d_q1 = mocov3_ctr(q1, k2, t)
  l21, d_q2 = mocov3_ctr(q2, k1, t)
  np.testing.assert_allclose(value, l12 + l21, rtol=2e-5)
  _assert_grads_close(grads, _pullback(fwd, state.params, np.stack([d_q1, d_q2])))
  # Same-view positives (q2 with k2) would give another loss.
  assert abs(l12 + mocov3_ctr(q2, k2, t)[0] - value) > 1e-3
