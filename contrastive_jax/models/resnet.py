"""ResNet v1.5 backbones (He et al., 2016, "Deep Residual Learning", Table 1) without classifier.

v1.5 (the torchvision / NVIDIA variant used by SimCLR, MoCo and solo-learn) puts the stride of a
bottleneck block on its 3x3 convolution instead of the first 1x1. Convolutions are bias-free
and followed by our ``BatchNorm``; paddings are explicit (3 for the 7x7 stem, 1 for 3x3) so
that the spatial alignment matches torchvision rather than XLA's asymmetric "SAME".

Stems: ``"imagenet"`` = 7x7/2 conv + 3x3/2 max-pool (224 px -> 56 px); ``"cifar"`` = 3x3/1 conv
and no pool, so 32 px images stay 32 px through the stem (SimCLR Appendix B.9, CIFAR-10).
``width`` multiplies every channel count, the stem's included (SimCLR's R50 (2x), (4x)).
Output: global-average-pooled features ``[B, F]`` with ``F = 512 * width`` (18/34) or
``2048 * width`` (50/101/152).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from contrastive_jax.models.layers import ConvBNBase

STAGES: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
STEMS = ("imagenet", "cifar")


class Stem(ConvBNBase):
  """``[B, H, W, 3] -> [B, H/4, W/4, C]`` (imagenet) or ``[B, H, W, C]`` (cifar)."""
  features: int = 64
  kind: str = "imagenet"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.kind == "imagenet":
      x = nn.relu(self.bn(train, name="bn")(self.conv(self.features, 7, 2, name="conv")(x)))
      return nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    if self.kind == "cifar":
      return nn.relu(self.bn(train, name="bn")(self.conv(self.features, 3, 1, name="conv")(x)))
    raise ValueError(f"stem={self.kind!r} is unknown; use one of {STEMS}")


class BasicBlock(ConvBNBase):
  """Two 3x3 convolutions; output channels ``features``."""
  features: int = 64
  stride: int = 1
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    y = nn.relu(self.bn(train, name="bn1")(self.conv(self.features, 3, self.stride, "conv1")(x)))
    y = self.bn(train, self.zero_init_residual, "bn2")(self.conv(self.features, 3, 1, "conv2")(y))
    if self.stride != 1 or x.shape[-1] != self.features:
      x = self.bn(train, name="proj_bn")(self.conv(self.features, 1, self.stride, "proj_conv")(x))
    return nn.relu(x + y)


class BottleneckBlock(ConvBNBase):
  """1x1 reduce, 3x3 (carrying the stride: v1.5), 1x1 expand to ``4 * features`` channels."""
  features: int = 64
  stride: int = 1
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    out = 4 * self.features
    y = nn.relu(self.bn(train, name="bn1")(self.conv(self.features, 1, 1, "conv1")(x)))
    y = nn.relu(self.bn(train, name="bn2")(self.conv(self.features, 3, self.stride, "conv2")(y)))
    y = self.bn(train, self.zero_init_residual, "bn3")(self.conv(out, 1, 1, "conv3")(y))
    if self.stride != 1 or x.shape[-1] != out:
      x = self.bn(train, name="proj_bn")(self.conv(out, 1, self.stride, "proj_conv")(x))
    return nn.relu(x + y)


class ResNet(ConvBNBase):
  """ResNet v1.5 encoder: ``[B, H, W, 3] float -> [B, feature_dim]`` in ``dtype``.

  Attributes:
    depth: 18, 34 (basic blocks), 50, 101, 152 (bottleneck blocks).
    width: channel multiplier (stage widths ``64 * width * (1, 2, 4, 8)``).
    stem: ``"imagenet"`` or ``"cifar"`` (see the module docstring).
    zero_init_residual: initialise the last BN scale of every block at 0 so each residual
      block starts as the identity (Goyal et al., 2017).
    bn_groups: per-group ("ghost") BN statistics; 1 = statistics over the whole (global) batch.
    remat: rematerialise each residual block in the backward pass.
  Submodules: ``stem``, ``stage{s}_block{b}`` (s, b from 1).
  """
  depth: int = 50
  width: float = 1
  stem: str = "imagenet"
  zero_init_residual: bool = False
  remat: bool = False

  @property
  def feature_dim(self) -> int:
    kind, _ = self._stages()
    return int(64 * self.width) * 8 * (4 if kind == "bottleneck" else 1)

  def _stages(self) -> tuple[str, tuple[int, ...]]:
    if self.depth not in STAGES:
      raise ValueError(f"ResNet depth={self.depth} is unsupported; use one of {sorted(STAGES)}")
    if self.stem not in STEMS:
      raise ValueError(f"stem={self.stem!r} is unknown; use one of {STEMS}")
    return STAGES[self.depth]

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    kind, sizes = self._stages()
    base = int(64 * self.width)
    if base < 1:
      raise ValueError(f"width={self.width} gives {base} stem channels; use width >= 1/64")
    common = dict(bn_groups=self.bn_groups, bn_momentum=self.bn_momentum, bn_eps=self.bn_eps,
                  dtype=self.dtype, param_dtype=self.param_dtype)
    x = x.astype(self.dtype)
    x = Stem(features=base, kind=self.stem, name="stem", **common)(x, train)
    block_cls = BasicBlock if kind == "basic" else BottleneckBlock
    if self.remat:
      block_cls = nn.remat(block_cls, static_argnums=(2,))  # 2 = `train` (self counts)
    for s, n_blocks in enumerate(sizes):
      for b in range(n_blocks):
        stride = 2 if (s > 0 and b == 0) else 1
        x = block_cls(features=base * 2**s, stride=stride,
                      zero_init_residual=self.zero_init_residual,
                      name=f"stage{s + 1}_block{b + 1}", **common)(x, train)
    # Pool in float32: a bf16 sum over 7x7 (or 32x32) positions loses precision.
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
