"""Optimizers and schedules against float64 numpy hand computations of the papers' rules."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from contrastive_jax import optim
from contrastive_jax.configs import common


def _config(name="lars", base_lr=0.3, **kw):
  """``config.optim`` with the declared defaults (configs/common.py) and ``kw`` over them."""
  return common.optim_config(name, base_lr=base_lr, **kw)


def _run(tx, params, grads_seq):
  state = tx.init(params)
  update = jax.jit(tx.update)
  for g in grads_seq:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params


def _small_tree(rng):
  return {
      "conv": {"kernel": rng.standard_normal((3, 3, 2, 4)).astype(np.float32),
               "bias": rng.standard_normal(4).astype(np.float32)},
      "BatchNorm_0": {"scale": (1 + 0.1 * rng.standard_normal(4)).astype(np.float32)},
  }


# ----------------------------------------------------------------------------- schedules


def test_linear_and_sqrt_scaling():
  cfg = _config(base_lr=0.3, lr_scaling="linear", schedule="constant")
  assert optim.peak_learning_rate(cfg, 4096) == pytest.approx(0.3 * 16)
  cfg = _config(base_lr=0.075, lr_scaling="sqrt")
  assert optim.peak_learning_rate(cfg, 4096) == pytest.approx(0.075 * 64)
  cfg = _config(base_lr=5e-4, lr_scaling="none")
  assert optim.peak_learning_rate(cfg, 32768) == pytest.approx(5e-4)
  with pytest.raises(ValueError, match="lr_scaling"):
    optim.peak_learning_rate(_config(lr_scaling="quadratic"), 256)


def test_warmup_cosine_schedule_values():
  cfg = _config(base_lr=0.1, lr_scaling="linear", warmup_steps=10, end_lr_fraction=0.01)
  total, peak = 110, 0.1 * 512 / 256
  fn = optim.learning_rate_schedule(cfg, global_batch=512, total_steps=total)
  assert float(fn(0)) == 0.0
  np.testing.assert_allclose(float(fn(5)), peak * 5 / 10, rtol=1e-6)
  np.testing.assert_allclose(float(fn(10)), peak, rtol=1e-6)  # warmup end = peak
  mid = 0.01 * peak + (peak - 0.01 * peak) * 0.5 * (1 + math.cos(math.pi * 0.5))
  np.testing.assert_allclose(float(fn(60)), mid, rtol=1e-6)
  np.testing.assert_allclose(float(fn(total)), 0.01 * peak, rtol=1e-5)  # end lr
  np.testing.assert_allclose(float(fn(total + 50)), 0.01 * peak, rtol=1e-5)


def test_warmup_fraction_and_constant():
  cfg = _config(base_lr=1.0, lr_scaling="none", warmup_fraction=0.25, schedule="constant")
  assert optim.resolve_warmup_steps(cfg, 40) == 10
  fn = optim.learning_rate_schedule(cfg, global_batch=8, total_steps=40)
  np.testing.assert_allclose([float(fn(s)) for s in (0, 5, 10, 39)], [0.0, 0.5, 1.0, 1.0])
  with pytest.raises(ValueError, match="both set"):
    optim.resolve_warmup_steps(_config(warmup_steps=3, warmup_fraction=0.1), 40)
  with pytest.raises(ValueError, match="shorter than total_steps"):
    optim.resolve_warmup_steps(_config(warmup_steps=40), 40)


# ----------------------------------------------------------------------------- masks


def test_decay_mask_excludes_gains_biases_embeddings_and_temperature():
  params = {
      "encoder": {
          "Dense_0": {"kernel": np.zeros((4, 8)), "bias": np.zeros(8)},
          "LayerNorm_0": {"scale": np.zeros(8), "bias": np.zeros(8)},
          "pos_embedding": np.zeros((1, 5, 8)),
          "cls_token": np.zeros((1, 1, 8)),
          "Embed_0": {"embedding": np.zeros((10, 8))},
          "embedding": {"kernel": np.zeros((4, 4, 3, 8))},  # a patch conv named "embedding"
      },
      "token_embedding": np.zeros((10, 8)),
      "logit_scale": np.zeros(()),
      "logit_bias": np.zeros(()),
      "temperature": np.zeros((1, 1)),
  }
  mask = optim.weight_decay_mask(params)
  expected = {
      "encoder": {
          "Dense_0": {"kernel": True, "bias": False},
          "LayerNorm_0": {"scale": False, "bias": False},
          "pos_embedding": False, "cls_token": False,
          "Embed_0": {"embedding": False},
          "embedding": {"kernel": True},
      },
      "token_embedding": False, "logit_scale": False, "logit_bias": False,
      "temperature": False,
  }
  assert mask == expected


def test_adamw_decays_only_masked_leaves():
  """Zero gradients: Adam's step is 0, so decayed leaves shrink by exactly (1 - lr wd)."""
  rng = np.random.default_rng(0)
  params = {"Dense_0": {"kernel": rng.standard_normal((3, 4)).astype(np.float32),
                        "bias": rng.standard_normal(4).astype(np.float32)},
            "pos_embedding": rng.standard_normal((1, 2, 4)).astype(np.float32),
            "logit_scale": np.float32(2.6)}
  cfg = _config(name="adamw", base_lr=1e-2, lr_scaling="none", schedule="constant",
                weight_decay=0.2, b2=0.98, eps=1e-6)
  tx, _ = optim.build_optimizer(cfg, global_batch=8, total_steps=10)
  zeros = jax.tree.map(np.zeros_like, params)
  out = _run(tx, params, [zeros] * 2)
  np.testing.assert_allclose(out["Dense_0"]["kernel"],
                             params["Dense_0"]["kernel"] * (1 - 1e-2 * 0.2) ** 2, rtol=1e-6)
  for path in (("Dense_0", "bias"), ("pos_embedding",), ("logit_scale",)):
    a, b = out, params
    for k in path:
      a, b = a[k], b[k]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- LARS


def _lars_reference(params, grads_seq, lrs, wd, eta, momentum, decayed):
  """SimCLR's LARS, written out leaf by leaf in float64."""
  w = {k: np.asarray(v, np.float64) for k, v in params.items()}
  v = {k: np.zeros_like(x) for k, x in w.items()}
  for g_tree, lr in zip(grads_seq, lrs):
    for k in w:
      g = np.asarray(g_tree[k], np.float64)
      ratio = 1.0
      if decayed[k]:
        g = g + wd * w[k]
        w_norm, g_norm = np.linalg.norm(w[k]), np.linalg.norm(g)
        ratio = eta * w_norm / g_norm if (w_norm > 0 and g_norm > 0) else 1.0
      v[k] = momentum * v[k] + lr * ratio * g
      w[k] = w[k] - v[k]
  return w


def test_lars_matches_simclr_hand_computation():
  rng = np.random.default_rng(1)
  tree = _small_tree(rng)
  flat = {"kernel": tree["conv"]["kernel"], "bias": tree["conv"]["bias"],
          "bn_scale": tree["BatchNorm_0"]["scale"]}
  grads = [_small_tree(rng) for _ in range(2)]
  flat_grads = [{"kernel": g["conv"]["kernel"], "bias": g["conv"]["bias"],
                 "bn_scale": g["BatchNorm_0"]["scale"]} for g in grads]
  total, base_lr, batch, wd, eta, m = 4, 0.3, 512, 1e-2, 1e-3, 0.9
  cfg = _config(name="lars", base_lr=base_lr, lr_scaling="linear", warmup_steps=0,
                schedule="cosine", weight_decay=wd, lars_eta=eta, momentum=m)
  tx, _ = optim.build_optimizer(cfg, global_batch=batch, total_steps=total)
  out = _run(tx, tree, grads)
  peak = base_lr * batch / 256
  lrs = [peak * 0.5 * (1 + math.cos(math.pi * t / total)) for t in range(2)]
  ref = _lars_reference(flat, flat_grads, lrs, wd, eta, m,
                        decayed={"kernel": True, "bias": False, "bn_scale": False})
  np.testing.assert_allclose(out["conv"]["kernel"], ref["kernel"], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(out["conv"]["bias"], ref["bias"], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(out["BatchNorm_0"]["scale"], ref["bn_scale"], rtol=1e-5, atol=1e-7)
  # The trust ratio matters: the kernel moved by much less than a plain SGD step would.
  assert np.abs(out["conv"]["kernel"] - tree["conv"]["kernel"]).max() < 0.1 * peak


def test_lars_zero_params_use_unit_trust_ratio():
  params = {"kernel": np.zeros((2, 2), np.float32)}
  grads = {"kernel": np.ones((2, 2), np.float32)}
  cfg = _config(name="lars", base_lr=0.5, lr_scaling="none", schedule="constant")
  tx, _ = optim.build_optimizer(cfg, global_batch=8, total_steps=4)
  out = _run(tx, params, [grads])
  np.testing.assert_allclose(out["kernel"], -0.5 * np.ones((2, 2)))


# ----------------------------------------------------------------------------- SGD, freezing


def test_sgd_momentum_masked_weight_decay():
  rng = np.random.default_rng(2)
  params = {"kernel": rng.standard_normal((3, 2)).astype(np.float32),
            "bias": rng.standard_normal(2).astype(np.float32)}
  grads = [jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params)
           for _ in range(2)]
  lr, wd, m = 0.03, 1e-4, 0.9
  cfg = _config(name="sgd", base_lr=lr, lr_scaling="none", schedule="constant",
                weight_decay=wd, momentum=m)
  tx, _ = optim.build_optimizer(cfg, global_batch=256, total_steps=10)
  out = _run(tx, params, grads)
  for k, decay in (("kernel", wd), ("bias", 0.0)):
    w, v = params[k].astype(np.float64), 0.0
    for g in grads:  # PyTorch SGD: v = m v + (g + wd w); w -= lr v
      v = m * v + (g[k] + decay * w)
      w = w - lr * v
    np.testing.assert_allclose(out[k], w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["lars", "sgd", "adamw"])
def test_frozen_params_unchanged(name):
  rng = np.random.default_rng(3)
  params = {"patch_embed": {"kernel": rng.standard_normal((2, 2, 3, 4)).astype(np.float32),
                            "bias": rng.standard_normal(4).astype(np.float32)},
            "head": {"kernel": rng.standard_normal((4, 2)).astype(np.float32)}}
  grads = [jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params)
           for _ in range(3)]
  cfg = _config(name=name, base_lr=0.1, lr_scaling="none", schedule="constant",
                weight_decay=0.1, frozen_patterns=("patch_embed",), grad_clip_norm=1.0)
  tx, _ = optim.build_optimizer(cfg, global_batch=8, total_steps=10)
  out = _run(tx, params, grads)
  np.testing.assert_array_equal(out["patch_embed"]["kernel"], params["patch_embed"]["kernel"])
  np.testing.assert_array_equal(out["patch_embed"]["bias"], params["patch_embed"]["bias"])
  assert not np.allclose(out["head"]["kernel"], params["head"]["kernel"])


def test_frozen_pattern_without_match_raises():
  cfg = _config(name="sgd", frozen_patterns=("does_not_exist",))
  tx, _ = optim.build_optimizer(cfg, global_batch=8, total_steps=10)
  with pytest.raises(ValueError, match="match no parameter"):
    tx.init({"kernel": jnp.ones((2, 2))})


def test_bad_names_raise():
  with pytest.raises(ValueError, match="optim.name"):
    optim.build_optimizer(_config(name="rmsprop"), global_batch=8, total_steps=10)
  with pytest.raises(ValueError, match="optim.schedule"):
    optim.build_optimizer(_config(schedule="step"), global_batch=8, total_steps=10)
