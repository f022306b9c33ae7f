"""CLIP / SigLIP two-tower model (Radford et al., 2021, Fig. 3; Zhai et al., 2023, Alg. 1).

An image encoder (any registry encoder: ViT or ResNet, ``[B, H, W, 3] -> [B, F]``) and a text
encoder (``TextTransformer``, ``[B, L] -> [B, W]``), each followed by a bias-free linear
projection to ``embed_dim`` and L2 normalisation, plus the learned log temperature:

* CLIP: ``logit_scale = log(1 / 0.07)`` at init; logits are ``exp(logit_scale) zimg ztxt^T``
  (the method clips ``logit_scale`` at ``log(100)``, CLIP Sec. 2.5: "clipped to prevent scaling
  the logits by more than 100").
* SigLIP (``siglip=True``): ``logit_scale = log(10)``, learned ``logit_bias = -10``.

Output contract of ``__call__`` (what losses and evaluators read; they never reach inside):
``{"zimg": [B, E] float32 L2-normalised, "ztxt": [B, E] float32 L2-normalised,
"logit_scale": [] (the log-scale parameter, not its exp), "logit_bias": [] (SigLIP only)}``.
``encode_image`` / ``encode_text`` return the normalised embeddings of one tower, via
``model.apply(variables, x, train, method="encode_image")``.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from contrastive_jax.losses import l2_normalize

Dtype = Any


class CLIP(nn.Module):
  """Two towers and their projections.

  Attributes:
    image_encoder: ``__call__(images, train) -> [B, F]`` module (adopted as a child of that name).
    text_encoder: ``__call__(tokens, train) -> [B, W]`` module.
    embed_dim: E, the joint embedding size.
    siglip: SigLIP initialisation and a learned ``logit_bias``.
    logit_scale_init / logit_bias_init: override the defaults above.
    lock_image: LiT (Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text
      Tuning"): the image tower and projection run in inference mode under ``stop_gradient``.
    dtype, param_dtype: of the projections (the towers carry their own).
  """
  image_encoder: nn.Module
  text_encoder: nn.Module
  embed_dim: int = 512
  siglip: bool = False
  logit_scale_init: float | None = None
  logit_bias_init: float | None = None
  lock_image: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    scale = self.logit_scale_init
    if scale is None:
      scale = math.log(10.0) if self.siglip else math.log(1 / 0.07)
    # CLIP initialises its projections with std width^-0.5; `lecun_normal` is that for a Dense.
    proj = lambda: nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype,  # noqa: E731
                            param_dtype=self.param_dtype,
                            kernel_init=nn.initializers.lecun_normal())
    self.image_proj = proj()
    self.text_proj = proj()
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(scale), (),
                                  self.param_dtype)
    if self.siglip:
      bias = -10.0 if self.logit_bias_init is None else self.logit_bias_init
      self.logit_bias = self.param("logit_bias", nn.initializers.constant(bias), (),
                                   self.param_dtype)

  def encode_image(self, images: jax.Array, train: bool = False) -> jax.Array:
    """``[B, H, W, 3] float -> [B, E] float32``, L2-normalised."""
    if self.lock_image:  # LiT: inference mode (BN statistics fixed, no dropout), no gradient
      z = self.image_proj(self.image_encoder(images, False))
      return l2_normalize(jax.lax.stop_gradient(z))
    return l2_normalize(self.image_proj(self.image_encoder(images, train)))

  def encode_text(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    """``[B, L] int -> [B, E] float32``, L2-normalised."""
    return l2_normalize(self.text_proj(self.text_encoder(tokens, train)))

  def __call__(self, images: jax.Array, tokens: jax.Array,
               train: bool = False) -> dict[str, jax.Array]:
    out = {"zimg": self.encode_image(images, train), "ztxt": self.encode_text(tokens, train),
           "logit_scale": self.logit_scale.astype(jnp.float32)}
    if self.siglip:
      out["logit_bias"] = self.logit_bias.astype(jnp.float32)
    return out
