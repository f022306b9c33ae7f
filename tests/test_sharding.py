"""Placement rules (sharding.py), the ring-ordered mesh, and low-precision optimizer moments."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from contrastive_jax import distributed, optim, sharding
from contrastive_jax.configs import common


@pytest.fixture(scope="module")
def mesh():
  return distributed.make_mesh(8)


def test_fsdp_spec_splits_the_largest_divisible_dimension():
  assert sharding.fsdp_spec((768, 3072), 8) == P(None, "data")
  assert sharding.fsdp_spec((3072, 768), 8) == P("data")
  assert sharding.fsdp_spec((1024, 1024), 8) == P(None, "data")  # tie: the last dimension
  assert sharding.fsdp_spec((14, 14, 3, 1024), 8) == P(None, None, None, "data")
  assert sharding.fsdp_spec((49408, 12), 8) == P("data")
  assert sharding.fsdp_spec((77, 12), 8) == P()                  # nothing divides: replicated
  assert sharding.fsdp_spec((4,), 8) == P()                      # smaller than the axis
  assert sharding.fsdp_spec((), 8) == P()


def _state(tx):
  params = {"enc": {"fc1": {"kernel": jnp.zeros((64, 256)), "bias": jnp.zeros((256,))},
                    "fc2": {"kernel": jnp.zeros((256, 64))}},
            "logit_scale": jnp.zeros(())}
  return {"params": params, "opt_state": tx.init(params), "ema_params": params,
          "queue": jnp.zeros((1024, 16)), "step": jnp.zeros((), jnp.int32)}


def _by_path(tree):
  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, P))
  return {sharding.path_str(p): v for p, v in leaves}


def test_fsdp_strategy_moments_and_ema_follow_their_parameter(mesh):
  tx, _ = optim.build_optimizer(
      common.optim_config("adamw", base_lr=1e-3, weight_decay=0.1), global_batch=8,
      total_steps=10)
  specs = _by_path(sharding.state_specs(_state(tx), {"strategy": "fsdp", "min_size": 1000},
                                        mesh))
  assert specs["params/enc/fc1/kernel"] == P(None, "data")
  assert specs["params/enc/fc2/kernel"] == P("data")
  assert specs["params/enc/fc1/bias"] == P()         # 256 elements < min_size
  assert specs["params/logit_scale"] == P()
  assert specs["queue"] == P("data")
  assert specs["step"] == P()
  for prefix in ("opt_state/0/mu/", "opt_state/0/nu/", "ema_params/"):
    for name in ("enc/fc1/kernel", "enc/fc2/kernel", "enc/fc1/bias"):
      assert specs[prefix + name] == specs["params/" + name], prefix + name
  assert specs["opt_state/0/count"] == P()


def test_replicated_strategy_and_rules_first_match_wins(mesh):
  tx = optax.sgd(0.1, momentum=0.9)
  state = _state(tx)
  specs = _by_path(sharding.state_specs(state, {"strategy": "replicated"}, mesh))
  assert set(specs.values()) == {P()}
  cfg = {"strategy": "fsdp", "min_size": 0,
         "rules": (("fc2", "replicate"), ("fc1/kernel", ("data", None)), ("fc", "fsdp"),
                   ("^queue$", "replicate"))}
  specs = _by_path(sharding.state_specs(state, cfg, mesh))
  assert specs["params/enc/fc2/kernel"] == P()
  assert specs["opt_state/0/trace/enc/fc2/kernel"] == P()   # unanchored: the moment too
  assert specs["params/enc/fc1/kernel"] == P("data", None)
  assert specs["ema_params/enc/fc1/kernel"] == P("data", None)
  assert specs["params/enc/fc1/bias"] == P("data")          # min_size 0: split as well
  assert specs["queue"] == P()


@pytest.mark.parametrize("cfg, match", [
    ({"strategy": "zero3"}, "strategy"),
    ({"strategy": "fsdp", "min_size": -1}, "min_size"),
    ({"strategy": "fsdp", "rules": (("fc(", "fsdp"),)}, "invalid regex"),
    ({"strategy": "fsdp", "rules": (("fc", "shard"),)}, "unknown"),
    ({"strategy": "fsdp", "rules": (("fc", (None, "model")),)}, "mesh axis 'model'"),
    ({"strategy": "fsdp", "rules": ("fc",)}, "pair"),
])
def test_bad_sharding_config_is_rejected_with_the_key(mesh, cfg, match):
  with pytest.raises(ValueError, match=match):
    sharding.resolve_rules(cfg, mesh)


def test_explicit_spec_that_does_not_fit_names_the_leaf(mesh):
  state = {"params": {"w": jnp.zeros((6, 16))}}
  with pytest.raises(ValueError, match="params/w.*not divisible"):
    sharding.state_specs(state, {"rules": (("w", ("data", None)),)}, mesh)
  with pytest.raises(ValueError, match="3 entries"):
    sharding.state_specs(state, {"rules": (("w", (None, None, "data")),)}, mesh)


def test_bytes_per_device_counts_shards(mesh):
  state = {"a": jax.ShapeDtypeStruct((64, 8), jnp.float32),
           "b": jax.ShapeDtypeStruct((3,), jnp.bfloat16)}
  shardings = sharding.state_shardings(state, {"strategy": "fsdp", "min_size": 0}, mesh)
  assert sharding.bytes_per_device(state, shardings) == 64 * 8 * 4 // 8 + 3 * 2


def test_mesh_is_one_data_axis_in_mesh_utils_order():
  from jax.experimental import mesh_utils
  mesh = distributed.make_mesh(8)
  assert mesh.axis_names == ("data",) and mesh.axis_types == (AxisType.Auto,)
  want = mesh_utils.create_device_mesh((8,), jax.devices()[:8])
  assert [d.id for d in mesh.devices.flat] == [d.id for d in want.flat]
  assert distributed.make_mesh(4).devices.shape == (4,)


@pytest.mark.parametrize("name", ["adamw", "sgd", "lars"])
def test_mu_dtype_stores_the_first_moment_in_bf16_params_stay_f32(name):
  cfg = common.optim_config(name, base_lr=0.1, weight_decay=1e-4, mu_dtype="bfloat16")
  tx, _ = optim.build_optimizer(cfg, global_batch=256, total_steps=10)
  ref = common.optim_config(name, base_lr=0.1, weight_decay=1e-4)
  ref_tx, _ = optim.build_optimizer(ref, global_batch=256, total_steps=10)
  params = {"w": jnp.linspace(-1.0, 1.0, 64, dtype=jnp.float32).reshape(8, 8),
            "b": jnp.ones((8,), jnp.float32)}
  grads = jax.tree.map(lambda p: jnp.cos(3.0 * p) * 0.1, params)
  state, ref_state = tx.init(params), ref_tx.init(params)
  p, ref_p = params, params
  for _ in range(3):
    updates, state = tx.update(grads, state, p)
    p = optax.apply_updates(p, updates)
    ref_updates, ref_state = ref_tx.update(grads, ref_state, ref_p)
    ref_p = optax.apply_updates(ref_p, ref_updates)
  first = "mu" if name == "adamw" else "trace"
  moments = [x for path, x in jax.tree_util.tree_leaves_with_path(state)
             if first in sharding.path_str(path).split("/")]
  assert moments and all(m.dtype == jnp.bfloat16 for m in moments)
  if name == "adamw":
    nu = [x for path, x in jax.tree_util.tree_leaves_with_path(state)
          if "nu" in sharding.path_str(path).split("/")]
    assert nu and all(v.dtype == jnp.float32 for v in nu)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(ref_state) if x.ndim)
  # bf16 storage rounds the moment (8-bit mantissa), nothing else: parameters stay close.
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref_p)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-2, atol=2e-3)


def test_unknown_mu_dtype_is_rejected():
  with pytest.raises(ValueError, match="mu_dtype"):
    optim.build_optimizer(common.optim_config("adamw", base_lr=1e-3, mu_dtype="float16"),
                          global_batch=8, total_steps=10)


def test_fsdp_split_covers_dimensions_no_device_count_divides():
  # ViT-bigG on 256 chips: neither 1,664 nor 4,992 is a multiple of 256; both of 128.
  assert sharding.fsdp_split((1664, 4992), 256) == (1, 128)
  assert sharding.fsdp_split((8192, 1664), 256) == (256, 1)        # a divisible one still wins
  assert sharding.fsdp_split((48, 1664, 4992), 256) == (1, 1, 128)  # never the scan's layers
  assert sharding.fsdp_split((1, 257, 1664), 256) == (1, 1, 128)
  assert sharding.fsdp_split((12, 20), 8) == (1, 4)
  assert sharding.fsdp_split((13, 3), 8) == (1, 1)                  # no common factor
  mesh = distributed.make_mesh(8)
  s = sharding.fsdp_sharding((12, 20), mesh)
  assert s.spec == P(None, "data_shard") and s.shard_shape((12, 20)) == (12, 5)
  assert s.mesh.shape["data_replica"] == 2
  # The view is the run's devices in the run's order: shard k lives on the ring's k-th device.
  assert list(s.mesh.devices.flat) == list(mesh.devices.flat)
  assert sharding.fsdp_sharding((16, 12), mesh).spec == P("data")   # the old rule, old mesh


def test_sharding_view_false_keeps_indivisible_leaves_whole(mesh):
  """``config.sharding.view=False``: a leaf no dimension of which 8 divides stays whole (the
  rule before the view), a divisible one is still split 8 ways; a non-bool is refused."""
  state = {"a": np.zeros((12, 20), np.float32), "b": np.zeros((16, 12), np.float32)}
  specs = sharding.state_specs(state, {"strategy": "fsdp", "min_size": 0, "view": False}, mesh)
  assert specs == {"a": P(), "b": P("data")}
  specs = sharding.state_specs(state, {"strategy": "fsdp", "min_size": 0}, mesh)
  assert specs["a"] == P(None, "data_shard")
  with pytest.raises(ValueError, match="sharding.view"):
    sharding.resolve_rules({"strategy": "fsdp", "view": "no"}, mesh)


def test_fsdp_view_steps_equal_replicated_steps(mesh):
  """AdamW steps of a 2-layer MLP whose widths 12 and 20 are not multiples of 8: every leaf
  over min_size is split 4 ways over the factored view, and 3 jitted steps with those shardings
  in and out equal the replicated steps (values, gradients through the SPMD partitioner's
  gathers and reduce-scatters, moments)."""
  rs = np.random.RandomState(0)
  params = {"fc1": {"kernel": rs.randn(12, 20).astype(np.float32) / 4,
                    "bias": np.zeros(20, np.float32)},
            "fc2": {"kernel": rs.randn(20, 12).astype(np.float32) / 5}}
  tx = optax.adamw(1e-2, weight_decay=0.1)
  state = {"params": params, "opt_state": tx.init(params)}
  cfg = {"strategy": "fsdp", "min_size": 64}
  shardings = sharding.state_shardings(state, cfg, mesh)
  for path, s in jax.tree_util.tree_leaves_with_path(shardings):
    shape = np.shape(_by_path(state)[sharding.path_str(path)])
    if int(np.prod(shape)) >= 64:
      assert s.shard_shape(shape) != shape and len(s.device_set) == 8, (path, s)
      assert int(np.prod(s.shard_shape(shape))) * 4 == int(np.prod(shape)), (path, s)
  x = jax.device_put(rs.randn(16, 12).astype(np.float32), distributed.data_sharding(mesh))

  def step(state, x):
    def loss(p):
      h = jnp.tanh(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
      return jnp.mean(jnp.square(h @ p["fc2"]["kernel"] - x))
    value, grads = jax.value_and_grad(loss)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state}, value

  rep = distributed.replicated(mesh)
  fsdp_step = jax.jit(step, in_shardings=(shardings, distributed.data_sharding(mesh)),
                      out_shardings=(shardings, rep))
  rep_step = jax.jit(step)
  a, b = jax.device_put(state, shardings), state
  for _ in range(3):
    a, la = fsdp_step(a, x)
    b, lb = rep_step(b, np.asarray(x))
    np.testing.assert_allclose(la, lb, rtol=1e-6)
  assert a["params"]["fc1"]["kernel"].sharding == shardings["params"]["fc1"]["kernel"]
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-7)


def test_fsdp_splits_every_clip_leaf_when_no_width_divides_the_devices(mesh):
  """The run builder's state for a CLIP whose widths (12, MLP 20, qkv 36, scanned blocks) are
  not multiples of 8: every leaf above min_size, moments included, is split at least 4 ways
  (8 where a dimension allows it). Shapes only, nothing compiled."""
  from test_runs import tiny_config
  from contrastive_jax import runs
  tower = dict(width=12, num_heads=3, mlp_dim=20, scan=True)
  c = tiny_config("clip", "fsdp", **{
      "model.name": "vit", "model.kwargs": dict(patch_size=4, depth=2, pool="gap", **tower),
      "text.kwargs": dict(depth=2, **tower), "clip.embed_dim": 12, "sharding.min_size": 64})
  run = runs.build_run(c, mesh)
  ways = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(run.abstract_state):
    if leaf.size >= 64:
      split = leaf.size // int(np.prod(leaf.sharding.shard_shape(leaf.shape)))
      assert split >= 4, (sharding.path_str(path), leaf.shape, leaf.sharding)
      ways.append(split)
  assert 8 in ways
  qkv = run.abstract_state.params["image_encoder"]["transformer"]["blocks"]["block"]["attn"][
      "qkv"]["kernel"]
  assert qkv.sharding.shard_shape(qkv.shape) == (2, 12, 9)  # never split on the layer axis


def test_fsdp_pins_activations_to_the_batch_and_changes_no_value(mesh):
  """Under FSDP the step is traced under the run's mesh and each transformer block pins its
  activations' batch dimension to "data" (``layers.shard_batch``): the lowered step carries
  the constraints (a replicated run's none), and the loss and gradients of a tiny scanned,
  rematerialised CLIP with GradCache (the bigG path) equal those traced without them."""
  from test_runs import synthetic_batches, tiny_config
  from contrastive_jax import runs
  tower = dict(width=16, num_heads=2, mlp_dim=32, scan=True, remat=True)
  c = tiny_config("clip", "fsdp", **{
      "model.name": "vit", "model.kwargs": dict(patch_size=8, depth=2, pool="cls", **tower),
      "text.kwargs": dict(depth=2, **tower), "clip.embed_dim": 8, "sharding.min_size": 64,
      "grad_cache.micro_batches": 2})
  run = runs.build_run(c, mesh)
  assert sharding.activation_mesh(c.sharding, mesh) is mesh
  assert sharding.activation_mesh({"strategy": "replicated"}, mesh) is None
  assert sharding.activation_mesh(c.sharding, distributed.make_mesh(1)) is None

  def count(step):
    return step.lower(run.abstract_state, run.abstract_batch()).as_text().count(
        "sharding_constraint")
  plain_step = jax.jit(runs.make_train_step(run.method, run.tx, run.lr_schedule),
                       in_shardings=(run.state_sharding, run.batch_sharding))
  # 6 per block in each scanned body (both towers, GradCache's two passes), the towers' ends.
  assert count(run.train_step) >= count(plain_step) + 24

  def grads(state, batch):
    return run.method.value_and_grad(state.params, state, batch, jax.random.key(1))
  shardings = (run.state_sharding, run.batch_sharding)
  pinned = jax.jit(sharding.traced_under(grads, mesh), in_shardings=shardings)
  free = jax.jit(grads, in_shardings=shardings)
  state, batch = run.init_state(), synthetic_batches(run, 1)[0]
  (loss_a, _), grads_a = pinned(state, batch)
  (loss_b, _), grads_b = free(state, batch)
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-5 * float(np.max(np.abs(b))))
