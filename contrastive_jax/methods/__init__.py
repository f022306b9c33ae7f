"""Contrastive methods on one surface (see ``base.py``); ``build_method`` picks one by name,
``check_config`` checks its keys before anything is compiled."""

from __future__ import annotations

import ml_collections
from jax.sharding import Mesh

from contrastive_jax import grad_cache
from contrastive_jax.errors import ConfigError, require, require_one_of
from contrastive_jax.methods.base import DTYPES, Method
from contrastive_jax.methods.clip import CLIP
from contrastive_jax.methods.moco import MoCoV2, MoCoV3
from contrastive_jax.methods.simclr import SimCLR

METHODS = {"simclr": SimCLR, "mocov2": MoCoV2, "mocov3": MoCoV3, "clip": CLIP, "siglip": CLIP}


def build_method(config: ml_collections.ConfigDict, mesh: Mesh) -> Method:
  """The method named by ``config.method``, bound to the config and the device mesh."""
  if config.method not in METHODS:
    raise ValueError(f"config.method={config.method!r} is unknown; known methods are "
                     f"{sorted(METHODS)}")
  return METHODS[config.method](config, mesh)


def check_config(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  """``config.method``, ``config.loss.temperature``, ``config.dtype`` and
  ``config.grad_cache.micro_batches``, then the method's own checks (queue size, momentum,
  negatives, gradient caching on this mesh) by building it; a ``ConfigError`` naming the key.

  Call it after the other sections are checked (``runs.check_config``): building the method
  reads the global batch and the run length."""
  require_one_of("method", config.method, sorted(METHODS))
  if "loss" in config and "temperature" in config.loss:
    t = config.loss.temperature
    require(isinstance(t, (int, float)) and t > 0,
            f"config.loss.temperature={t} must be positive (SimCLR 0.1-0.5, MoCo 0.2)")
  require_one_of("dtype", config.dtype, sorted(DTYPES))
  try:
    grad_cache.micro_batches(config)
    build_method(config, mesh)
  except ConfigError:
    raise
  except ValueError as error:
    raise ConfigError(str(error)) from None
