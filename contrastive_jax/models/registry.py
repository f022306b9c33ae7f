"""Builds encoders and CLIP models from a config name plus keyword overrides.

``build_model(name, **kwargs)`` for the names in ``MODEL_NAMES``; preset sizes (depth, width,
heads, patch) come from the name, every other field of the module can be given as a keyword
(e.g. ``build_model("resnet18", stem="cifar", width=0.5, bn_groups=8)``). ViT presets follow
Dosovitskiy et al. (2021, Table 1) and Touvron et al. (2021, DeiT Ti/S).

``build_clip(image_model, image_kwargs, text_kwargs, embed_dim, siglip)`` assembles the two-tower
model; ``build_clip_preset("clip_vit_b32")`` gives OpenAI CLIP ViT-B/32's architecture.
``check_config(config)`` checks a run config's model keys before anything is built.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from contrastive_jax.errors import require, require_one_of
from contrastive_jax.models.clip import CLIP
from contrastive_jax.models.convnet import ConvNet
from contrastive_jax.models.resnet import ResNet
from contrastive_jax.models.text import TextTransformer
from contrastive_jax.models.vit import ViT

VIT_PRESETS: dict[str, dict[str, int]] = {
    "vit_ti16": dict(patch_size=16, width=192, depth=12, num_heads=3, mlp_dim=768),
    "vit_s16": dict(patch_size=16, width=384, depth=12, num_heads=6, mlp_dim=1536),
    "vit_b16": dict(patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072),
    "vit_b32": dict(patch_size=32, width=768, depth=12, num_heads=12, mlp_dim=3072),
    "vit_l14": dict(patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=4096),
    # ViT-g/14 and ViT-bigG/14 as in open_clip's model configs (Cherti et al. 2023,
    # "Reproducible scaling laws for contrastive language-image learning"; the shapes of Zhai et
    # al. 2022, "Scaling Vision Transformers", with open_clip's head widths 88 and 104).
    "vit_g14": dict(patch_size=14, width=1408, depth=40, num_heads=16, mlp_dim=6144),
    "vit_bigg14": dict(patch_size=14, width=1664, depth=48, num_heads=16, mlp_dim=8192),
}

_BUILDERS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "convnet": (ConvNet, {}),
    "resnet18": (ResNet, dict(depth=18)),
    "resnet34": (ResNet, dict(depth=34)),
    "resnet50": (ResNet, dict(depth=50)),
    **{name: (ViT, preset) for name, preset in VIT_PRESETS.items()},
    "vit": (ViT, {}),
    "clip_text": (TextTransformer, {}),
}
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)

# OpenAI CLIP's image towers: ln_pre, bias-free patch conv, QuickGELU, LayerNorm eps 1e-5.
_CLIP_IMAGE = dict(ln_pre=True, patch_bias=False, ln_eps=1e-5, activation="quick_gelu")
_CLIP_TEXT = dict(vocab_size=49_408, context_length=77, width=512, depth=12, num_heads=8,
                  ln_eps=1e-5, activation="quick_gelu")
# open_clip's ViT-g-14 and ViT-bigG-14 use GELU (not QuickGELU); the other choices as OpenAI's.
_OPENCLIP_IMAGE = dict(_CLIP_IMAGE, activation="gelu")
_OPENCLIP_TEXT = dict(_CLIP_TEXT, activation="gelu")
CLIP_PRESETS: dict[str, dict[str, Any]] = {
    "clip_vit_b32": dict(image_model="vit_b32", image_kwargs=_CLIP_IMAGE,
                         text_kwargs=_CLIP_TEXT, embed_dim=512),
    "clip_vit_b16": dict(image_model="vit_b16", image_kwargs=_CLIP_IMAGE,
                         text_kwargs=_CLIP_TEXT, embed_dim=512),
    # Parameter counts (image + text + projections + scale): L/14 427.6M, g/14 1.367B,
    # bigG/14 2.540B, matching open_clip's 428M / 1.37B / 2.54B (tests/test_runs.py).
    "clip_vit_l14": dict(image_model="vit_l14", image_kwargs=_CLIP_IMAGE,
                         text_kwargs=dict(_CLIP_TEXT, width=768, num_heads=12), embed_dim=768),
    "clip_vit_g14": dict(image_model="vit_g14", image_kwargs=_OPENCLIP_IMAGE,
                         text_kwargs=dict(_OPENCLIP_TEXT, width=1024, depth=24, num_heads=16),
                         embed_dim=1024),
    "clip_vit_bigg14": dict(image_model="vit_bigg14", image_kwargs=_OPENCLIP_IMAGE,
                            text_kwargs=dict(_OPENCLIP_TEXT, width=1280, depth=32,
                                             num_heads=20), embed_dim=1280),
}


def _construct(cls: type[nn.Module], what: str, kwargs: dict[str, Any]) -> nn.Module:
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"{what}: unknown setting(s) {unknown}; valid settings are {sorted(fields)}")
  return cls(**kwargs)


def check_config(config: Any) -> None:
  """``config.model.name``, and that a ViT's patch size tiles ``config.data.image_size``; a
  ``ConfigError`` naming the key. The input size is checked here because the patch size is the
  model's (``model.kwargs`` or the name's preset); the data section only says how large its
  images are (``data/pipeline.check_config`` has checked that it is an integer >= 8)."""
  require_one_of("model.name", config.model.name, MODEL_NAMES)
  image_size = config.data.image_size
  patch = (dict(config.model.kwargs).get("patch_size")
           or VIT_PRESETS.get(config.model.name, {}).get("patch_size"))
  if patch:
    require(image_size >= patch and image_size % patch == 0,
            f"config.data.image_size={image_size} must be a multiple of the ViT patch size "
            f"{patch} (and at least one patch); change config.data.image_size or the patch size")


def model_class(name: str) -> type[nn.Module]:
  """The module class ``build_model(name)`` builds (read its fields without building one)."""
  if name not in _BUILDERS:
    raise ValueError(f"unknown model name {name!r}; known names are {list(MODEL_NAMES)}")
  return _BUILDERS[name][0]


def build_model(name: str, **kwargs: Any) -> nn.Module:
  """The encoder called ``name``; ``kwargs`` set or override any of its fields.

  Every encoder is called as ``model.apply(variables, x, train=...)`` with images
  ``[B, H, W, 3] float`` (``clip_text``: tokens ``[B, L] int``) and returns ``[B, F]``.
  """
  cls, preset = model_class(name), _BUILDERS[name][1]
  if cls is ResNet and "depth" in kwargs:
    raise ValueError(f"{name}: depth is fixed by the name; use resnet18, resnet34 or resnet50")
  return _construct(cls, f"model {name!r}", {**preset, **kwargs})


def feature_dim(name: str, **kwargs: Any) -> int:
  """Size F of the ``[B, F]`` features of ``build_model(name, **kwargs)`` (no tracing)."""
  return build_model(name, **kwargs).feature_dim


def build_clip(image_model: str, image_kwargs: dict[str, Any] | None = None,
               text_kwargs: dict[str, Any] | None = None, embed_dim: int = 512,
               siglip: bool = False, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               remat: bool = False, **clip_kwargs: Any) -> CLIP:
  """CLIP/SigLIP two-tower model.

  Args:
    image_model: registry name of the image tower (``vit_b32``, ``resnet50``, ``vit``, ...).
    image_kwargs, text_kwargs: fields of the image tower and of ``TextTransformer``.
    embed_dim: joint embedding size E.
    siglip: SigLIP init (``logit_scale = log 10``, ``logit_bias = -10``).
    dtype, param_dtype, remat: defaults for both towers (a tower's kwargs take precedence).
    clip_kwargs: other ``CLIP`` fields (``logit_scale_init``, ``logit_bias_init``).
  """
  if image_model == "clip_text":
    raise ValueError("image_model='clip_text' is a text encoder; use an image model such as "
                     "'vit_b32' or 'resnet50'")
  common: dict[str, Any] = dict(dtype=dtype, param_dtype=param_dtype)
  if remat:
    common["remat"] = True
  image = build_model(image_model, **{**common, **(image_kwargs or {})})
  text = build_model("clip_text", **{**common, **(text_kwargs or {})})
  return _construct(CLIP, "CLIP", dict(image_encoder=image, text_encoder=text,
                                       embed_dim=embed_dim, siglip=siglip, dtype=dtype,
                                       param_dtype=param_dtype, **clip_kwargs))


def build_clip_preset(name: str, **overrides: Any) -> CLIP:
  """A ``CLIP_PRESETS`` architecture; ``overrides`` are ``build_clip`` arguments. Tower kwargs
  given in ``overrides`` are merged into (not substituted for) the preset's."""
  if name not in CLIP_PRESETS:
    raise ValueError(f"unknown CLIP preset {name!r}; known presets are {list(CLIP_PRESETS)}")
  args = dict(CLIP_PRESETS[name])
  for key in ("image_kwargs", "text_kwargs"):
    args[key] = {**args[key], **overrides.pop(key, {})}
  args.update(overrides)
  return build_clip(**args)

