"""Vision Transformer encoder (Dosovitskiy et al., 2021, Eq. 1-4) with MoCo v3 and CLIP options.

``z0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos`` (Eq. 1), pre-LN blocks (Eq. 2-3), final
LayerNorm, then the class token (``pool="cls"``, Eq. 4 without the head) or the mean of the
patch tokens (``pool="gap"``, no class token). Output ``[B, width]`` features, no classifier.

Options from the contrastive literature:
* ``posemb="sincos2d"``: fixed 2-D sine-cosine positions (MoCo v3, Chen et al., 2021, Sec. 4;
  big_vision). See ``posemb_sincos_2d``; the class token gets a zero position embedding.
* ``freeze_patch_embed=True``: MoCo v3's random, frozen patch projection (Sec. 4.2, "random
  patch projection" stabilises training). The projection's output passes through
  ``jax.lax.stop_gradient`` so its gradient is exactly zero, and the module is named
  ``patch_embed_frozen``: the config MUST also mask it from the optimizer
  (``optim.frozen_patterns=("patch_embed_frozen",)``), because decoupled weight decay (AdamW,
  LARS) changes parameters even with a zero gradient.
* ``ln_pre=True``, ``patch_bias=False``, ``activation="quick_gelu"``, ``ln_eps=1e-5``: the image
  tower of OpenAI CLIP (Radford et al., 2021), which normalises the embedded tokens before the
  transformer and has a bias-free patch convolution.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from contrastive_jax.models.layers import FROZEN_SUFFIX, LayerNormF32, Transformer, shard_batch

Dtype = Any

POOLS = ("cls", "gap")
POSEMBS = ("learn", "sincos2d")


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 2-D sine-cosine position embedding, ``[h * w, width] float32``, row-major positions.

  With ``d = width / 4`` and frequencies ``omega_i = 1 / temperature^(i / d)``, ``i = 0..d-1``,
  the embedding of the patch in row ``y``, column ``x`` is
  ``[sin(x omega), cos(x omega), sin(y omega), cos(y omega)]``: the first half of the channels
  encodes the column, the second half the row (the channel order of MoCo v3 and big_vision).
  """
  if width % 4:
    raise ValueError(f"posemb='sincos2d' needs a width divisible by 4, got {width}; "
                     "use posemb='learn' or a width that is a multiple of 4")
  d = width // 4
  omega = 1.0 / temperature ** (np.arange(d, dtype=np.float64) / d)
  y, x = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                     indexing="ij")
  ax = x.reshape(-1, 1) * omega[None]  # [h*w, d]
  ay = y.reshape(-1, 1) * omega[None]
  return np.concatenate([np.sin(ax), np.cos(ax), np.sin(ay), np.cos(ay)], 1).astype(np.float32)


class ViT(nn.Module):
  """``[B, H, W, 3] float -> [B, width]`` in ``dtype``.

  Attributes:
    patch_size: side of the square patches; H and W must be multiples of it.
    width, depth, num_heads: transformer size; ``mlp_dim`` defaults to ``4 * width``.
    pool: ``"cls"`` (class token) or ``"gap"`` (mean of the patch tokens, no class token).
    posemb: ``"learn"`` (``pos_embedding [1, N(+1), width]``, normal(0.02), covering the class
      token too) or ``"sincos2d"`` (fixed, no parameter).
    freeze_patch_embed: see the module docstring.
    patch_bias: bias of the patch projection (CLIP has none).
    ln_pre: LayerNorm on the embedded tokens before the transformer (CLIP).
    ln_eps: LayerNorm epsilon (1e-6 ViT/big_vision, 1e-5 CLIP/timm).
    activation: MLP nonlinearity (``gelu``, ``quick_gelu`` for OpenAI CLIP, ...).
    dropout_rate, attention_dropout_rate: active when ``train=True`` (rng ``"dropout"``).
    remat: rematerialise each transformer block.
    scan: the blocks as one ``nn.scan`` over stacked parameters (``layers.Transformer``).
  """
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int | None = None
  pool: str = "cls"
  posemb: str = "learn"
  freeze_patch_embed: bool = False
  patch_bias: bool = True
  ln_pre: bool = False
  ln_eps: float = 1e-6
  activation: str = "gelu"
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  remat: bool = False
  scan: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def feature_dim(self) -> int:
    return self.width

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.pool not in POOLS:
      raise ValueError(f"pool={self.pool!r} is unknown; use one of {POOLS}")
    if self.posemb not in POSEMBS:
      raise ValueError(f"posemb={self.posemb!r} is unknown; use one of {POSEMBS}")
    b, hh, ww, _ = x.shape
    p = self.patch_size
    if hh % p or ww % p:
      raise ValueError(f"image size {hh}x{ww} is not a multiple of patch_size={p}; "
                       "resize/crop the images or change patch_size")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    name = "patch_embed" + (FROZEN_SUFFIX if self.freeze_patch_embed else "")
    x = nn.Conv(self.width, (p, p), (p, p), padding="VALID", use_bias=self.patch_bias,
                name=name, **kw)(x.astype(self.dtype))
    if self.freeze_patch_embed:
      x = jax.lax.stop_gradient(x)
    gh, gw = hh // p, ww // p
    x = shard_batch(x.reshape(b, gh * gw, self.width))

    use_cls = self.pool == "cls"
    if use_cls:
      cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.width), self.param_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.width)), x], 1)
    if self.posemb == "learn":
      pos = self.param("pos_embedding", nn.initializers.normal(0.02),
                       (1, x.shape[1], self.width), self.param_dtype)
    else:
      pos = posemb_sincos_2d(gh, gw, self.width)
      if use_cls:  # MoCo v3: the class token's position embedding is zero.
        pos = np.concatenate([np.zeros((1, self.width), np.float32), pos], 0)
      pos = jnp.asarray(pos)[None]
    x = x + pos.astype(self.dtype)

    if self.ln_pre:
      x = LayerNormF32(self.ln_eps, name="ln_pre", **kw)(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    x = Transformer(self.depth, self.num_heads, self.mlp_dim or 4 * self.width,
                    activation=self.activation, ln_eps=self.ln_eps,
                    dropout_rate=self.dropout_rate,
                    attention_dropout_rate=self.attention_dropout_rate, remat=self.remat,
                    scan=self.scan, name="transformer", **kw)(x, train)
    x = LayerNormF32(self.ln_eps, name="ln_final", **kw)(x)
    if use_cls:
      return shard_batch(x[:, 0])
    return jnp.mean(x.astype(jnp.float32), axis=1).astype(self.dtype)
