"""Contrastive methods on one surface (see ``base.py``); ``build_method`` picks one by name."""

from __future__ import annotations

import ml_collections
from jax.sharding import Mesh

from contrastive_jax.methods.base import Method
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
