"""Projection and prediction MLPs of the contrastive recipes.

``ProjectionMLP`` stacks ``num_layers - 1`` hidden layers ``Dense(hidden_dim) [- BN] - ReLU`` and a
last ``Dense(out_dim) [- BN]``. A Dense followed by BN has no bias (BN's beta replaces it).
The recipes, each with a factory below:

* SimCLR v1 (Chen et al., 2020a, Sec. 2.1, ``g(h) = W2 ReLU(W1 h)``): ``simclr_head(version=1)``,
  2 layers, ``Dense-BN-ReLU-Dense``.
* SimCLR v2 (Chen et al., 2020b, Sec. 2): ``simclr_head(version=2)``, 3 layers with BN after each,
  the last BN with gamma and no beta as in the official TF code.
* MoCo v2 (Chen et al., 2020c, official code): ``mocov2_head()``, ``Dense(2048)-ReLU-Dense(128)``
  with biases and no BN.
* MoCo v3 projector (Chen et al., 2021, Sec. 3, official code): ``mocov3_projector(num_layers)``,
  bias-free Dense, BN after every layer, the last BN without affine; 3 layers for ViT, 2 for
  ResNet-50 in the official code.
* MoCo v3 predictor: ``mocov3_predictor()``, ``Dense-BN-ReLU-Dense``, bias-free, no last BN.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from contrastive_jax.models.layers import BatchNorm

Dtype = Any


class ProjectionMLP(nn.Module):
  """``[B, D] -> [B, out_dim]`` in ``dtype``.

  Attributes:
    hidden_dim, out_dim, num_layers: sizes (``num_layers=1`` is a linear map).
    use_bn: BN after each hidden Dense.
    last_bn: BN after the last Dense.
    last_bn_affine: the last BN learns gamma and beta (False for MoCo v3).
    last_bn_bias: override for the last BN's beta alone (default ``last_bn_affine``); SimCLR's
      TF code uses a last BN with gamma but no beta.
    hidden_bias / last_bias: Dense biases; default: present only when no BN follows.
    bn_groups, bn_momentum, bn_eps, dtype, param_dtype: as for ``ResNet``.
  Submodules: ``dense{i}``, ``bn{i}`` (i from 1).
  """
  hidden_dim: int
  out_dim: int
  num_layers: int = 2
  use_bn: bool = True
  last_bn: bool = False
  last_bn_affine: bool = True
  last_bn_bias: bool | None = None
  hidden_bias: bool | None = None
  last_bias: bool | None = None
  bn_groups: int = 1
  bn_momentum: float = 0.9
  bn_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _bn(self, train: bool, name: str, scale: bool = True, bias: bool = True) -> BatchNorm:
    return BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                     epsilon=self.bn_eps, use_scale=scale, use_bias=bias,
                     bn_groups=self.bn_groups, dtype=self.dtype, param_dtype=self.param_dtype,
                     name=name)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.num_layers < 1:
      raise ValueError(f"ProjectionMLP num_layers={self.num_layers}; use at least 1")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    hidden_bias = (not self.use_bn) if self.hidden_bias is None else self.hidden_bias
    x = x.astype(self.dtype)
    for i in range(1, self.num_layers):
      x = nn.Dense(self.hidden_dim, use_bias=hidden_bias, name=f"dense{i}", **kw)(x)
      if self.use_bn:
        x = self._bn(train, f"bn{i}")(x)
      x = nn.relu(x)
    n = self.num_layers
    last_bias = (not self.last_bn) if self.last_bias is None else self.last_bias
    x = nn.Dense(self.out_dim, use_bias=last_bias, name=f"dense{n}", **kw)(x)
    if self.last_bn:
      bn_bias = self.last_bn_affine if self.last_bn_bias is None else self.last_bn_bias
      x = self._bn(train, f"bn{n}", scale=self.last_bn_affine, bias=bn_bias)(x)
    return x


def simclr_head(version: int = 2, hidden_dim: int = 2048, out_dim: int = 128,
                **kwargs: Any) -> ProjectionMLP:
  """SimCLR v1 (2 layers, Dense-BN-ReLU-Dense) or v2 (3 layers, BN everywhere, last BN
  with gamma and no beta, as in google-research/simclr ``tf2/model.py``)."""
  if version == 1:
    return ProjectionMLP(hidden_dim, out_dim, num_layers=2, use_bn=True, last_bn=False, **kwargs)
  if version == 2:
    return ProjectionMLP(hidden_dim, out_dim, num_layers=3, use_bn=True, last_bn=True,
                         last_bn_affine=True, last_bn_bias=False, **kwargs)
  raise ValueError(f"SimCLR head version={version}; use 1 or 2")


def mocov2_head(hidden_dim: int = 2048, out_dim: int = 128, **kwargs: Any) -> ProjectionMLP:
  """MoCo v2: ``Dense(2048) - ReLU - Dense(128)`` with biases and no BN."""
  return ProjectionMLP(hidden_dim, out_dim, num_layers=2, use_bn=False, last_bn=False, **kwargs)


def mocov3_projector(num_layers: int = 3, hidden_dim: int = 4096, out_dim: int = 256,
                     **kwargs: Any) -> ProjectionMLP:
  """MoCo v3 projector: bias-free Dense, BN after every layer, last BN without affine."""
  return ProjectionMLP(hidden_dim, out_dim, num_layers=num_layers, use_bn=True, last_bn=True,
                       last_bn_affine=False, **kwargs)


def mocov3_predictor(hidden_dim: int = 4096, out_dim: int = 256, **kwargs: Any) -> ProjectionMLP:
  """MoCo v3 predictor: ``Dense - BN - ReLU - Dense``, bias-free, no last BN."""
  return ProjectionMLP(hidden_dim, out_dim, num_layers=2, use_bn=True, last_bn=False,
                       last_bias=False, **kwargs)
