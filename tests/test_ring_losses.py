"""Ring losses equal the all-gather losses (values, gradients, metrics) and bound the memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax import distributed, losses
import loss_reference as ref


def _ring(name, mesh, **kwargs):
  """The ring loss ``name`` on global arrays, as the trainer builds it (``losses.sharded`` of
  ``losses.get_loss(name, "ring")``)."""
  return losses.sharded(losses.get_loss(name, "ring"), mesh, **kwargs)


N, D = 16, 8

# name -> (loss name, float64 reference, scalar arguments, indices of args to differentiate)
CASES = {
    "nt_xent_t0.33": ("nt_xent", ref.nt_xent, (0.33,), (0, 1, 2)),
    "nt_xent_t0.07": ("nt_xent", ref.nt_xent, (0.07,), (0, 1, 2)),
    "clip_s3.7": ("clip", ref.clip_loss, (3.7,), (0, 1, 2)),
    "clip_s14.3": ("clip", ref.clip_loss, (14.3,), (0, 1, 2)),
    "moco_v3_t0.07": ("moco_v3", ref.moco_v3_loss, (0.07,), (0, 2)),
    "moco_v3_t0.33": ("moco_v3", ref.moco_v3_loss, (0.33,), (0, 2)),
    "siglip_s3.7_b1.3": ("siglip", ref.siglip_loss, (3.7, 1.3), (0, 1, 2, 3)),
    "siglip_s10_b-10": ("siglip", ref.siglip_loss, (10.0, -10.0), (0, 1, 2, 3)),
}
BASE = ["nt_xent_t0.33", "clip_s3.7", "moco_v3_t0.07", "siglip_s3.7_b1.3"]


def _inputs(seed, tie_device=None, num_devices=8):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(N, D))
  b = a + 0.8 * rng.normal(size=(N, D))
  if tie_device is not None:   # every row of one device identical: argmax ties inside a block
    n = N // num_devices
    rows = slice(tie_device * n, (tie_device + 1) * n)
    a[rows], b[rows] = a[tie_device * n], b[tie_device * n]
  return a, b


def _f32(args):
  return [jnp.asarray(x, jnp.float32) for x in args]


def _compare(case, num_devices, a, b):
  name, ref_fn, scalars, grad_idx = CASES[case]
  mesh = distributed.make_mesh(num_devices)
  args = _f32((a, b) + scalars)
  results = []
  for fn in (losses.sharded(losses.LOSSES[name], mesh, return_metrics=True),
             _ring(name, mesh, return_metrics=True)):
    step = jax.jit(jax.value_and_grad(lambda *x, fn=fn: fn(*x), argnums=grad_idx, has_aux=True))
    results.append(step(*args))
  ((v_ag, m_ag), g_ag), ((v_ring, m_ring), g_ring) = results

  want_loss, want_acc = ref_fn(a, b, *scalars)
  assert v_ring.dtype == jnp.float32
  np.testing.assert_allclose(float(v_ring), float(v_ag), rtol=1e-5, err_msg=case)
  np.testing.assert_allclose(float(v_ring), want_loss, rtol=1e-5, err_msg=case)
  for key in m_ag:
    assert float(m_ring[key]) == float(m_ag[key]), (case, key)
  np.testing.assert_allclose(float(m_ring["accuracy"]), want_acc, atol=1e-6, err_msg=case)
  for i, got, want in zip(grad_idx, g_ring, g_ag):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.all(np.isfinite(got)), (case, i)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * max(np.max(np.abs(want)), 1e-12),
                               err_msg=f"{case}: d/d arg {i}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_ring_equals_all_gather_on_8_devices(case):
  _compare(case, 8, *_inputs(0))


@pytest.mark.parametrize("num_devices", [1, 2])
@pytest.mark.parametrize("case", BASE)
def test_ring_equals_all_gather_on_short_rings(case, num_devices):
  _compare(case, num_devices, *_inputs(1))


@pytest.mark.parametrize("case", BASE)
def test_ties_inside_one_device_block(case):
  """All rows of device 5 equal: argmax must pick the first maximal global column, as the
  all-gather loss and the float64 reference do (only that device's first row is a hit)."""
  _compare(case, 8, *_inputs(2, tie_device=5))


def test_gradient_reference_float64():
  """The ring gradient against central differences of the paper's formula (not our code)."""
  a, b = _inputs(3)
  mesh = distributed.make_mesh(8)
  for name, ref_fn, scalars in [("nt_xent", ref.nt_xent, (0.33,)),
                                ("siglip", ref.siglip_loss, (3.7, 1.3))]:
    fn = _ring(name, mesh)
    args = (a, b) + scalars
    grads = jax.jit(jax.grad(lambda *x, fn=fn: fn(*x), argnums=(0, 2)))(*_f32(args))
    for g, i in zip(grads, (0, 2)):
      want = np.asarray(ref.numerical_grad(lambda *x: ref_fn(*x)[0], args, i))
      np.testing.assert_allclose(np.asarray(g, np.float64), want, rtol=1e-4,
                                 atol=1e-5 * np.max(np.abs(want)), err_msg=f"{name} arg {i}")


def test_moco_v3_keys_get_no_gradient():
  a, b = _f32(_inputs(4))
  fn = _ring("moco_v3", distributed.make_mesh(8))
  g_k = jax.jit(jax.grad(lambda q, k: fn(q, k, 0.2), argnums=1))(a, b)
  assert np.all(np.asarray(g_k) == 0.0)


@pytest.mark.parametrize("case", BASE)
def test_bf16_inputs_give_float32_loss(case):
  name, _, scalars, _ = CASES[case]
  a, b = _inputs(5)
  fn = losses.get_loss(name, "ring")
  bf16 = [jnp.asarray(x, jnp.bfloat16) for x in (a, b)]
  rounded = _f32([np.asarray(x, np.float64) for x in bf16])
  got = fn(*bf16, *scalars)                         # axis_name=None: the ring of length one
  assert got.dtype == jnp.float32 and np.isfinite(float(got))
  np.testing.assert_allclose(float(got), float(losses.LOSSES[name](*rounded, *scalars)),
                             rtol=1e-5)


def _temp_bytes(fn, mesh, n_local, scalars):
  x = jax.ShapeDtypeStruct((mesh.size * n_local, 128), jnp.float32,
                           sharding=distributed.data_sharding(mesh))
  step = jax.jit(jax.value_and_grad(lambda a, b: fn(a, b, *scalars), argnums=(0, 1)))
  return step.lower(x, x).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("name, scalars, views", [
    ("nt_xent", (0.1,), 2), ("clip", (10.0,), 1), ("moco_v3", (0.2,), 1),
    ("siglip", (10.0, -10.0), 1)])
def test_ring_temp_memory_is_per_block(name, scalars, views):
  """Compile only. At 8 x 2048 rows the all-gather needs [n, N] logits; the ring needs fewer
  than two [n, n] blocks (a quarter of the logits, with n = N / 8) at any time."""
  n = 2048
  mesh = distributed.make_mesh(8)
  ring = _temp_bytes(_ring(name, mesh), mesh, n, scalars)
  gather = _temp_bytes(losses.sharded(losses.LOSSES[name], mesh), mesh, n, scalars)
  logits_bytes = (views * n) * (views * 8 * n) * 4     # one [rows, global columns] float32 matrix
  assert ring * 4 < gather, (ring, gather)
  assert ring < 0.25 * logits_bytes, (ring, logits_bytes)
  # Fixed local batch, 4x the global batch: the ring's memory stays, the all-gather's grows.
  small = distributed.make_mesh(2)
  ring_small = _temp_bytes(_ring(name, small), small, n, scalars)
  gather_small = _temp_bytes(losses.sharded(losses.LOSSES[name], small), small, n, scalars)
  assert ring <= 1.1 * ring_small, (ring, ring_small)
  assert gather > 3 * gather_small, (gather, gather_small)


def test_get_loss_and_errors():
  assert losses.get_loss("clip") is losses.clip_loss
  assert losses.get_loss("clip", "ring") is losses.ring.clip_loss
  assert losses.get_loss("moco", "ring") is losses.moco_loss      # queue: nothing gathered
  with pytest.raises(ValueError, match="loss impl must be one of"):
    losses.get_loss("clip", "ringg")
  with pytest.raises(ValueError, match="unknown loss"):
    losses.get_loss("simclr", "ring")
  a, b = _f32(_inputs(6))
  mesh = distributed.make_mesh(8)
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    _ring("nt_xent", mesh)(a[:12], b[:12], 0.1)
  with pytest.raises(ValueError, match="temperature must be positive"):
    losses.sharded(losses.ring.moco_v3_loss, mesh)(a, b, -0.2)
  with pytest.raises(ValueError, match="logit_bias must be a scalar"):
    losses.ring.siglip_loss(a, b, 10.0, jnp.zeros(3))


# ----------------------------------------------------------------------------- tiles

N_TILED = 8 * 13      # 13 rows per device (26 for NT-Xent): tiles of 4 leave padded rows

# loss name -> (float64 reference, scalar arguments, indices of args to differentiate)
TILED = {
    "nt_xent": (ref.nt_xent, (0.1,), (0, 1, 2)),
    "clip": (ref.clip_loss, (3.7,), (0, 1, 2)),
    "moco_v3": (ref.moco_v3_loss, (0.2,), (0, 2)),
    "siglip": (ref.siglip_loss, (10.0, -10.0), (0, 1, 2, 3)),
}


def _tiled_inputs():
  """Random pairs, except that text / second view 65 is a copy of 69 (device 5, local rows 0
  and 4: different column tiles of 4). Anchor 69's best candidates are then the tied columns
  65 and 69; argmax takes the first, a miss, so taking the last (a hit) changes the accuracy
  (anchor 65 points away, so that its own hit or miss cannot flip the other way)."""
  rng = np.random.default_rng(7)
  a = rng.normal(size=(N_TILED, D))
  b = a + 0.8 * rng.normal(size=(N_TILED, D))
  b[69] = a[69] + 0.1 * rng.normal(size=D)          # a clear best match for anchor 69 ...
  b[65] = b[69]                                     # ... tied with column 65
  a[65] = -a[69]        # anchor 65 far from both: no tie at its maximum to mirror this one
  return a, b


def _run(fn, name):
  _, scalars, grad_idx = TILED[name]
  step = jax.jit(jax.value_and_grad(lambda *x: fn(*x), argnums=grad_idx, has_aux=True))
  return step(*_f32(_tiled_inputs() + scalars))


_UNTILED = {}


def _untiled(name):
  """(ring, all-gather) results on the tiled inputs, computed once per loss."""
  if name not in _UNTILED:
    mesh = distributed.make_mesh(8)
    _UNTILED[name] = tuple(
        _run(losses.sharded(fn, mesh, return_metrics=True), name)
        for fn in (losses.get_loss(name, "ring"), losses.LOSSES[name]))
  return _UNTILED[name]


@pytest.mark.parametrize("name, tile", [
    ("nt_xent", 1), ("nt_xent", 4), ("nt_xent", 13), ("clip", 4), ("clip", 13),
    ("moco_v3", 4), ("moco_v3", 13), ("siglip", 4), ("siglip", 13)])
def test_tiled_ring_equals_ring_and_all_gather(name, tile):
  """Tiles of 1 (NT-Xent: a row's first tile is only itself, all -inf), 4 (several tiles per
  block, padded rows and columns) and 13 = n (one tile per CLIP block, two per NT-Xent block)
  on 8 devices: the loss, the metrics (a tie across tiles included) and the gradients with
  respect to the embeddings and the temperature / scale / bias equal the untiled ring's and
  the all-gather's to float32 rounding (rtol 1e-5), and the float64 reference's value."""
  ref_fn, scalars, grad_idx = TILED[name]
  fn = losses.get_loss(name, "ring", tile=tile)
  (v_tiled, m_tiled), g_tiled = _run(losses.sharded(fn, distributed.make_mesh(8),
                                                    return_metrics=True), name)
  want_loss, want_acc = ref_fn(*_tiled_inputs(), *scalars)
  np.testing.assert_allclose(float(v_tiled), want_loss, rtol=1e-5)
  np.testing.assert_allclose(float(m_tiled["accuracy"]), want_acc, atol=1e-6)
  for (v, m), g in _untiled(name):
    np.testing.assert_allclose(float(v_tiled), float(v), rtol=1e-5)
    for key in m:
      assert float(m_tiled[key]) == float(m[key]), key
    for i, got, want in zip(grad_idx, g_tiled, g):
      got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
      assert np.all(np.isfinite(got)), i
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.max(np.abs(want)),
                                 err_msg=f"d/d arg {i}")


def test_tiled_ring_on_one_device():
  """``axis_name=None`` (the ring of length one) with uneven tiles equals the plain loss."""
  a, b = _f32(_tiled_inputs())
  for name in ("nt_xent", "siglip"):
    _, scalars, _ = TILED[name]
    got = jax.jit(losses.get_loss(name, "ring", tile=30))(a, b, *scalars)
    np.testing.assert_allclose(float(got), float(losses.LOSSES[name](a, b, *scalars)),
                               rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("name, scalars, views", [
    ("nt_xent", (0.1,), 2), ("clip", (10.0,), 1), ("moco_v3", (0.2,), 1),
    ("siglip", (10.0, -10.0), 1)])
def test_tiled_ring_temp_memory_is_linear_in_local_batch(name, scalars, views):
  """Compile only, 8 devices, tiles of 256: doubling the local batch (4,096 -> 8,192 rows) at
  most ~doubles the loss's temporary memory (the untiled ring's [n, n] block quadruples; see
  ``test_ring_temp_memory_is_per_block``), and at 8,192 rows it is under a quarter of one
  [n, n] block of float32 logits ([2n, 2n] for NT-Xent), what the untiled ring holds."""
  mesh = distributed.make_mesh(8)
  fn = losses.sharded(losses.get_loss(name, "ring", tile=256), mesh)
  small, large = (_temp_bytes(fn, mesh, n, scalars) for n in (4096, 8192))
  assert large <= 2.2 * small, (small, large)
  assert large < 0.25 * (views * 8192) ** 2 * 4, large


def test_tile_argument_errors():
  assert losses.get_loss("clip", "ring", tile=0) is losses.ring.clip_loss
  assert losses.get_loss("clip", "ring", tile=None) is losses.ring.clip_loss
  assert losses.get_loss("moco", "ring", tile=256) is losses.moco_loss   # nothing to tile
  with pytest.raises(ValueError, match="applies to the ring loss only"):
    losses.get_loss("clip", "all_gather", tile=256)
  for bad in (-1, 2.5, True, "256"):
    with pytest.raises(ValueError, match="tile must be a positive int"):
      losses.get_loss("clip", "ring", tile=bad)
  a, b = _f32(_inputs(6))
  with pytest.raises(ValueError, match="tile must be a positive int"):
    losses.ring.nt_xent(a, b, 0.1, tile=-4)


def test_config_loss_tile_reaches_the_methods_loss(monkeypatch):
  """``config.loss_tile`` (with ``loss_impl="ring"``) is what the methods' loss tiles by, with
  the same values and gradients as the all-gather loss."""
  import ml_collections

  from contrastive_jax.methods import base

  asked = []
  get_loss = losses.get_loss
  monkeypatch.setattr(losses, "get_loss",
                      lambda name, impl, tile=None, **kw: asked.append((name, impl, tile))
                      or get_loss(name, impl, tile=tile, **kw))
  mesh = distributed.make_mesh()
  rng = np.random.default_rng(0)
  z1, z2 = (jnp.asarray(rng.normal(size=(8 * 6, 16)), jnp.float32) for _ in range(2))
  fns = {}
  for impl, tile in (("all_gather", 0), ("ring", 4)):
    config = ml_collections.ConfigDict(dict(loss_impl=impl, loss_tile=tile))
    loss = base.global_loss(config, "nt_xent", mesh)
    fns[impl] = jax.value_and_grad(lambda a, b, loss=loss: loss(a, b, 0.1)[0], argnums=(0, 1))
  assert asked == [("nt_xent", "all_gather", None), ("nt_xent", "ring", 4)]
  (v_ring, g_ring), (v_all, g_all) = fns["ring"](z1, z2), fns["all_gather"](z1, z2)
  np.testing.assert_allclose(v_ring, v_all, rtol=1e-5)
  for a, b in zip(g_ring, g_all):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
