"""Shared building blocks: BatchNorm (sync or ghost), float32 LayerNorm, pre-LN transformer.

* ``BatchNorm`` (Ioffe & Szegedy, 2015, Alg. 1): ``y = (x - mu_B) / sqrt(var_B + eps) * gamma +
  beta``, running statistics ``r <- m r + (1 - m) s_B``. Under ``jit`` on a batch sharded over the
  ``"data"`` mesh axis, the mean over axis 0 is a global reduction, so the statistics are those of
  the global batch (sync BN, as SimCLR and MoCo v3 use) without any ``axis_name``. With
  ``bn_groups=G`` the batch ``[B, ...]`` is viewed as ``[G, B/G, ...]`` and each contiguous group
  is normalised with its own statistics ("ghost" BN); with the batch sharded over G devices this is
  per-device BN, which MoCo v1/v2's shuffle-BN relies on (He et al., 2020, Sec. 3.3).
* ``LayerNormF32``: LayerNorm (Ba et al., 2016) computed in float32 whatever the compute dtype.
* ``TransformerBlock`` / ``Transformer``: pre-LN residual blocks (Vaswani et al., 2017; the
  pre-LN placement of ViT, Dosovitskiy et al., 2021, Eq. 2-3, and of CLIP's text tower,
  Radford et al., 2021). Attention logits and softmax are computed in float32.
* ``shard_batch``: pins an activation's batch dimension to the ``"data"`` axis of the mesh
  the step is traced under (FSDP runs; ``sharding.activation_mesh``), a no-op otherwise.
* ``FROZEN_SUFFIX``: the name suffix of modules whose parameters must never train (MoCo v3's
  frozen random patch projection); the optimizer masks them by name
  (``optim.frozen_patterns``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# The mesh axis that splits the batch (distributed.DATA_AXIS; models import nothing above them).
BATCH_AXIS = "data"


def shard_batch(x: jax.Array) -> jax.Array:
  """``x`` ``[B, ...]`` constrained to ``P("data")`` (batch split, the rest whole) when traced
  under an abstract mesh with a ``"data"`` axis of size > 1 that divides B; ``x`` unchanged
  otherwise (no mesh: replicated runs, one device, evaluation).

  Why (FSDP): the weights are split over the same devices as the batch, so every matmul of a
  block has two sharded operands. Left to itself, XLA's SPMD partitioner may gather the
  activations over the batch instead of the weights (measured on ViT-bigG/14: ``[6400, 257,
  4992]`` qkv buffers per chip, the whole micro-batch; docs/largest_runs.md). Pinning the
  batch dimension of each block's activations leaves it one choice: gather the weight (ZeRO-3's
  schedule, Rajbhandari et al. 2020, Sec. 5.3), as big_vision and MaxText pin theirs. Values
  and gradients do not change (the transpose constrains the cotangent the same way).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or BATCH_AXIS not in mesh.axis_names:
    return x
  n = mesh.shape[BATCH_AXIS]
  if n == 1 or x.shape[0] % n:
    return x
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(BATCH_AXIS))


# Modules whose name ends with this suffix hold parameters that must never be updated; the
# optimizer keeps them fixed through `optim.frozen_patterns`.
FROZEN_SUFFIX = "_frozen"


class BatchNorm(nn.Module):
  """BatchNorm over all axes but the last, with optional per-group ("ghost") statistics.

  Variables: ``params/scale``, ``params/bias`` ``[C] param_dtype`` (when enabled) and
  ``batch_stats/mean``, ``batch_stats/var`` ``[C] float32``. The running variance is the biased
  (population) variance of the batch, as in flax (PyTorch stores the unbiased one).

  Attributes:
    use_running_average: normalise with the running statistics (eval) instead of the batch's
      (train); may also be given at call time. Models pass ``not train``.
    momentum: running statistics decay ``m`` in ``r <- m r + (1 - m) s``.
    epsilon: added to the variance.
    use_scale, use_bias: learn gamma / beta (MoCo v3's last projector BN has neither).
    scale_init: gamma initialiser (zeros for a zero-init residual branch).
    bn_groups: G; statistics are computed separately over each of the G contiguous groups of the
      batch. The running statistics move towards the mean over groups of the group statistics.
    dtype: output dtype (default: the input's). Statistics and normalisation are float32.
    param_dtype: dtype of gamma and beta.
  """
  use_running_average: bool | None = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  scale_init: Callable[..., jax.Array] = nn.initializers.ones
  bias_init: Callable[..., jax.Array] = nn.initializers.zeros
  bn_groups: int = 1
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    """``x``: ``[B, ..., C]``; returns the same shape in ``dtype`` (or ``x.dtype``)."""
    use_ra = nn.merge_param("use_running_average", self.use_running_average,
                            use_running_average)
    features = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
    xf = x.astype(jnp.float32)
    if use_ra:
      y = (xf - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon)
    else:
      groups = self.bn_groups
      batch = x.shape[0]
      if groups < 1 or batch % groups:
        raise ValueError(
            f"bn_groups={groups} must be >= 1 and divide the batch of {batch}; use a batch that "
            "is a multiple of bn_groups (bn_groups = number of devices for per-device BN)")
      xg = xf.reshape((groups, batch // groups) + x.shape[1:])
      axes = tuple(range(1, xg.ndim - 1))
      mean = jnp.mean(xg, axis=axes, keepdims=True)  # [G, 1, ..., 1, C]
      # Two-pass variance: E[(x - mu)^2] does not cancel catastrophically like E[x^2] - mu^2.
      var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
      y = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * mean.reshape(groups, features).mean(0)
        ra_var.value = m * ra_var.value + (1 - m) * var.reshape(groups, features).mean(0)
    if self.use_scale:
      scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
      y = y * scale.astype(jnp.float32)
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (features,), self.param_dtype)
      y = y + bias.astype(jnp.float32)
    return y.astype(self.dtype or x.dtype)


class LayerNormF32(nn.Module):
  """LayerNorm over the last axis, ``(x - mu) / sqrt(var + eps) * scale + bias``, with the
  statistics and the affine transform in float32 whatever the compute dtype; output in ``dtype``
  (default: the input's). Params ``scale``, ``bias`` ``[C] param_dtype``."""
  epsilon: float = 1e-6
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype or x.dtype)


def quick_gelu(x: jax.Array) -> jax.Array:
  """``x * sigmoid(1.702 x)``: the GELU approximation of the original CLIP models."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": nn.relu,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"activation={name!r} is unknown; use one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


class SelfAttention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (same parameter count as separate).

  Logits ``q k^T / sqrt(d_head)`` and the softmax are float32; the causal mask sets the logits of
  future positions to the float32 minimum (never ``-1e9`` in low precision).
  """
  num_heads: int
  causal: bool = False
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """``x``: ``[B, L, W]`` -> ``[B, L, W]``."""
    b, length, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads={self.num_heads}; "
                       "choose num_heads that divides the width")
    head_dim = width // self.num_heads
    dense = lambda f, name: nn.Dense(  # noqa: E731
        f, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(), name=name)
    qkv = shard_batch(dense(3 * width, "qkv")(x)).reshape(b, length, 3, self.num_heads,
                                                          head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, L, H, Dh]
    q = q * jnp.asarray(1.0 / math.sqrt(head_dim), q.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    if self.causal:
      mask = jnp.tril(jnp.ones((length, length), bool))
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    weights = nn.Dropout(self.dropout_rate)(weights, deterministic=not train)
    out = shard_batch(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, width))
    return shard_batch(dense(width, "out")(out))


class MlpBlock(nn.Module):
  """``Dense(mlp_dim) - activation - dropout - Dense(width)``."""
  mlp_dim: int
  activation: str = "gelu"
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    width = x.shape[-1]
    init = dict(kernel_init=nn.initializers.xavier_uniform(),
                bias_init=nn.initializers.normal(1e-6))
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1",
                 **init)(x)
    x = shard_batch(get_activation(self.activation)(x))
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    return shard_batch(
        nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2", **init)(x))


class TransformerBlock(nn.Module):
  """Pre-LN block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``; ``[B, L, W] -> [B, L, W]``."""
  num_heads: int
  mlp_dim: int
  causal: bool = False
  activation: str = "gelu"
  ln_eps: float = 1e-6
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = shard_batch(x)
    y = LayerNormF32(self.ln_eps, name="ln1", **kw)(x)
    y = SelfAttention(self.num_heads, causal=self.causal,
                      dropout_rate=self.attention_dropout_rate, name="attn", **kw)(y, train)
    x = shard_batch(x + nn.Dropout(self.dropout_rate)(y, deterministic=not train))
    y = LayerNormF32(self.ln_eps, name="ln2", **kw)(x)
    y = MlpBlock(self.mlp_dim, self.activation, self.dropout_rate, name="mlp", **kw)(y, train)
    return shard_batch(x + nn.Dropout(self.dropout_rate)(y, deterministic=not train))


class _ScannedBlock(nn.Module):
  """``TransformerBlock`` in ``nn.scan``'s ``(carry, x) -> (carry, y)`` form; ``train`` is a
  field (not an argument) so that it stays static through the scan and the remat."""
  block: dict[str, Any]
  train: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, _: None) -> tuple[jax.Array, None]:
    return TransformerBlock(**self.block, name="block")(x, self.train), None


class Transformer(nn.Module):
  """``depth`` pre-LN blocks; ``remat`` recomputes each block's activations in the backward pass
  (same parameters, outputs and gradients, less memory).

  ``scan=False``: blocks are modules ``block{i}``, each with its own parameters, unrolled in the
  program. ``scan=True``: one block under ``nn.scan`` (``jax.lax.scan``) over parameters stacked
  on a leading ``[depth]`` axis, module ``blocks/block``: the compiled program holds one block
  instead of ``depth`` (compile time and program size stop growing with depth; 48-block bigG),
  and with ``remat`` the backward pass keeps only each block's input ``[B, L, W]``, as unrolled.
  Outputs and gradients are those of the unrolled model with the same weights;
  ``stack_blocks`` / ``unstack_blocks`` convert the parameters between the two layouts (so a
  checkpoint or converter of one layout serves the other). Optimizers that act per leaf see one
  ``[depth, ...]`` leaf per weight: AdamW and weight decay are unchanged, a per-layer trust
  ratio (LARS) would become per-stack.
  """
  depth: int
  num_heads: int
  mlp_dim: int
  causal: bool = False
  activation: str = "gelu"
  ln_eps: float = 1e-6
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  remat: bool = False
  scan: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    block = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, causal=self.causal,
                 activation=self.activation, ln_eps=self.ln_eps, dropout_rate=self.dropout_rate,
                 attention_dropout_rate=self.attention_dropout_rate, dtype=self.dtype,
                 param_dtype=self.param_dtype)
    if self.scan:
      # prevent_cse=False: inside a scan the loop already keeps XLA from merging the
      # recomputation into the forward pass (flax's advice for remat under scan).
      body = nn.remat(_ScannedBlock, prevent_cse=False) if self.remat else _ScannedBlock
      stack = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True,
                                                                    "dropout": True},
                      length=self.depth)
      x, _ = stack(block, train, name="blocks")(x, None)
      return x
    # static_argnums counts `self`: 2 is `train`, which selects dropout on/off at trace time.
    block_cls = nn.remat(TransformerBlock, static_argnums=(2,)) if self.remat else TransformerBlock
    for i in range(self.depth):
      x = block_cls(**block, name=f"block{i}")(x, train)
    return x


def stack_blocks(params: dict[str, Any], depth: int) -> dict[str, Any]:
  """Parameters of an unrolled ``Transformer`` (``block0`` .. ``block{depth-1}``, any other
  keys kept) -> the ``scan=True`` layout (``blocks/block``, each leaf ``[depth, ...]``)."""
  names = [f"block{i}" for i in range(depth)]
  missing = [n for n in names if n not in params]
  if missing or f"block{depth}" in params:
    raise ValueError(f"stack_blocks(depth={depth}): the parameters have blocks "
                     f"{sorted(k for k in params if k.startswith('block'))}; pass the "
                     "Transformer's own parameters and its depth")
  out = {k: v for k, v in params.items() if k not in names}
  out["blocks"] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs),
                                         *[params[n] for n in names])}
  return out


def unstack_blocks(params: dict[str, Any]) -> dict[str, Any]:
  """Inverse of ``stack_blocks``: ``blocks/block`` leaves ``[depth, ...]`` -> ``block{i}``."""
  if "blocks" not in params:
    raise ValueError("unstack_blocks: no 'blocks' entry; these parameters are not of a "
                     "Transformer built with scan=True")
  out = {k: v for k, v in params.items() if k != "blocks"}
  stacked = params["blocks"]["block"]
  depth = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(depth):
    out[f"block{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return out


# torchvision's init for convolutions: (untruncated) kaiming normal, fan_out, gain sqrt(2).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class ConvBNBase(nn.Module):
  """Fields and helpers shared by the convolutional encoders and their blocks."""
  bn_groups: int = 1
  bn_momentum: float = 0.9
  bn_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def conv(self, features: int, kernel: int, stride: int = 1, name: str | None = None) -> nn.Conv:
    """Bias-free ``kernel x kernel`` convolution with symmetric ``(kernel - 1) / 2`` padding
    (torchvision's alignment, not XLA's asymmetric "SAME" for stride 2)."""
    pad = (kernel - 1) // 2
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
                   use_bias=False, kernel_init=conv_init, dtype=self.dtype,
                   param_dtype=self.param_dtype, name=name)

  def bn(self, train: bool, zero_init: bool = False, name: str | None = None) -> BatchNorm:
    return BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                     epsilon=self.bn_eps, bn_groups=self.bn_groups,
                     scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones,
                     dtype=self.dtype, param_dtype=self.param_dtype, name=name)
