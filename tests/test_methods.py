"""MoCo v2, MoCo v3, CLIP and SigLIP on the generic trainer: EMA, queue, shuffle-BN, no
gradient to the key encoder, logit-scale clip, 1 vs 8 devices, zero-shot above chance, and the
full-size configs building under ``jax.eval_shape``.

Trainer runs dominate the time (each compiles its step), so one pair of short runs per method
(1 and 8 devices, a checkpoint every step) serves the smoke test, the device-count equality and,
through the checkpoints, the step-by-step EMA and queue checks. References are float64 numpy
computations from the papers' formulas.
"""

from __future__ import annotations

import functools
import importlib
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax.configs import clip_mnist, mocov2_mnist, mocov3_mnist
from contrastive_jax import checkpoint, configs, distributed, methods, models, optim, runs, train
from contrastive_jax.data import pipeline
from contrastive_jax.errors import ConfigError
from contrastive_jax.evaluate import runner as eval_runner
from contrastive_jax.methods import moco
from contrastive_jax.train_state import TrainState

import test_method_reference as mref
import test_runs

STEPS = 3


def _override(c, overrides):
  return configs.apply_overrides(c, overrides)


def tiny(module, arg="quick", **overrides):
  """The config's quick mode at 16 px, tiny widths, a checkpoint every step, constant lr (so
  that the first steps do not depend on the run length)."""
  c = module.get_config(arg)
  c.eval.enabled = False
  c.log_every = 1
  c.data.image_size = 16
  c.total_steps = STEPS
  c.checkpoint.every_steps = 1
  c.checkpoint.max_to_keep = 10
  c.checkpoint.async_save = False
  c.optim.schedule = "constant"
  c.optim.warmup_fraction = 0.0
  if c.model.name == "convnet":
    c.model.kwargs = dict(widths=(8, 16), strides=(2, 2))
  return _override(c, overrides)


def _losses(summary):
  return [h["loss"] for h in summary["train_history"]]


def _states(config, workdir, num_devices=1):
  """``{step: TrainState}`` for step 0 (fresh init, as the trainer does) and every checkpoint."""
  mesh = distributed.make_mesh(num_devices)
  method = methods.build_method(config, mesh)
  tx, _ = optim.build_optimizer(config.optim, global_batch=config.global_batch,
                                total_steps=config.total_steps)
  init = functools.partial(method.init_state, tx=tx)
  rng = jax.random.key(config.seed)
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=distributed.replicated(mesh)),
      jax.eval_shape(init, rng))
  states = {0: jax.jit(init)(rng)}
  ckpt = checkpoint.Checkpointer(workdir)
  for step in ckpt.all_steps():
    states[step] = ckpt.restore(abstract, step)[0]
  ckpt.close()
  return method, states, abstract


def _batch(config, step):
  """The global batch the trainer used at 0-based ``step``."""
  it = pipeline.train_iterator(config.data, mode=methods.build_method(
      config, distributed.make_mesh(1)).input_mode, global_batch=config.global_batch,
      seed=config.seed, start_step=step)
  return {k: jnp.asarray(v) for k, v in next(it).items()}


def _f64(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _assert_ema(ema_new, ema_old, online_new, m):
  ref = jax.tree.map(lambda e, o: m * e + (1.0 - m) * o, _f64(ema_old), _f64(online_new))
  jax.tree.map(lambda a, r: np.testing.assert_allclose(np.asarray(a, np.float64), r, rtol=1e-6,
                                                       atol=1e-7), ema_new, ref)


def _key_grads_are_zero(method, state, batch):
  """d loss / d (key-encoder params, queue) is exactly zero: no gradient reaches them."""
  rng = jax.random.key(1)

  def loss(ema_params, queue):
    s = state.replace(ema_params=ema_params, queue=queue)
    return method.loss_fn(s.params, s, batch, rng)[0]

  g_ema, g_queue = jax.jit(jax.grad(loss, argnums=(0, 1)))(state.ema_params, state.queue)
  for g in jax.tree.leaves(g_ema) + jax.tree.leaves(g_queue):
    assert not np.any(np.asarray(g)), "a gradient reached the key encoder or the queue"
  # And the keys handed to post_update do not depend on the trained parameters.
  if state.queue is not None:
    g_keys = jax.jit(jax.grad(lambda p: sum(
        jnp.sum(k ** 2) for k in method.loss_fn(p, state, batch, rng)[1][1]["keys"])))(
            state.params)
    assert not any(np.any(np.asarray(g)) for g in jax.tree.leaves(g_keys))
  # The momentum encoder is a separate field, not part of what the optimizer trains.
  assert not any(x is y for x, y in zip(jax.tree.leaves(state.params),
                                        jax.tree.leaves(state.ema_params)))


# ----------------------------------------------------------------------------- MoCo v2


@pytest.fixture(scope="module")
def mocov2_runs(tmp_path_factory):
  # Sync BN: with shuffle-BN the key statistics are per device, so the loss legitimately depends
  # on the device count; with shuffle_bn=False every BN sees the global batch on 1 and 8 devices.
  # Queue of 2 batches: the third step wraps around.
  runs = {}
  for n in (1, 8):
    c = tiny(mocov2_mnist, "quick", num_devices=n, **{"moco.shuffle_bn": False})
    c.moco.queue_size = 2 * c.global_batch
    workdir = tmp_path_factory.mktemp(f"mocov2_d{n}")
    runs[n] = (c, workdir, train.train_and_evaluate(c, str(workdir)).summary)
  return runs


def test_mocov2_one_and_eight_devices_agree(mocov2_runs):
  (_, _, s1), (_, _, s8) = mocov2_runs[1], mocov2_runs[8]
  assert len(_losses(s8)) == STEPS and np.all(np.isfinite(_losses(s8)))
  np.testing.assert_allclose(_losses(s8), _losses(s1), rtol=2e-5)


def test_mocov2_ema_and_fifo_queue_over_steps(mocov2_runs):
  config, workdir, _ = mocov2_runs[8]
  method, states, _ = _states(config, workdir)
  assert sorted(states) == list(range(STEPS + 1))
  b, k = config.global_batch, config.moco.queue_size
  m = float(config.moco.momentum)
  np.testing.assert_array_equal(np.asarray(states[0].queue_ptr), 0)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(states[0].queue), axis=1), 1.0, rtol=1e-5)
  for t in range(1, STEPS + 1):
    old, new = states[t - 1], states[t]
    _assert_ema(new.ema_params, old.ema_params, new.params, m)
    ptr = (t - 1) * b % k
    assert int(new.queue_ptr) == t * b % k
    # Independent keys: the key encoder of step t (EMA after step t - 1) on view 2 of the
    # global batch, sync BN over the whole batch (shuffle_bn=False), L2-normalised in float64.
    batch = _batch(config, t - 1)
    (_, key, _), _ = method.model.apply(
        {"params": old.ema_params, "batch_stats": old.ema_batch_stats}, batch["view2"],
        train=True, mutable=["batch_stats"])
    key = np.asarray(key, np.float64)
    key /= np.linalg.norm(key, axis=1, keepdims=True)
    q_old, q_new = np.asarray(old.queue), np.asarray(new.queue)
    np.testing.assert_allclose(q_new[ptr:ptr + b], key, rtol=1e-4, atol=1e-5)
    rest = np.ones(k, bool)
    rest[ptr:ptr + b] = False
    np.testing.assert_array_equal(q_new[rest], q_old[rest])


def test_mocov2_queue_survives_checkpoint_round_trip(mocov2_runs, tmp_path):
  config, workdir, _ = mocov2_runs[8]
  _, states, abstract = _states(config, workdir)
  state = states[STEPS]
  assert int(state.queue_ptr) != 0  # the restored pointer is the trained one, not the init
  with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(7, state, data_state={"step": 7}, config=config, force=True)
    ckpt.wait()
    restored = ckpt.restore(abstract)[0]
  np.testing.assert_array_equal(np.asarray(restored.queue), np.asarray(state.queue))
  assert int(restored.queue_ptr) == int(state.queue_ptr)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               restored.ema_params, state.ema_params)


def test_mocov2_no_gradient_to_key_encoder_or_queue(mocov2_runs):
  config, workdir, _ = mocov2_runs[1]
  method, states, _ = _states(config, workdir)
  _key_grads_are_zero(method, states[1], _batch(config, 1))


def test_mocov2_shuffle_bn_trainer_step(tmp_path):
  """Default MoCo v2 (shuffle-BN, asymmetric) through the trainer, one step on 8 devices: the
  logged loss is MoCo Eq. 1 (float64) of per-device-BN queries (each device's 4 rows of the
  global batch normalised alone), the keys the step enqueued and the queue before the step;
  the step moved the parameters, both BN statistics and the key encoder (Eq. 2)."""
  c = tiny(mocov2_mnist, total_steps=1)
  summary = train.train_and_evaluate(c, str(tmp_path)).summary
  method, states, _ = _states(c, tmp_path)
  old, new = states[0], states[1]
  b, devices = c.global_batch, jax.device_count()
  assert int(new.queue_ptr) == b
  keys = np.asarray(new.queue)[:b]
  np.testing.assert_allclose(np.linalg.norm(keys, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(new.queue)[b:], np.asarray(old.queue)[b:])
  q = mref.forward(mref.mocov2_model(c), old.params, old.batch_stats, _batch(c, 0)["view1"],
                   groups=devices)
  loss, _, accuracy = mref.moco_eq1(q, keys, old.queue, c.loss.temperature)
  np.testing.assert_allclose(summary["final_train"]["loss"], loss, rtol=2e-5)
  np.testing.assert_allclose(summary["final_train"]["contrastive_accuracy"], accuracy,
                             atol=1e-6)
  _assert_ema(new.ema_params, old.ema_params, new.params, float(c.moco.momentum))
  for field in ("params", "batch_stats", "ema_batch_stats"):
    assert not all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(
        jax.tree.leaves(getattr(old, field)), jax.tree.leaves(getattr(new, field)))), field


def test_shuffle_bn_uses_other_devices_sub_batches():
  config = tiny(mocov2_mnist, num_devices=8)
  mesh = distributed.make_mesh(8)
  method = methods.build_method(config, mesh)
  b, g = config.global_batch, mesh.size
  n = b // g
  # Pure functions: unshuffle inverts shuffle; key groups differ from the query groups.
  x = jnp.arange(b * 3, dtype=jnp.float32).reshape(b, 3)
  for seed in range(5):
    perm = moco.shuffle_permutation(jax.random.key(seed), b)
    assert sorted(np.asarray(perm).tolist()) == list(range(b))
    np.testing.assert_array_equal(np.asarray(moco.unshuffle(moco.shuffle(x, perm), perm)), x)
    np.testing.assert_array_equal(np.asarray(moco.shuffle(x, perm)), np.asarray(x)[perm])
    for d in range(g):
      own = set(range(d * n, (d + 1) * n))
      assert set(np.asarray(perm[d * n:(d + 1) * n]).tolist()) != own
  # The keys: device d's BN statistics are those of the images perm[d n:(d + 1) n].
  tx, _ = optim.build_optimizer(config.optim, global_batch=b, total_steps=4)
  state = method.init_state(jax.random.key(0), tx)
  images = jax.random.uniform(jax.random.key(3), (b, 16, 16, 3))
  keys, _, perms = method.keys(state, [images], jax.random.key(4))
  perm = np.asarray(perms[0])
  ref_model = method.model
  for d in range(g):
    rows = perm[d * n:(d + 1) * n]
    (_, ref, _), _ = ref_model.apply(
        {"params": state.ema_params, "batch_stats": state.ema_batch_stats}, images[rows],
        train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(keys[0])[rows], np.asarray(ref), rtol=1e-4, atol=1e-5)
  # Sync BN (what shuffle-BN avoids) would give other keys.
  (_, sync, _), _ = ref_model.apply(
      {"params": state.ema_params, "batch_stats": state.ema_batch_stats}, images, train=True,
      mutable=["batch_stats"])
  assert not np.allclose(np.asarray(keys[0]), np.asarray(sync), atol=1e-3)


def test_mocov2_queue_size_must_be_multiple_of_batch():
  c = tiny(mocov2_mnist)
  c.moco.queue_size = 3 * c.global_batch + 1
  with pytest.raises(ValueError, match="config.moco.queue_size"):
    methods.build_method(c, distributed.make_mesh(1))
  c = tiny(mocov2_mnist, "quick,symmetric")
  c.moco.queue_size = 3 * c.global_batch  # symmetric enqueues 2B keys a step
  with pytest.raises(ValueError, match="symmetric"):
    methods.build_method(c, distributed.make_mesh(1))


# ----------------------------------------------------------------------------- MoCo v3


@pytest.fixture(scope="module")
def mocov3_runs(tmp_path_factory):
  runs = {}
  for n in (1, 8):
    c = tiny(mocov3_mnist, num_devices=n)
    c.head.hidden_dim = c.predictor.hidden_dim = 32
    workdir = tmp_path_factory.mktemp(f"mocov3_d{n}")
    runs[n] = (c, workdir, train.train_and_evaluate(c, str(workdir)).summary)
  return runs


def test_mocov3_one_and_eight_devices_agree(mocov3_runs):
  (_, _, s1), (_, _, s8) = mocov3_runs[1], mocov3_runs[8]
  assert np.all(np.isfinite(_losses(s8)))
  np.testing.assert_allclose(_losses(s8), _losses(s1), rtol=2e-5)


def test_mocov3_ema_with_cosine_momentum(mocov3_runs):
  config, workdir, summary = mocov3_runs[8]
  method, states, _ = _states(config, workdir)
  m0, total = float(config.moco.momentum), config.total_steps
  cosine = lambda t: 1.0 - (1.0 - m0) * (math.cos(math.pi * t / total) + 1.0) / 2.0  # noqa
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               states[0].ema_params, moco._key_part(states[0].params))
  assert "predictor" in states[0].params and "predictor" not in states[0].ema_params
  for t in range(1, STEPS + 1):
    # MoCo updates the key encoder at the start of step t with m_t; we do it after step t - 1.
    _assert_ema(states[t].ema_params, states[t - 1].ema_params,
                moco._key_part(states[t].params), cosine(t))
  logged = [h["momentum"] for h in summary["train_history"]]
  np.testing.assert_allclose(logged, [cosine(t) for t in range(1, STEPS + 1)], rtol=1e-6)


def test_mocov3_momentum_schedule_values():
  c = tiny(mocov3_mnist, total_steps=1000)
  method = methods.build_method(c, distributed.make_mesh(1))
  m0 = float(c.moco.momentum)
  for t, want in ((0, m0), (500, (1 + m0) / 2), (1000, 1.0), (1500, 1.0),
                  (250, 1 - (1 - m0) * (math.cos(math.pi / 4) + 1) / 2)):
    np.testing.assert_allclose(float(method.momentum(t)), want, rtol=1e-6)


def test_mocov3_no_gradient_to_key_encoder(mocov3_runs):
  config, workdir, _ = mocov3_runs[1]
  method, states, _ = _states(config, workdir)
  _key_grads_are_zero(method, states[1], _batch(config, 1))


# ----------------------------------------------------------------------------- CLIP / SigLIP


def _clip_tiny(arg="quick", **overrides):
  c = tiny(clip_mnist, arg, **overrides)
  c.model.name = "vit"
  c.model.kwargs = dict(patch_size=8, width=16, depth=1, num_heads=2, pool="gap")
  c.text.kwargs = dict(width=16, depth=1, num_heads=2)
  c.clip.embed_dim = 16
  return c


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_clip_one_and_eight_devices_agree(loss, tmp_path):
  summaries = {n: train.train_and_evaluate(_clip_tiny(f"quick,loss={loss}", num_devices=n),
                                           str(tmp_path / f"d{n}")).summary for n in (1, 8)}
  assert np.all(np.isfinite(_losses(summaries[8])))
  np.testing.assert_allclose(_losses(summaries[8]), _losses(summaries[1]), rtol=2e-5)
  np.testing.assert_allclose([h["grad_norm"] for h in summaries[8]["train_history"]],
                             [h["grad_norm"] for h in summaries[1]["train_history"]], rtol=1e-4)


def _np_clip_loss(img, txt, scale):
  img = img / np.linalg.norm(img, axis=1, keepdims=True)
  txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
  logits = scale * img @ txt.T

  def ce(lg):
    lg = lg - lg.max(axis=1, keepdims=True)
    return np.mean(np.log(np.exp(lg).sum(axis=1)) - np.diag(lg))
  return 0.5 * (ce(logits) + ce(logits.T))


def test_clip_logit_scale_is_clipped_at_100():
  c = _clip_tiny()
  method = methods.build_method(c, distributed.make_mesh(1))
  tx, _ = optim.build_optimizer(c.optim, global_batch=c.global_batch, total_steps=4)
  state = method.init_state(jax.random.key(0), tx)
  np.testing.assert_allclose(float(state.params["logit_scale"]), math.log(1 / 0.07), rtol=1e-6)
  params = dict(state.params, logit_scale=jnp.float32(math.log(1000.0)))
  batch = _batch(c, 0)
  loss, (metrics, _) = jax.jit(method.loss_fn)(params, state, batch, jax.random.key(0))
  img = np.asarray(jax.jit(method.encode_image)(state, batch["image"]), np.float64)
  txt = np.asarray(jax.jit(method.encode_text)(state, batch["tokens"]), np.float64)
  np.testing.assert_allclose(float(metrics["logit_scale"]), 100.0, rtol=1e-6)
  np.testing.assert_allclose(float(loss), _np_clip_loss(img, txt, 100.0), rtol=1e-4)
  assert abs(_np_clip_loss(img, txt, 1000.0) - float(loss)) > 1e-3  # the clip mattered
  # post_update also clamps the parameter itself (open_clip), so it can move again.
  clamped = method.post_update(state.replace(params=params), {"batch_stats": {}})
  np.testing.assert_allclose(float(clamped.params["logit_scale"]), math.log(100.0), rtol=1e-6)


def test_siglip_init_and_weight_decay_mask():
  c = _clip_tiny("quick,loss=siglip")
  method = methods.build_method(c, distributed.make_mesh(1))
  params = jax.eval_shape(lambda: method.init_state(
      jax.random.key(0), optim.build_optimizer(c.optim, global_batch=32, total_steps=4)[0])
  ).params
  real = method.model.init(jax.random.key(0), jnp.zeros((2, 16, 16, 3)),
                           jnp.zeros((2, c.data.context_length), jnp.int32))["params"]
  np.testing.assert_allclose(float(real["logit_scale"]), math.log(10.0), rtol=1e-6)
  np.testing.assert_allclose(float(real["logit_bias"]), -10.0)
  mask = {optim.path_to_str(p): v
          for p, v in jax.tree_util.tree_leaves_with_path(optim.weight_decay_mask(params))}
  for path, decayed in mask.items():
    no_decay = (path.endswith(("bias", "scale", "embedding", "pos_embedding", "logit_scale",
                               "logit_bias")) or "/ln" in path)
    assert decayed != no_decay, path
  assert mask["image_proj/kernel"] and mask["text_proj/kernel"]
  assert not mask["text_encoder/token_embed/embedding"] and not mask["logit_scale"]


@pytest.fixture(scope="module")
def clip_trained(tmp_path_factory):
  """A short 1-device CLIP run on the captioned digits (ConvNet image tower: it learns fastest)."""
  c = clip_mnist.get_config("quick")
  _override(c, {"eval.enabled": False, "data.image_size": 16, "num_devices": 1,
                "total_steps": 150, "global_batch": 64, "log_every": 50,
                "checkpoint.every_steps": 1000, "checkpoint.async_save": False,
                "optim.schedule": "constant", "optim.warmup_fraction": 0.0,
                "optim.base_lr": 3e-3})
  c.model.name = "convnet"
  c.model.kwargs = dict(widths=(16, 32, 32), strides=(1, 2, 2))
  workdir = tmp_path_factory.mktemp("clip_zero_shot")
  summary = train.train_and_evaluate(c, str(workdir)).summary
  method, states, _ = _states(c, workdir)
  return c, method, states[c.total_steps], summary


def test_clip_zero_shot_beats_chance(clip_trained):
  config, method, state, _ = clip_trained
  res = eval_runner.Runner(config, method, distributed.make_mesh(1)).run(
      state, ["zero_shot", "retrieval"])
  # 10 classes: chance is 0.1. Held-out caption templates only; this run reaches about 0.7.
  assert res["zero_shot/top1"] > 0.5, res
  # Captions are one held-out template per class: identical captions are one text, so
  # image -> text is class retrieval among 10 texts (chance 0.1; this run about 0.4). Text ->
  # image asks whether the caption's single most similar image is of its class: 10 distinct
  # queries, too coarse for a margin here.
  assert 0.25 < res["retrieval/image_to_text/R@1"] <= 1.0, res
  assert 0.0 <= res["retrieval/text_to_image/R@1"] <= 1.0, res
  # A method without a text tower gets no text evaluators by default, and declaring one fails.
  other_config = tiny(mocov3_mnist)
  other = methods.build_method(other_config, distributed.make_mesh(1))
  runner = eval_runner.Runner(other_config, other, distributed.make_mesh(1))
  assert not runner.select(["extra"])
  other_config.eval.evaluators = {"zs": {"type": "zero_shot"}}
  with pytest.raises(ConfigError, match="text tower"):
    eval_runner.Runner(other_config, other, distributed.make_mesh(1))


def test_clip_encoders_shapes(clip_trained):
  config, method, state, _ = clip_trained
  images = jnp.zeros((4, 16, 16, 3))
  assert method.encode(state, images).shape == (4, 32)
  emb = method.encode_image(state, images)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(emb), axis=1), 1.0, rtol=1e-5)
  tokens = pipeline.class_prompts(config.data)["tokens"][:, 0]
  assert method.encode_text(state, jnp.asarray(tokens)).shape == (10, config.clip.embed_dim)


# ----------------------------------------------------------------------------- configs


FULL_CONFIGS = ["mocov2_resnet50_imagenet", "mocov3_resnet50_imagenet",
                "mocov3_vit_base_imagenet", "clip_vit_b32", "siglip_vit_b16"]


@pytest.mark.parametrize("name", FULL_CONFIGS + ["mocov2_mnist", "mocov3_mnist", "clip_mnist"])
def test_configs_build_and_init_under_eval_shape(name):
  module = importlib.import_module(f"contrastive_jax.configs.{name}")
  for arg in (None, "quick") + (("tower=vit",) if name == "clip_mnist" else ()):
    c = module.get_config(arg)
    mesh = distributed.make_mesh(8)
    method = methods.build_method(c, mesh)
    tx, _ = optim.build_optimizer(c.optim, global_batch=c.global_batch,
                                  total_steps=c.total_steps)
    state = jax.eval_shape(functools.partial(method.init_state, tx=tx), jax.random.key(0))
    assert isinstance(state, TrainState)
    assert method.input_mode in pipeline.MODES
    if c.method == "mocov2":
      assert state.queue.shape == (c.moco.queue_size, c.head.out_dim)
  full = {n: importlib.import_module(f"contrastive_jax.configs.{n}").get_config()
          for n in FULL_CONFIGS}
  assert full["mocov2_resnet50_imagenet"].moco.queue_size == 65_536
  assert full["clip_vit_b32"].global_batch == 32_768
  assert full["mocov3_vit_base_imagenet"].optim.frozen_patterns == ("patch_embed_frozen",)


def test_every_config_data_key_can_be_overridden_on_the_command_line():
  """ml_collections cannot override a None field from the command line
  (``--config.data.data_dir=gs://...`` fails on it): every data key has a typed default."""
  import glob, os  # pylint: disable=g-import-not-at-top,g-multiple-import
  names = sorted(os.path.basename(f)[:-3] for f in glob.glob("configs/*.py")
                 if not f.endswith(("common.py", "__init__.py")))
  assert len(names) >= 11
  for name in names:
    c = importlib.import_module(f"contrastive_jax.configs.{name}").get_config()
    assert not [k for k, v in c.data.items() if v is None], name


# ----------------------------------------------------------------------------- collectives


def _collectives(hlo: str) -> tuple[dict[str, int], list[tuple[str, int]]]:
  """Count of each collective kind in compiled HLO text, and each all-to-all's result type with
  its number of elements."""
  counts, all_to_alls = {}, []
  for m in re.finditer(r"= (.*?) (all-to-all|all-gather|all-reduce|reduce-scatter|"
                       r"collective-permute)(?:-start)?\(", hlo):
    counts[m.group(2)] = counts.get(m.group(2), 0) + 1
    if m.group(2) == "all-to-all":
      shapes = re.findall(r"[a-z]+[0-9]*\[([0-9,]*)\]", m.group(1))
      size = sum(math.prod(int(d) for d in s.split(",") if d) for s in shapes)
      all_to_alls.append((m.group(1)[:80], size))
  return counts, all_to_alls


def assert_no_image_all_to_all(run, where: str) -> dict[str, int]:
  """The compiled train step of ``run`` has no all-to-all holding an image's worth of data."""
  hlo = run.train_step.lower(run.abstract_state, run.abstract_batch()).compile().as_text()
  counts, all_to_alls = _collectives(hlo)
  image = run.config.data.image_size ** 2 * 3
  big = [(t, n) for t, n in all_to_alls if n >= image]
  assert not big, f"{where}: all-to-alls of image data {big}; collectives {counts}"
  return counts


@pytest.mark.parametrize("name", ["simclr", "mocov2", "mocov3", "clip"])
def test_compiled_step_moves_no_images_through_all_to_alls(name):
  """Two views joined along the batch used to reach the encoder through all-to-alls (SimCLR,
  MoCo v3: three each). The same programs as test_runs' replicated runs (the persistent
  compilation cache shares them within a session)."""
  run = runs.build_run(test_runs.tiny_config(name, "replicated"), distributed.make_mesh(8))
  counts = assert_no_image_all_to_all(run, f"{name} on 8 CPU devices")
  print(f"{name}: {counts}")


def test_compiled_tpu_step_moves_no_images_through_all_to_alls():
  """SimCLR compiled by libtpu for a v5e:2x4 slice (no TPU needed): the concatenated views
  were three all-to-alls (bf16 images) and eight collective-permutes there too."""
  import test_ring_order  # pylint: disable=g-import-not-at-top  (sets libtpu's environment)
  mesh = distributed.make_mesh(devices=test_ring_order.tpu_devices("v5e:2x4"))
  run = runs.build_run(test_runs.tiny_config("simclr", "replicated"), mesh)
  counts = assert_no_image_all_to_all(run, "simclr on v5e:2x4")
  assert "collective-permute" not in counts, counts


def test_join_views_keeps_rows_on_their_device():
  mesh = distributed.make_mesh(8)
  views = [jnp.arange(16.0).reshape(16, 1) + 100 * v for v in range(3)]
  joined = jax.jit(lambda vs: methods.base.join_views(vs, mesh))(
      [jax.device_put(v, distributed.data_sharding(mesh)) for v in views])
  for shard in joined.addressable_shards:  # device d: its 2 rows of view 0, 1, then 2
    d = shard.index[0].start // 6
    np.testing.assert_array_equal(np.asarray(shard.data)[:, 0],
                                  [100 * v + 2 * d + i for v in range(3) for i in range(2)])
  back = methods.base.split_views(joined, 3, mesh)
  for v, b in zip(views, back):
    np.testing.assert_array_equal(np.asarray(b), np.asarray(v))


def test_apply_train_per_view_equals_one_bn_group_per_view():
  """Per-view passes from the same statistics: the outputs and the running-statistics update
  of one pass over the concatenated views with ``bn_groups=2``."""
  class Net(nn.Module):
    bn_groups: int = 1

    @nn.compact
    def __call__(self, x, train=True):
      return models.BatchNorm(use_running_average=not train, bn_groups=self.bn_groups)(
          nn.Dense(4)(x))

  rs = np.random.RandomState(0)
  v1, v2 = (jnp.asarray(rs.normal(size=(6, 3)) + s, jnp.float32) for s in (0.0, 2.0))
  variables = jax.jit(lambda x: Net().init(jax.random.key(0), x, train=False))(v1)
  params, stats = variables["params"], variables["batch_stats"]
  rng = jax.random.key(1)
  (y1, y2), new = jax.jit(lambda *a: methods.base.apply_train_per_view(Net(), *a, rng))(
      params, stats, [v1, v2])
  y, ref = jax.jit(lambda p, s, x: methods.base.apply_train(Net(bn_groups=2), p, s, x, rng=rng))(
      params, stats, jnp.concatenate([v1, v2]))
  np.testing.assert_allclose(np.concatenate([y1, y2]), y, rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), new, ref)
