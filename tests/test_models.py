"""Tests of contrastive_jax.models: published parameter counts, shapes, BatchNorm (numpy
reference, sync BN on 8 devices, ghost BN), transformer numerics against a float64 numpy
reference, causal mask, bf16, the frozen patch projection, remat, heads, CLIP and the registry.

Everything runs at tiny sizes; the published-size parameter counts use ``jax.eval_shape``.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import erf

from contrastive_jax import distributed, optim
from contrastive_jax import models as M
from contrastive_jax.configs import common


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _images(key, b=4, h=32, w=32, c=3):
  return jax.random.normal(jax.random.key(key), (b, h, w, c), jnp.float32)


def _apply(model, variables, *args, **kwargs):
  return jax.jit(lambda v, *a: model.apply(v, *a, **kwargs))(variables, *args)


def _random_variables(model, *args, seed=0):
  """Variables of ``model`` with random values from numpy, without running ``model.init``.

  Compiling a ResNet's init (one random kernel per parameter shape) costs more than everything
  else on 2 CPU cores; tests of forward/backward numerics need parameters, not flax's init.
  BN statistics start at mean 0, var 1, scales near 1, kernels ~ N(0, 1/fan_in).
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0), *args)
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1].key
    if name == "mean":
      return jnp.zeros(s.shape, s.dtype)
    if name == "var":
      return jnp.ones(s.shape, s.dtype)
    if name == "scale":
      return jnp.asarray(1.0 + 0.1 * rng.normal(size=s.shape), s.dtype)
    if name == "bias":
      return jnp.asarray(0.1 * rng.normal(size=s.shape), s.dtype)
    fan_in = max(1, int(np.prod(s.shape[:-1])))
    return jnp.asarray(rng.normal(size=s.shape) / np.sqrt(fan_in), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


# ----------------------------------------------------------------------------------------------
# Published parameter counts (params only: BN's scale and bias, not batch_stats).


def test_param_counts_match_published_models():
  key = jax.random.key(0)
  img = jnp.zeros((1, 224, 224, 3))
  r50 = jax.eval_shape(M.build_model("resnet50").init, key, img)
  assert _count(r50["params"]) == 23_508_032  # torchvision 25,557,032 minus the 2048x1000 fc
  r18 = jax.eval_shape(M.build_model("resnet18").init, key, img)
  assert _count(r18["params"]) == 11_176_512  # torchvision 11,689,512 minus the 512x1000 fc
  vit = jax.eval_shape(M.build_model("vit_b16").init, key, img)
  assert _count(vit["params"]) == 85_798_656
  clip = M.build_clip_preset("clip_vit_b32")
  v = jax.eval_shape(clip.init, key, img, jnp.zeros((1, 77), jnp.int32))
  assert _count(v["params"]) == 151_277_313
  assert set(v["params"]["image_encoder"]) >= {"ln_pre", "ln_final", "patch_embed"}
  assert "bias" not in v["params"]["image_encoder"]["patch_embed"]


# ----------------------------------------------------------------------------------------------
# Shapes.


@pytest.mark.parametrize("name,kwargs,size,feat", [
    ("convnet", dict(widths=(4, 8, 8, 16)), 28, 16),
    ("resnet18", dict(width=1 / 16, stem="cifar"), 32, 32),
    ("resnet34", dict(width=1 / 16, stem="cifar"), 16, 32),
    ("resnet50", dict(width=1 / 16), 64, 128),
    ("vit", dict(patch_size=8, width=16, depth=1, num_heads=2, pool="gap",
                 posemb="sincos2d"), 32, 16),
])
def test_encoder_output_shapes(name, kwargs, size, feat):
  # Shapes by abstract evaluation (the other tests run these models on real numbers).
  model = M.build_model(name, **kwargs)
  assert M.feature_dim(name, **kwargs) == feat
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  for train in (True, False):
    out, _ = jax.eval_shape(
        lambda x, t=train: model.init_with_output(jax.random.key(0), x, train=t), x)
    assert out.shape == (2, feat) and out.dtype == jnp.float32


@pytest.mark.parametrize("name", ["vit_ti16", "vit_s16", "vit_b16", "vit_b32", "resnet50"])
def test_preset_shapes_via_eval_shape(name):
  model = M.build_model(name)
  out = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0],
                       jnp.zeros((2, 64, 64, 3)))
  assert out.shape == (2, M.feature_dim(name))
  assert M.feature_dim(name) == {"vit_ti16": 192, "vit_s16": 384, "vit_b16": 768,
                                 "vit_b32": 768, "resnet50": 2048}[name]


def test_stems_and_v15_stride_placement():
  def intermediates(model, size):
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    _, v = jax.eval_shape(lambda x: model.init_with_output(
        jax.random.key(0), x, capture_intermediates=True), x)
    return v["intermediates"], v["params"]

  inter, _ = intermediates(M.build_model("resnet18", width=1 / 16, stem="cifar"), 32)
  assert inter["stem"]["__call__"][0].shape == (2, 32, 32, 4)  # no downsampling in the stem

  inter, params = intermediates(M.build_model("resnet50", width=1 / 16), 64)
  assert inter["stem"]["__call__"][0].shape == (2, 16, 16, 4)  # 7x7/2 conv + 3x3/2 max-pool
  blk = inter["stage2_block1"]
  # ResNet v1.5: the first 1x1 keeps the resolution, the 3x3 carries the stride.
  assert blk["conv1"]["__call__"][0].shape == (2, 16, 16, 8)
  assert blk["conv2"]["__call__"][0].shape == (2, 8, 8, 8)
  assert blk["__call__"][0].shape == (2, 8, 8, 32)
  assert params["stage4_block1"]["conv2"]["kernel"].shape == (3, 3, 32, 32)


def test_zero_init_residual():
  # Block level: a whole ResNet's init takes long to compile on 2 cores; ResNet forwards the flag.
  # An "rbg" key compiles its random kernels several times faster than threefry.
  from contrastive_jax.models.resnet import BasicBlock, BottleneckBlock
  x = _images(4, 2, 4, 4, c=8)
  for cls, last in ((BasicBlock, "bn2"), (BottleneckBlock, "bn3")):
    block = cls(features=8, stride=2, zero_init_residual=True)
    variables = block.init(jax.random.key(0, impl="rbg"), x)
    params = variables["params"]
    np.testing.assert_array_equal(params[last]["scale"], 0.0)
    np.testing.assert_array_equal(params["bn1"]["scale"], 1.0)
    assert "proj_conv" in params  # stride 2: projection shortcut
    # The residual branch is off: output = relu(BN(proj(x))), with the init statistics (eval).
    out = block.apply(variables, x, train=False)
    kernel = np.asarray(params["proj_conv"]["kernel"], np.float64)[0, 0]  # [Cin, Cout]
    sc = np.asarray(x, np.float64)[:, ::2, ::2] @ kernel
    np.testing.assert_allclose(out, np.maximum(sc / np.sqrt(1 + 1e-5), 0), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# BatchNorm against a float64 numpy reference (Ioffe & Szegedy 2015, Alg. 1).


def _np_bn(x, scale, bias, groups, eps=1e-5):
  g = x.reshape((groups, x.shape[0] // groups) + x.shape[1:])
  axes = tuple(range(1, g.ndim - 1))
  mean = g.mean(axis=axes, keepdims=True)
  var = ((g - mean) ** 2).mean(axis=axes, keepdims=True)
  y = ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias
  c = x.shape[-1]
  return y, mean.reshape(groups, c).mean(0), var.reshape(groups, c).mean(0)


@pytest.mark.parametrize("groups", [1, 4])
def test_batchnorm_matches_numpy(groups):
  rng = np.random.default_rng(0)
  x = rng.normal(2.0, 3.0, (8, 3, 3, 5))
  bn = M.BatchNorm(bn_groups=groups)
  v = bn.init(jax.random.key(0), jnp.asarray(x, jnp.float32), use_running_average=False)
  np.testing.assert_array_equal(v["batch_stats"]["mean"], 0.0)  # init does not update stats
  scale, bias = rng.normal(size=5), rng.normal(size=5)
  stats0_mean, stats0_var = rng.normal(size=5), rng.uniform(0.5, 2.0, 5)
  v = {"params": {"scale": jnp.asarray(scale, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)},
       "batch_stats": {"mean": jnp.asarray(stats0_mean, jnp.float32),
                       "var": jnp.asarray(stats0_var, jnp.float32)}}
  y, new = bn.apply(v, jnp.asarray(x, jnp.float32), use_running_average=False,
                    mutable=["batch_stats"])
  ry, rmean, rvar = _np_bn(x, scale, bias, groups)
  np.testing.assert_allclose(y, ry, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(new["batch_stats"]["mean"], 0.9 * stats0_mean + 0.1 * rmean,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new["batch_stats"]["var"], 0.9 * stats0_var + 0.1 * rvar,
                             rtol=1e-5, atol=1e-5)
  y_eval = bn.apply(v, jnp.asarray(x, jnp.float32), use_running_average=True)
  np.testing.assert_allclose(
      y_eval, (x - stats0_mean) / np.sqrt(stats0_var + 1e-5) * scale + bias, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="bn_groups"):
    M.BatchNorm(bn_groups=3).init(jax.random.key(0), jnp.zeros((8, 5)), use_running_average=False)


def test_batchnorm_bf16_keeps_float32_stats_and_no_affine_option():
  x = jnp.asarray(np.random.default_rng(1).normal(5.0, 2.0, (16, 4)), jnp.bfloat16)
  bn = M.BatchNorm(use_scale=False, use_bias=False, dtype=jnp.bfloat16)
  v = bn.init(jax.random.key(0), x, use_running_average=False)
  assert "params" not in v
  y, new = bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
  assert y.dtype == jnp.bfloat16 and new["batch_stats"]["mean"].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y, np.float32).mean(0), 0.0, atol=0.02)


# ----------------------------------------------------------------------------------------------
# Sync BN and ghost BN on 8 simulated devices.


class _EncoderWithHead(nn.Module):
  bn_groups: int = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = M.ConvNet(widths=(4, 8), strides=(1, 2), bn_groups=self.bn_groups, name="enc")(x, train)
    return M.ProjectionMLP(8, 4, num_layers=2, last_bn=True, bn_groups=self.bn_groups,
                           name="head")(h, train)


def _train_apply(model):
  return jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))


def test_sync_bn_and_ghost_bn_on_8_devices():
  mesh = distributed.make_mesh(8)
  x = _images(5, 16, 8, 8) * 2.0 + 1.0
  plain = _EncoderWithHead()
  variables = _random_variables(plain, x)
  x_sharded = jax.device_put(x, distributed.data_sharding(mesh))
  v_repl = jax.device_put(variables, distributed.replicated(mesh))
  dev0 = jax.devices()[0]

  # Sync BN: the sharded global-view computation equals one device on the whole batch.
  plain_step = _train_apply(plain)
  out_s, st_s = plain_step(v_repl, x_sharded)
  out_1, st_1 = plain_step(jax.device_put(variables, dev0), jax.device_put(x, dev0))
  assert len(out_s.sharding.device_set) == 8
  np.testing.assert_allclose(out_s, out_1, rtol=1e-4, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), st_s, st_1)

  # Ghost BN: equals plain BN run separately on each device's slice, stats averaged.
  out_g, st_g = _train_apply(_EncoderWithHead(bn_groups=8))(v_repl, x_sharded)
  outs, stats = [], []
  for i in range(8):
    o, s = plain_step(jax.device_put(variables, dev0), jax.device_put(x[2 * i:2 * i + 2], dev0))
    outs.append(o)
    stats.append(s)
  np.testing.assert_allclose(out_g, np.concatenate(outs), rtol=1e-4, atol=1e-5)
  mean_stats = jax.tree.map(lambda *a: np.mean(np.stack(a), 0), *stats)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               st_g, mean_stats)
  assert not np.allclose(out_g, out_s, atol=1e-3)  # per-device statistics really differ


# ----------------------------------------------------------------------------------------------
# Transformers against a float64 numpy reference.


def _np_ln(x, p, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_gelu(x):
  return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _np_blocks(x, tp, heads, causal, eps):
  b, length, width = x.shape
  dh = width // heads
  for i in range(len(tp)):
    p = tp[f"block{i}"]
    y = _np_ln(x, p["ln1"], eps)
    qkv = (y @ p["attn"]["qkv"]["kernel"] + p["attn"]["qkv"]["bias"]).reshape(
        b, length, 3, heads, dh)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
    if causal:
      logits = np.where(np.tril(np.ones((length, length), bool)), logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    att = np.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, length, width)
    x = x + att @ p["attn"]["out"]["kernel"] + p["attn"]["out"]["bias"]
    y = _np_ln(x, p["ln2"], eps)
    m = p["mlp"]
    x = x + _np_gelu(y @ m["fc1"]["kernel"] + m["fc1"]["bias"]) @ m["fc2"]["kernel"] + \
        m["fc2"]["bias"]
  return x


TEXT_KW = dict(vocab_size=50, context_length=12, width=16, depth=2, num_heads=2)


def test_text_transformer_matches_numpy_and_pools_first_eot():
  model = M.build_model("clip_text", eot_id=3, **TEXT_KW)
  tokens = np.array(jax.random.randint(jax.random.key(1), (3, 10), 4, 50))
  tokens[0, 4] = 3
  tokens[0, 7] = 3  # pooling takes the FIRST eot
  tokens[1, 9] = 3
  v = _random_variables(model, jnp.asarray(tokens))
  out = _apply(model, v, jnp.asarray(tokens))
  p = _np(v["params"])
  x = p["token_embed"]["embedding"][tokens] + p["pos_embedding"][:10]
  h = _np_ln(_np_blocks(x, p["transformer"], 2, True, 1e-5), p["ln_final"], 1e-5)
  ref = h[np.arange(3), [4, 9, 9]]  # row 2 has no EOT: last position
  np.testing.assert_allclose(out, ref, rtol=2e-4, atol=2e-5)
  # eot_id=None: CLIP's rule, the position of the largest id.
  model_argmax = M.build_model("clip_text", **TEXT_KW)
  out2 = _apply(model_argmax, v, jnp.asarray(tokens))
  np.testing.assert_allclose(out2, h[np.arange(3), tokens.argmax(1)], rtol=2e-4, atol=2e-5)
  with pytest.raises(ValueError, match="context_length"):
    model.apply(v, jnp.zeros((1, 13), jnp.int32))


def test_causal_mask_hides_future_tokens():
  model = M.build_model("clip_text", **TEXT_KW)
  tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, 50)
  v = _random_variables(model, tokens)
  t = 5
  changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 7) % 50)
  f = jax.jit(lambda tok: model.apply(v, tok, method="token_features"))
  h1, h2 = f(tokens), f(changed)
  assert h1.shape == (2, 12, 16)
  np.testing.assert_allclose(h1[:, :t + 1], h2[:, :t + 1], rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(h1[:, t + 1:] - h2[:, t + 1:])).min(axis=-1).max() > 1e-3


def _np_patchify(x, p):
  b, h, w, c = x.shape
  return x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(
      b, (h // p) * (w // p), p * p * c)


def test_vit_matches_numpy_reference():
  model = M.build_model("vit", patch_size=8, width=16, depth=2, num_heads=4)
  x = _images(6, 2, 16, 24)
  v = _random_variables(model, x)
  p = _np(v["params"])
  out = _apply(model, v, x)
  pe = p["patch_embed"]
  tok = _np_patchify(np.asarray(x, np.float64), 8) @ pe["kernel"].reshape(-1, 16) + pe["bias"]
  tok = np.concatenate([np.broadcast_to(p["cls_token"], (2, 1, 16)), tok], 1)
  tok = tok + p["pos_embedding"]
  h = _np_ln(_np_blocks(tok, p["transformer"], 4, False, 1e-6), p["ln_final"], 1e-6)
  np.testing.assert_allclose(out, h[:, 0], rtol=2e-4, atol=2e-5)
  with pytest.raises(ValueError, match="patch_size"):
    model.apply(v, _images(6, 2, 20, 24))


def test_sincos2d_posemb_definition():
  h, w, d = 3, 5, 16
  pe = M.posemb_sincos_2d(h, w, d)
  assert pe.shape == (h * w, d)
  q = d // 4
  for y in range(h):
    for x in range(w):
      for i in range(q):
        om = 1.0 / 10000.0 ** (i / q)
        row = pe[y * w + x]
        np.testing.assert_allclose(
            [row[i], row[q + i], row[2 * q + i], row[3 * q + i]],
            [math.sin(x * om), math.cos(x * om), math.sin(y * om), math.cos(y * om)], atol=1e-6)
  model = M.build_model("vit", patch_size=8, width=16, depth=1, num_heads=2, posemb="sincos2d")
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  assert "pos_embedding" not in params
  with pytest.raises(ValueError, match="divisible by 4"):
    M.posemb_sincos_2d(2, 2, 6)


# ----------------------------------------------------------------------------------------------
# Dtypes, frozen patch projection, remat.


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("name,kwargs", [
    ("vit", dict(patch_size=8, width=32, depth=2, num_heads=4)),
    ("resnet18", dict(width=1 / 16, stem="cifar")),
])
def test_bf16_forward_close_to_float32_with_float32_params(name, kwargs):
  x = _images(7, 4, 16, 16)
  m32 = M.build_model(name, **kwargs)
  m16 = M.build_model(name, dtype=jnp.bfloat16, **kwargs)
  v = _random_variables(m32, x)
  v16 = jax.eval_shape(m16.init, jax.random.key(0), x)
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(v16))
  o32, s32 = _apply(m32, v, x, train=True, mutable=["batch_stats"])
  o16, s16 = _apply(m16, v, x, train=True, mutable=["batch_stats"])
  assert o16.dtype == jnp.bfloat16
  assert _rel_err(o16, o32) < 3e-2
  if s32:
    assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(s16))


def test_frozen_patch_projection_never_updates():
  model = M.build_model("vit", patch_size=8, width=16, depth=1, num_heads=2,
                        freeze_patch_embed=True, posemb="sincos2d")
  x = _images(8, 2, 16, 16)
  params = _random_variables(model, x)["params"]
  assert sorted(params["patch_embed_frozen"]) == ["bias", "kernel"]

  loss = lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)  # noqa: E731
  grads = jax.jit(jax.grad(loss))(params)
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads["patch_embed_frozen"]))

  def step(tx):
    @jax.jit
    def update(grads, params):
      updates, _ = tx.update(grads, tx.init(params), params)
      return optax.apply_updates(params, updates)
    return update(grads, params)

  def unchanged(new):
    return all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(new["patch_embed_frozen"]), jax.tree.leaves(params["patch_embed_frozen"])))

  new = step(optax.sgd(0.1, momentum=0.9))
  assert unchanged(new)
  assert not np.array_equal(new["ln_final"]["scale"], params["ln_final"]["scale"])
  # AdamW's decoupled weight decay moves parameters even with a zero gradient: this is why
  # configs mask frozen parameters out of the optimizer (optim.frozen_patterns).
  assert not unchanged(step(optax.adamw(1e-2, weight_decay=0.1)))
  masked, _ = optim.build_optimizer(
      common.optim_config("adamw", base_lr=1e-2, weight_decay=0.1, schedule="constant",
                          frozen_patterns=("patch_embed_frozen",)),
      global_batch=256, total_steps=1)
  new = step(masked)
  assert unchanged(new)
  assert not np.array_equal(new["transformer"]["block0"]["mlp"]["fc1"]["kernel"],
                            params["transformer"]["block0"]["mlp"]["fc1"]["kernel"])


@pytest.mark.parametrize("name,kwargs,inputs", [
    ("resnet18", dict(width=1 / 16, stem="cifar"), "image"),
    ("convnet", dict(widths=(4, 8), strides=(1, 2)), "image"),
    ("vit", dict(patch_size=8, width=16, depth=2, num_heads=2, dropout_rate=0.1), "image"),
    ("clip_text", TEXT_KW, "text"),
])
def test_remat_same_outputs_and_gradients(name, kwargs, inputs):
  x = (_images(9, 2, 16, 16) if inputs == "image"
       else jax.random.randint(jax.random.key(9), (2, 12), 0, 50))
  m0 = M.build_model(name, **kwargs)
  m1 = M.build_model(name, remat=True, **kwargs)
  v = _random_variables(m0, x)
  assert jax.tree.structure(v) == jax.tree.structure(jax.eval_shape(m1.init, jax.random.key(0), x))
  rngs = {"dropout": jax.random.key(3)}

  def loss(model, params):
    out, _ = model.apply({**v, "params": params}, x, train=True, rngs=rngs,
                         mutable=["batch_stats"])
    return jnp.sum(jnp.sin(out)), out

  (_, o0), g0 = jax.jit(jax.value_and_grad(lambda p: loss(m0, p), has_aux=True))(v["params"])
  (_, o1), g1 = jax.jit(jax.value_and_grad(lambda p: loss(m1, p), has_aux=True))(v["params"])
  np.testing.assert_allclose(o1, o0, rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g0)


@pytest.mark.parametrize("name,kwargs,inputs,remat", [
    ("vit", dict(patch_size=8, width=16, depth=3, num_heads=2, ln_pre=True), "image", True),
    ("clip_text", dict(TEXT_KW, depth=3), "text", False),
])
def test_scan_over_blocks_same_outputs_and_gradients(name, kwargs, inputs, remat):
  """``scan=True`` with the unrolled model's weights stacked by ``stack_blocks``: the same
  outputs and gradients, and ``unstack_blocks`` maps the gradients back block by block."""
  from contrastive_jax.models.layers import stack_blocks, unstack_blocks
  x = (_images(9, 2, 16, 16) if inputs == "image"
       else jax.random.randint(jax.random.key(9), (2, 12), 0, 50))
  m0 = M.build_model(name, remat=remat, **kwargs)
  m1 = M.build_model(name, remat=remat, scan=True, **kwargs)
  p0 = _random_variables(m0, x)["params"]
  p1 = dict(p0, transformer=stack_blocks(p0["transformer"], 3))
  assert (jax.tree.map(np.shape, p1)
          == jax.tree.map(np.shape, jax.eval_shape(m1.init, jax.random.key(0), x)["params"]))
  np.testing.assert_array_equal(p1["transformer"]["blocks"]["block"]["mlp"]["fc1"]["kernel"][2],
                                p0["transformer"]["block2"]["mlp"]["fc1"]["kernel"])
  readout = jax.random.normal(jax.random.key(4), (m0.feature_dim,))

  def loss(model, params):
    out = model.apply({"params": params}, x)
    return jnp.sum(jnp.sin(out @ readout)), out

  (_, o0), g0 = jax.jit(jax.value_and_grad(lambda p: loss(m0, p), has_aux=True))(p0)
  (_, o1), g1 = jax.jit(jax.value_and_grad(lambda p: loss(m1, p), has_aux=True))(p1)
  np.testing.assert_allclose(o1, o0, rtol=1e-5, atol=1e-5)
  g1 = dict(g1, transformer=unstack_blocks(g1["transformer"]))
  assert jax.tree.structure(g1) == jax.tree.structure(g0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g1, g0)
  with pytest.raises(ValueError, match="depth"):
    stack_blocks(p0["transformer"], 2)


# ----------------------------------------------------------------------------------------------
# Heads, CLIP, registry.


def test_heads_recipes_structure_and_shapes():
  x = jax.random.normal(jax.random.key(10), (8, 6))

  def init(head):
    v = _random_variables(head, x)
    out, _ = _apply(head, v, x, train=True, mutable=["batch_stats"])
    return v, out

  v, out = init(M.simclr_head(version=1, hidden_dim=12, out_dim=5))
  assert out.shape == (8, 5)
  assert set(v["params"]) == {"dense1", "bn1", "dense2"}
  assert "bias" not in v["params"]["dense1"] and "bias" in v["params"]["dense2"]

  v, _ = init(M.simclr_head(version=2, hidden_dim=12, out_dim=5))
  assert set(v["params"]["bn3"]) == {"scale"} and "bias" not in v["params"]["dense3"]

  v, out = init(M.mocov2_head(hidden_dim=12, out_dim=5))
  assert "batch_stats" not in v and set(v["params"]) == {"dense1", "dense2"}
  assert all("bias" in v["params"][k] for k in v["params"])
  # No BN: a plain Dense-ReLU-Dense, checked against numpy.
  p = _np(v["params"])
  ref = np.maximum(np.asarray(x, np.float64) @ p["dense1"]["kernel"] + p["dense1"]["bias"], 0)
  ref = ref @ p["dense2"]["kernel"] + p["dense2"]["bias"]
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)

  v, out = init(M.mocov3_projector(num_layers=3, hidden_dim=12, out_dim=5))
  assert "bn3" not in v["params"] and "bn3" in v["batch_stats"]  # last BN has no affine
  assert all("bias" not in v["params"][f"dense{i}"] for i in (1, 2, 3))
  # Last BN without affine: each output column has batch mean 0 and variance ~1.
  np.testing.assert_allclose(np.asarray(out).mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out).var(0), 1.0, atol=1e-3)

  v, out = init(M.mocov3_predictor(hidden_dim=12, out_dim=5))
  assert set(v["params"]) == {"dense1", "bn1", "dense2"}
  assert "bias" not in v["params"]["dense2"] and out.shape == (8, 5)


@pytest.mark.parametrize("siglip", [False, True])
def test_clip_contract(siglip):
  clip = M.build_clip("vit", image_kwargs=dict(patch_size=8, width=16, depth=1, num_heads=2,
                                               ln_pre=True),
                      text_kwargs=dict(TEXT_KW, depth=1), embed_dim=8, siglip=siglip)
  # Initial values of the temperature (and bias): init only the parameters made in setup().
  init = clip.init(jax.random.key(0), method=lambda m: (m.logit_scale, m.logit_bias) if siglip
                   else m.logit_scale)["params"]
  if siglip:
    np.testing.assert_allclose(init["logit_scale"], math.log(10.0), rtol=1e-6)
    np.testing.assert_allclose(init["logit_bias"], -10.0)
  else:
    np.testing.assert_allclose(init["logit_scale"], math.log(1 / 0.07), rtol=1e-6)
    assert set(init) == {"logit_scale"}
  images = _images(11, 3, 16, 16)
  tokens = jax.random.randint(jax.random.key(11), (3, 12), 0, 50)
  v = _random_variables(clip, images, tokens)
  assert "bias" not in v["params"]["image_proj"] and "bias" not in v["params"]["text_proj"]
  assert ("logit_bias" in v["params"]) == siglip
  tower = M.build_model("vit", patch_size=8, width=16, depth=1, num_heads=2, ln_pre=True)

  @jax.jit
  def parts(v):
    out = clip.apply(v, images, tokens)
    zimg = clip.apply(v, images, train=False, method="encode_image")
    ztxt = clip.apply(v, tokens, train=False, method="encode_text")
    feats = tower.apply({"params": v["params"]["image_encoder"]}, images)
    return out, zimg, ztxt, feats

  out, zimg, ztxt, feats = parts(v)
  assert out["zimg"].shape == (3, 8) and out["ztxt"].shape == (3, 8)
  np.testing.assert_allclose(np.linalg.norm(out["zimg"], axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(out["ztxt"], axis=-1), 1.0, rtol=1e-5)
  assert out["logit_scale"].shape == () and ("logit_bias" in out) == siglip
  np.testing.assert_allclose(out["logit_scale"], v["params"]["logit_scale"])
  np.testing.assert_allclose(zimg, out["zimg"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ztxt, out["ztxt"], rtol=1e-6, atol=1e-6)
  # The image embedding is the normalised, bias-free projection of the image tower's features.
  proj = np.asarray(feats, np.float64) @ np.asarray(v["params"]["image_proj"]["kernel"])
  np.testing.assert_allclose(zimg, proj / np.linalg.norm(proj, axis=-1, keepdims=True),
                             rtol=1e-5, atol=1e-6)


def test_clip_with_resnet_tower():
  clip = M.build_clip("resnet18", image_kwargs=dict(width=1 / 16, stem="cifar"),
                      text_kwargs=dict(TEXT_KW, depth=1), embed_dim=8)
  images = _images(12, 2, 16, 16)
  tokens = jax.random.randint(jax.random.key(12), (2, 12), 0, 50)
  v = jax.eval_shape(clip.init, jax.random.key(0), images, tokens)
  assert "batch_stats" in v
  out, _ = jax.eval_shape(lambda v: clip.apply(v, images, tokens, train=True,
                                               mutable=["batch_stats"]), v)
  assert out["zimg"].shape == (2, 8)


def test_registry_errors_and_names():
  with pytest.raises(ValueError, match="resnet50"):
    M.build_model("resnet51")
  with pytest.raises(ValueError, match="widht"):
    M.build_model("resnet18", widht=2)
  with pytest.raises(ValueError, match="depth"):
    M.build_model("resnet18", depth=50)
  with pytest.raises(ValueError, match="stem"):
    M.build_model("resnet18", stem="tiny").init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  for name in ("convnet", "resnet18", "resnet34", "resnet50", "vit_ti16", "vit_s16", "vit_b16",
               "vit_b32", "vit", "clip_text"):
    assert name in M.MODEL_NAMES
  assert M.feature_dim("resnet50", width=2) == 4096
  assert M.feature_dim("resnet18", width=2) == 1024
  assert M.feature_dim("vit_b16", width=32) == 32
  assert M.feature_dim("convnet") == 256
