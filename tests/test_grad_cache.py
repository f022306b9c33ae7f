"""GradCache (grad_cache.py) equals the full-batch step, on 1 and 8 devices.

On BN-free models (SimCLR with a tiny ViT and a head without BN; tiny CLIP) the loss, the
gradients and the parameters after one optimizer step with M = 2 and 4 micro-batches must
equal the M = 1 step (plain autodiff through the whole global batch) to float32 tolerance.
With dropout, the M = 2 gradient must equal a by-hand reference: autodiff through the two
micro-batch forwards with the documented keys ``fold_in(rng, i)`` (so the replay pass used the
same masks as the embedding pass). With BN, the new running statistics must be the mean of the
micro-batches' own updates. Sizes are tiny: compilation dominates the run time.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from contrastive_jax.configs import clip_mnist, common, mocov2_mnist, mocov3_mnist, simclr_mnist
from contrastive_jax import distributed, grad_cache, losses, methods, optim, runs
from contrastive_jax.errors import ConfigError

BATCH = 32
SIZE = 8
VIT = dict(patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32, pool="gap")


def _simclr_config(**model_kwargs):
  c = simclr_mnist.get_config("quick")
  c.global_batch = BATCH
  c.data.image_size = SIZE
  c.model.name = "vit"
  c.model.kwargs = dict(VIT, **model_kwargs)
  c.head = dict(version=2, hidden_dim=16, out_dim=8, use_bn=False)
  c.optim = common.optim_config("sgd", base_lr=0.5, lr_scaling="none", schedule="constant",
                                weight_decay=0.0, momentum=0.9)
  return c


def _clip_config():
  c = clip_mnist.get_config("quick")
  c.global_batch = BATCH
  c.data.image_size = SIZE
  c.data.context_length = 8
  c.model.name = "vit"
  c.model.kwargs = dict(VIT)
  c.text.kwargs = dict(width=16, depth=1, num_heads=2)
  c.clip.embed_dim = 8
  c.optim = common.optim_config("sgd", base_lr=0.5, lr_scaling="none", schedule="constant",
                                weight_decay=0.0, momentum=0.9)
  return c


def _batch(config, mesh):
  rs = np.random.RandomState(0)
  shape = (config.global_batch, SIZE, SIZE, 3)
  if config.method == "clip":
    batch = {"image": rs.rand(*shape).astype(np.float32),
             "tokens": rs.randint(1, 200, (config.global_batch, 8)).astype(np.int32)}
  else:
    batch = {"view1": rs.rand(*shape).astype(np.float32),
             "view2": rs.rand(*shape).astype(np.float32)}
  return jax.device_put(batch, distributed.data_sharding(mesh))


def _method(config, mesh, micro):
  c = config.copy_and_resolve_references()
  c.grad_cache.micro_batches = micro
  return methods.build_method(c, mesh)


# Compile time dominates these tests; XLA's backend optimisation level 0 compiles the tiny
# steps 2-3x faster (the numbers stay float32; every variant is compiled the same way).
_FAST = dict(compiler_options={"xla_backend_optimization_level": 0})


@functools.lru_cache(maxsize=None)
def _initial_state(kind):
  config = _simclr_config() if kind == "simclr" else _clip_config()
  mesh = distributed.make_mesh(1)
  tx, _ = optim.build_optimizer(config.optim, global_batch=BATCH, total_steps=10)
  init = functools.partial(_method(config, mesh, 1).init_state, tx=tx)
  return jax.device_get(jax.jit(init, **_FAST)(jax.random.key(0)))


def _one_step(kind, num_devices, micro):
  """``(grads, params, metrics)`` after one trainer step (``runs.make_train_step``) from the
  shared initial state. The optimizer is SGD with momentum and no weight decay: after the
  first step its trace IS the gradient, so one compiled step gives both."""
  config = _simclr_config() if kind == "simclr" else _clip_config()
  mesh = distributed.make_mesh(num_devices)
  tx, schedule = optim.build_optimizer(config.optim, global_batch=BATCH, total_steps=10)
  state = jax.device_put(_initial_state(kind), distributed.replicated(mesh))
  step = jax.jit(runs.make_train_step(_method(config, mesh, micro), tx, schedule), **_FAST)
  new_state, metrics = jax.device_get(step(state, _batch(config, mesh)))
  grads = optax.tree_utils.tree_get(new_state.opt_state, "trace")
  return grads, new_state.params, metrics


@functools.lru_cache(maxsize=None)
def _reference_step(kind):
  return _one_step(kind, 1, 1)


def _assert_trees_close(actual, desired, rtol=2e-4, atol_frac=1e-5, atol=1e-9):
  """Leafwise; ``atol_frac`` is relative to the leaf's largest entry (summation order differs
  between micro-batch counts and device counts, so entries near 0 get an absolute slack)."""
  for path, a in jax.tree_util.tree_leaves_with_path(actual):
    d = functools.reduce(lambda node, k: node[k.key], path, desired)
    scale = float(np.max(np.abs(d))) if np.size(d) else 0.0
    np.testing.assert_allclose(a, d, rtol=rtol, atol=atol_frac * scale + atol,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("kind,num_devices,micro", [
    ("simclr", 1, 4), ("simclr", 8, 2), ("simclr", 8, 4),
    ("clip", 1, 2), ("clip", 8, 2), ("clip", 8, 4)])
def test_grad_cache_equals_full_batch_step(kind, num_devices, micro):
  """GradCache with M micro-batches on 1 or 8 devices == plain autodiff (M = 1) on 1 device.
  (8 devices with M = 4 puts one row per device in each micro-batch: the finest split.)"""
  grads1, params1, metrics1 = _reference_step(kind)
  assert np.isfinite(metrics1["loss"])
  assert float(metrics1["grad_norm"]) > 1e-3  # a real gradient, not all zeros
  np.testing.assert_allclose(optax.global_norm(grads1), metrics1["grad_norm"], rtol=1e-5)
  if kind == "clip":
    assert abs(float(grads1["logit_scale"])) > 0  # the loss pass's own parameter gradient
  grads, params, metrics = _one_step(kind, num_devices, micro)
  np.testing.assert_allclose(metrics["loss"], metrics1["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"], metrics1["grad_norm"], rtol=1e-4)
  np.testing.assert_allclose(metrics["contrastive_accuracy"], metrics1["contrastive_accuracy"])
  _assert_trees_close(grads, grads1)
  # params - lr * grads: the gradients' rounding differences, times lr = 0.5.
  _assert_trees_close(params, params1, rtol=1e-5, atol_frac=1e-5, atol=1e-6)


def test_dropout_replay_uses_the_embedding_pass_keys():
  """M = 2 with dropout equals autodiff through the two micro-batch forwards keyed
  ``fold_in(rng, i)``; the same forwards with the keys swapped give a different loss."""
  config = _simclr_config(dropout_rate=0.3)
  mesh = distributed.make_mesh(1)
  method = _method(config, mesh, 2)
  model, temperature = method.model, float(config.loss.temperature)
  state = method.init_state(jax.random.key(1), optax.sgd(0.1))
  batch = jax.device_get(_batch(config, mesh))
  rng = jax.random.key(7)
  half = BATCH // 2

  def reference(params, keys):
    z1, z2 = [], []
    for i in range(2):  # on one device micro-batch i is rows [i B/2, (i+1) B/2)
      rows = slice(i * half, (i + 1) * half)
      x = jnp.concatenate([batch["view1"][rows], batch["view2"][rows]])
      (_, z, _), _ = model.apply({"params": params}, x, train=True, mutable=["batch_stats"],
                                 rngs={"dropout": keys[i]})
      z1.append(z[:half])
      z2.append(z[half:])
    return losses.nt_xent(jnp.concatenate(z1), jnp.concatenate(z2), temperature)

  keys = [jax.random.fold_in(rng, 0), jax.random.fold_in(rng, 1)]

  @functools.partial(jax.jit, **_FAST)
  def compute(state):
    (loss, _), grads = method.value_and_grad(state.params, state, batch, rng)
    ref_loss, ref_grads = jax.value_and_grad(reference)(state.params, keys)
    return loss, grads, ref_loss, ref_grads, reference(state.params, keys[::-1])

  loss, grads, ref_loss, ref_grads, swapped_loss = jax.device_get(compute(state))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  _assert_trees_close(grads, ref_grads)
  assert abs(swapped_loss - ref_loss) > 1e-4  # the masks matter: the key check can fail


def test_bn_running_stats_are_the_mean_of_the_micro_batch_updates():
  """ConvNet (BN) encoder and BN head, M = 2 on one device: finite, and each running statistic
  is the mean of the two updates each micro-batch makes on its own."""
  config = simclr_mnist.get_config("quick")
  config.global_batch = 16
  config.data.image_size = SIZE
  config.model.kwargs = dict(widths=(8, 8), strides=(2, 2))
  config.head = dict(version=2, hidden_dim=16, out_dim=8, use_bn=True)
  mesh = distributed.make_mesh(1)
  method = _method(config, mesh, 2)
  tx, _ = optim.build_optimizer(config.optim, global_batch=16, total_steps=10)
  state = jax.jit(functools.partial(method.init_state, tx=tx), **_FAST)(jax.random.key(0))
  batch = jax.device_get(_batch(config, mesh))

  @functools.partial(jax.jit, **_FAST)
  def compute(state):
    rng = jax.random.key(3)
    (loss, (_, updates)), grads = method.value_and_grad(state.params, state, batch, rng)
    singles = [method.loss_fn(state.params, state,
                              jax.tree.map(lambda x: x[i * 8:(i + 1) * 8], batch), rng)[1][1]
               for i in range(2)]
    return loss, grads, updates["batch_stats"], [s["batch_stats"] for s in singles]

  loss, grads, stats, singles = jax.device_get(compute(state))
  assert np.isfinite(loss)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  expected = jax.tree.map(lambda a, b: (np.float64(a) + b) / 2, *singles)
  _assert_trees_close(stats, expected, rtol=1e-5, atol_frac=1e-6)
  # The micro-batches' statistics really differ (else any choice would pass).
  assert not np.allclose(singles[0]["encoder"]["layer1"]["bn"]["var"],
                         singles[1]["encoder"]["layer1"]["bn"]["var"])


def test_micro_batches_span_every_device():
  """Micro-batch i holds the i-th chunk of every device's rows, and merge inverts split."""
  mesh = distributed.make_mesh(8)
  x = jax.device_put(np.arange(64, dtype=np.float32), distributed.data_sharding(mesh))
  split = jax.jit(lambda x: grad_cache.split(x, 4, 8, mesh))
  y = split(x)
  expected = np.arange(64).reshape(8, 4, 2).transpose(1, 0, 2).reshape(4, 16)
  np.testing.assert_array_equal(np.asarray(y), expected)
  assert len({s.device for s in y.addressable_shards}) == 8
  assert {s.data.shape for s in y.addressable_shards} == {(4, 2)}
  back = jax.jit(lambda y: grad_cache.merge(y, 8, mesh))(y)
  np.testing.assert_array_equal(np.asarray(back), np.arange(64))


def test_bad_micro_batch_counts_raise_naming_the_setting():
  mesh = distributed.make_mesh(8)
  for micro, batch in ((3, 32), (8, 32)):
    config = _simclr_config()
    config.global_batch = batch
    config.grad_cache.micro_batches = micro
    with pytest.raises(ValueError, match=r"config\.grad_cache\.micro_batches"):
      methods.build_method(config, mesh)
  config = _clip_config()
  config.grad_cache.micro_batches = 0
  with pytest.raises(ValueError, match=r"config\.grad_cache\.micro_batches=0"):
    methods.build_method(config, mesh)


def test_grad_cache_uses_less_temporary_memory():
  """The compiled step with M = 4 needs less temporary memory than M = 1 (one device)."""
  config = _simclr_config()
  config.global_batch = 128
  config.data.image_size = 16
  mesh = distributed.make_mesh(1)
  tx, schedule = optim.build_optimizer(config.optim, global_batch=128, total_steps=10)
  temp = {}
  for m in (1, 4):
    method = _method(config, mesh, m)
    state = jax.eval_shape(functools.partial(method.init_state, tx=tx), jax.random.key(0))
    batch = {k: jax.ShapeDtypeStruct((128, 16, 16, 3), jnp.float32) for k in ("view1", "view2")}
    step = jax.jit(runs.make_train_step(method, tx, schedule), **_FAST)
    temp[m] = step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes
  assert temp[4] < 0.75 * temp[1], temp


@pytest.mark.parametrize("module", [mocov2_mnist, mocov3_mnist], ids=["mocov2", "mocov3"])
def test_moco_refuses_grad_cache_naming_the_setting(module):
  """MoCo's keys come from the momentum encoder and the queue, so it declares no GradCache:
  the config check and building the method both refuse M > 1, before anything compiles."""
  config = module.get_config("quick")
  config.grad_cache.micro_batches = 2
  mesh = distributed.make_mesh(1)
  assert not methods.METHODS[config.method].supports_grad_cache
  with pytest.raises(ConfigError, match=r"config\.grad_cache\.micro_batches=2 .* set it"):
    runs.check_config(config, mesh)
  with pytest.raises(ValueError, match=r"config\.grad_cache\.micro_batches=2 .* set it"):
    methods.build_method(config, mesh)
  assert methods.METHODS["simclr"].supports_grad_cache
  assert methods.METHODS["clip"].supports_grad_cache
