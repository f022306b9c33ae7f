"""Mixed precision (``config.dtype="bfloat16"``) and rematerialisation (``config.remat``).

bf16 compute must keep float32 parameters and optimizer state, give finite losses, and follow
the float32 loss trajectory within bf16 noise (a few 1e-3 relative; the bound is 3e-2) over a
few SimCLR steps on real embedded-MNIST batches. ``config.remat=True`` recomputes activations in
the backward pass and must leave the float32 trajectory unchanged. One CLIP step in bf16: finite,
float32 parameters. The jaxpr check makes sure bf16 really reaches the model's matmuls, so the
trajectory comparison cannot pass by computing in float32 twice.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax.configs import clip_mnist, simclr_mnist
from contrastive_jax import distributed, methods, optim, runs
from contrastive_jax.data import pipeline

STEPS = 4
# Tiny programs: XLA's backend optimisation level 0 compiles them 2-3x faster.
_FAST = dict(compiler_options={"xla_backend_optimization_level": 0})


def _simclr_config(**overrides):
  c = simclr_mnist.get_config("quick")  # batch 32, convnet (16, 16, 32, 32), LARS
  c.data.image_size = 16
  # Pinned, whatever the recipe's tuning: a moderate step (LARS lr 0.1 x 32/256) and T = 0.2,
  # so that 4 steps measure bf16 rounding, not how fast a large step amplifies any difference.
  c.optim.base_lr = 0.1
  c.optim.lr_scaling = "linear"
  c.loss.temperature = 0.2
  c.data.shuffle_buffer = 64
  c.total_steps = STEPS
  for key, value in overrides.items():
    c[key] = value
  return c


@functools.lru_cache(maxsize=None)
def _simclr_batches():
  """The first STEPS training batches (the same for every run)."""
  c = _simclr_config()
  it = pipeline.train_iterator(c.data, mode="views", global_batch=c.global_batch, seed=c.seed)
  return [next(it) for _ in range(STEPS)]


def _train(config, batches):
  """``(losses per step, final state)`` of the trainer's step on one device."""
  mesh = distributed.make_mesh(1)
  method = methods.build_method(config, mesh)
  tx, schedule = optim.build_optimizer(config.optim, global_batch=config.global_batch,
                                       total_steps=len(batches))
  state = jax.jit(functools.partial(method.init_state, tx=tx), **_FAST)(
      jax.random.key(config.seed))
  step = jax.jit(runs.make_train_step(method, tx, schedule), **_FAST)
  losses = []
  for batch in batches:
    batch = {k: v for k, v in batch.items() if k in ("view1", "view2", "image", "tokens")}
    state, metrics = step(state, distributed.host_local_to_global(batch, mesh))
    losses.append(float(metrics["loss"]))
  return np.asarray(losses), method, state


def _dtypes(tree):
  return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


@pytest.fixture(scope="module")
def simclr_float32():
  return _train(_simclr_config(), _simclr_batches())


def test_simclr_bf16_tracks_float32(simclr_float32):
  ref, _, _ = simclr_float32
  losses, method, state = _train(_simclr_config(dtype="bfloat16"), _simclr_batches())
  assert np.all(np.isfinite(losses))
  assert _dtypes(state.params) == {"float32"}
  assert _dtypes(state.opt_state) == {"float32"}
  assert _dtypes(state.batch_stats) == {"float32"}
  rel = np.abs(losses - ref) / np.abs(ref)
  assert np.all(rel < 3e-2), (losses, ref)
  assert np.any(losses != ref)  # bf16 really ran: not the float32 numbers again
  # The encoder's convolutions run in bf16 (parameters cast at use).
  x = jnp.zeros((2, 16, 16, 3), jnp.float32)
  jaxpr = str(jax.make_jaxpr(lambda p: method.model.apply(
      {"params": p, "batch_stats": state.batch_stats}, x, train=False))(state.params))
  assert "conv_general_dilated" in jaxpr and "bf16" in jaxpr


def test_simclr_remat_gives_the_same_float32_trajectory(simclr_float32):
  ref, _, _ = simclr_float32
  losses, method, state = _train(_simclr_config(remat=True), _simclr_batches())
  np.testing.assert_allclose(losses, ref, rtol=1e-5)
  # Rematerialisation really ran: the encoder's blocks are checkpointed in the traced program.
  x = jnp.zeros((2, 16, 16, 3), jnp.float32)
  jaxpr = str(jax.make_jaxpr(lambda p: method.model.apply(
      {"params": p, "batch_stats": state.batch_stats}, x, train=True,
      mutable=["batch_stats"]))(state.params))
  assert "checkpoint" in jaxpr or "remat" in jaxpr


def test_clip_bf16_step_is_finite_with_float32_params():
  c = clip_mnist.get_config("quick")
  c.data.image_size = 16
  c.data.context_length = 8
  c.model.name = "vit"
  c.model.kwargs = dict(patch_size=4, width=16, depth=1, num_heads=2, pool="gap")
  c.text.kwargs = dict(width=16, depth=1, num_heads=2)
  c.clip.embed_dim = 8
  c.dtype = "bfloat16"
  rs = np.random.RandomState(0)
  batch = {"image": rs.rand(c.global_batch, 16, 16, 3).astype(np.float32),
           "tokens": rs.randint(1, 200, (c.global_batch, 8)).astype(np.int32)}
  losses, method, state = _train(c, [batch])
  assert np.all(np.isfinite(losses))
  assert _dtypes(state.params) == {"float32"}
  assert _dtypes(state.opt_state) == {"float32"}
  assert state.params["logit_scale"].dtype == jnp.float32
  jaxpr = str(jax.make_jaxpr(lambda p: method.model.apply(
      {"params": p}, batch["image"], batch["tokens"], train=False))(state.params))
  assert "bf16" in jaxpr
