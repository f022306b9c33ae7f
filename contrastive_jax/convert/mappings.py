"""Named peer architectures and tensor-by-tensor maps between their state dicts and our variables.

A state dict does not say everything its model computes: the fused ``[3W, W]`` qkv projection is
the same for any head count, and GELU or QuickGELU, LayerNorm epsilons leave no trace. So import
takes the peer's model name and reads the architecture from a table of the published configs
(``MODELS``; written from open_clip's ``model_configs/*.json`` and timm's
``vision_transformer.py`` / ``deit.py`` model functions), then checks every tensor's shape
against it. Nothing is guessed; what the table cannot express is refused by name (``refusal``).

Supported layouts (PyTorch state dicts, names as the peers write them):

* ``open_clip``: open_clip's ``CLIP`` with a ViT image tower and the causal text transformer
  (OpenAI CLIP, Radford et al. 2021; the LAION/DataComp/DFN models, Cherti et al. 2023):
  ``visual.*`` (conv1 without bias, class_embedding, positional_embedding, ln_pre,
  transformer.resblocks.i, ln_post, proj), the text tower (token_embedding, positional_embedding,
  transformer.resblocks.i, ln_final, text_projection) and ``logit_scale``. Head width 64 (B, L),
  80 (H/14), 88 (g/14), 104 (bigG/14).
* ``timm_vit``: timm's ``VisionTransformer`` with a class token and token pooling (augreg ViTs,
  Steiner et al. 2022; DeiT without distillation token, Touvron et al. 2021; the CLIP image
  towers with ``pre_norm``); ``head.*`` (classifier or CLIP projection) is skipped.
* ``torchvision_resnet``: torchvision ResNet-50 (v1.5, He et al. 2016); ``fc.*`` skipped,
  BatchNorm running statistics go to ``batch_stats``.

Refused with the reason: OpenAI's ModifiedResNet towers (RN50...), SigLIP (attention-pooling
head; Zhai et al. 2023), CLIPA, MetaCLIP 2 worldwide, layer-scale, register-token, EVA, CoCa and
other non-standard towers.

Each rule pairs one of our variable paths (``"params/image_encoder/patch_embed/kernel"``) with a
peer key and a layout change that is exactly invertible (a transpose or a reshape), so export is
the inverse of import. PyTorch ``Linear``/``in_proj`` weights are ``[out, in]`` and flax kernels
``[in, out]``; ``nn.MultiheadAttention``'s ``in_proj_weight`` rows are q, k, v (each head-major),
which is the column order of our fused ``qkv`` kernel; convolutions are ``[O, I, kh, kw]`` in
PyTorch and ``[kh, kw, I, O]`` in flax.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from contrastive_jax.errors import ConfigError, DataError

FORMATS = ("open_clip", "timm_vit", "torchvision_resnet")
# Keys that carry no weights (OpenAI's original checkpoints store these three integers).
_OPENAI_META = ("input_resolution", "context_length", "vocab_size")


@dataclasses.dataclass(frozen=True)
class Rule:
  ours: str
  peer: str
  # "copy" | "linear" | "conv" | "lead1" ([X] <-> [1, X]) | "lead2" ([X] <-> [1, 1, X]) |
  # "scalar1" ([1] <-> []: open_clip 3.x stores logit_scale as [1], OpenAI as [])
  kind: str


def to_ours(arr: np.ndarray, kind: str) -> np.ndarray:
  if kind == "copy":
    return arr
  if kind == "linear":
    return arr.T
  if kind == "conv":
    return arr.transpose(2, 3, 1, 0)
  if kind == "lead1":
    return arr[None]
  if kind == "lead2":
    return arr[None, None]
  if kind == "scalar1":
    return arr.reshape(())
  raise ValueError(kind)


def to_peer(arr: np.ndarray, kind: str) -> np.ndarray:
  if kind == "copy":
    return arr
  if kind == "linear":
    return arr.T
  if kind == "conv":
    return arr.transpose(3, 2, 0, 1)
  if kind == "lead1":
    return arr[0]
  if kind == "lead2":
    return arr[0, 0]
  if kind == "scalar1":
    return arr.reshape((1,))
  raise ValueError(kind)


def _count(sd: dict[str, Any], pattern: str) -> int:
  idx = {int(m.group(1)) for k in sd for m in [re.match(pattern, k)] if m}
  return max(idx) + 1 if idx else 0


def _ln(ours: str, peer: str) -> list[Rule]:
  return [Rule(f"params/{ours}/scale", f"{peer}.weight", "copy"),
          Rule(f"params/{ours}/bias", f"{peer}.bias", "copy")]


def _dense(ours: str, peer: str, bias: bool = True) -> list[Rule]:
  rules = [Rule(f"params/{ours}/kernel", f"{peer}.weight", "linear")]
  if bias:
    rules.append(Rule(f"params/{ours}/bias", f"{peer}.bias", "copy"))
  return rules


def _openclip_blocks(ours: str, peer: str, depth: int) -> list[Rule]:
  rules = []
  for i in range(depth):
    o, p = f"{ours}/transformer/block{i}", f"{peer}.resblocks.{i}"
    rules += _ln(f"{o}/ln1", f"{p}.ln_1") + _ln(f"{o}/ln2", f"{p}.ln_2")
    rules += [Rule(f"params/{o}/attn/qkv/kernel", f"{p}.attn.in_proj_weight", "linear"),
              Rule(f"params/{o}/attn/qkv/bias", f"{p}.attn.in_proj_bias", "copy")]
    rules += _dense(f"{o}/attn/out", f"{p}.attn.out_proj")
    rules += _dense(f"{o}/mlp/fc1", f"{p}.mlp.c_fc") + _dense(f"{o}/mlp/fc2", f"{p}.mlp.c_proj")
  return rules


def _timm_blocks(ours: str, depth: int) -> list[Rule]:
  rules = []
  for i in range(depth):
    o, p = f"{ours}/transformer/block{i}", f"blocks.{i}"
    rules += _ln(f"{o}/ln1", f"{p}.norm1") + _ln(f"{o}/ln2", f"{p}.norm2")
    rules += _dense(f"{o}/attn/qkv", f"{p}.attn.qkv") + _dense(f"{o}/attn/out", f"{p}.attn.proj")
    rules += _dense(f"{o}/mlp/fc1", f"{p}.mlp.fc1") + _dense(f"{o}/mlp/fc2", f"{p}.mlp.fc2")
  return rules


# ---------------------------------------------------------------------------------------------
# Named architectures: the peers' published configs. A state dict alone does not say the head
# count (the fused qkv is [3W, W] for any head count), the activation (GELU vs QuickGELU) or the
# LayerNorm epsilon, so import takes the peer's model name and never guesses them.

# open_clip (src/open_clip/model_configs/<name>.json; Radford et al. 2021, Cherti et al. 2023):
# name: (embed_dim, image_size, patch, width, depth, head_width, mlp_ratio,
#        text_width, text_heads, text_depth, quick_gelu)
# mlp_dim = int(width * mlp_ratio) as open_clip computes it (g/14: 6144, bigG/14: 8192); the
# text MLP ratio is 4 and its context/vocab 77/49408 in every one of them. (ViT-e-14, head width
# 112, has no published weights and no parity test here: left out.)
_OPEN_CLIP = {
    "ViT-S-32": (384, 224, 32, 384, 12, 64, 4.0, 384, 6, 12, False),
    "ViT-S-32-alt": (256, 224, 32, 384, 12, 64, 4.0, 256, 4, 10, False),
    "ViT-S-16": (384, 224, 16, 384, 12, 64, 4.0, 384, 6, 12, False),
    "ViT-S-16-alt": (256, 224, 16, 384, 12, 64, 4.0, 256, 4, 10, False),
    "ViT-M-32": (512, 224, 32, 512, 12, 64, 4.0, 512, 8, 12, False),
    "ViT-M-32-alt": (384, 224, 32, 512, 12, 64, 4.0, 384, 6, 12, False),
    "ViT-M-16": (512, 224, 16, 512, 12, 64, 4.0, 512, 8, 12, False),
    "ViT-B-32": (512, 224, 32, 768, 12, 64, 4.0, 512, 8, 12, False),
    "ViT-B-32-quickgelu": (512, 224, 32, 768, 12, 64, 4.0, 512, 8, 12, True),
    "ViT-B-32-256": (512, 256, 32, 768, 12, 64, 4.0, 512, 8, 12, False),
    "ViT-B-32-plus-256": (640, 256, 32, 896, 12, 64, 4.0, 640, 10, 12, False),
    "ViT-B-16": (512, 224, 16, 768, 12, 64, 4.0, 512, 8, 12, False),
    "ViT-B-16-quickgelu": (512, 224, 16, 768, 12, 64, 4.0, 512, 8, 12, True),
    "ViT-B-16-plus": (640, 224, 16, 896, 12, 64, 4.0, 640, 10, 12, False),
    "ViT-B-16-plus-240": (640, 240, 16, 896, 12, 64, 4.0, 640, 10, 12, False),
    "ViT-L-16": (768, 224, 16, 1024, 24, 64, 4.0, 768, 12, 12, False),
    "ViT-L-16-320": (768, 320, 16, 1024, 24, 64, 4.0, 768, 12, 12, False),
    "ViT-L-14": (768, 224, 14, 1024, 24, 64, 4.0, 768, 12, 12, False),
    "ViT-L-14-quickgelu": (768, 224, 14, 1024, 24, 64, 4.0, 768, 12, 12, True),
    "ViT-L-14-280": (768, 280, 14, 1024, 24, 64, 4.0, 768, 12, 12, False),
    "ViT-L-14-336": (768, 336, 14, 1024, 24, 64, 4.0, 768, 12, 12, False),
    "ViT-L-14-336-quickgelu": (768, 336, 14, 1024, 24, 64, 4.0, 768, 12, 12, True),
    "ViT-H-16": (1024, 224, 16, 1280, 32, 80, 4.0, 1024, 16, 24, False),
    "ViT-H-14": (1024, 224, 14, 1280, 32, 80, 4.0, 1024, 16, 24, False),
    "ViT-H-14-quickgelu": (1024, 224, 14, 1280, 32, 80, 4.0, 1024, 16, 24, True),
    "ViT-H-14-378": (1024, 378, 14, 1280, 32, 80, 4.0, 1024, 16, 24, False),
    "ViT-H-14-378-quickgelu": (1024, 378, 14, 1280, 32, 80, 4.0, 1024, 16, 24, True),
    "ViT-g-14": (1024, 224, 14, 1408, 40, 88, 4.3637, 1024, 16, 24, False),
    "ViT-bigG-14": (1280, 224, 14, 1664, 48, 104, 4.9231, 1280, 20, 32, False),
    "ViT-bigG-14-quickgelu": (1280, 224, 14, 1664, 48, 104, 4.9231, 1280, 20, 32, True),
}

# timm (timm/models/vision_transformer.py and deit.py): class-token ViTs with token pooling.
# name: (image_size, patch, width, depth, heads, mlp_ratio, clip, quick_gelu); ``clip`` = the
# CLIP image towers (``pre_norm=True``: a LayerNorm before the blocks, no patch-embedding bias,
# LayerNorm eps 1e-5); the others have eps 1e-6 and a patch bias. mlp_dim = int(width * ratio).
_TIMM = {
    "vit_tiny_patch16_224": (224, 16, 192, 12, 3, 4.0, False, False),
    "vit_tiny_patch16_384": (384, 16, 192, 12, 3, 4.0, False, False),
    "vit_small_patch32_224": (224, 32, 384, 12, 6, 4.0, False, False),
    "vit_small_patch16_224": (224, 16, 384, 12, 6, 4.0, False, False),
    "vit_small_patch16_384": (384, 16, 384, 12, 6, 4.0, False, False),
    "vit_base_patch32_224": (224, 32, 768, 12, 12, 4.0, False, False),
    "vit_base_patch32_384": (384, 32, 768, 12, 12, 4.0, False, False),
    "vit_base_patch16_224": (224, 16, 768, 12, 12, 4.0, False, False),
    "vit_base_patch16_384": (384, 16, 768, 12, 12, 4.0, False, False),
    "vit_large_patch32_224": (224, 32, 1024, 24, 16, 4.0, False, False),
    "vit_large_patch32_384": (384, 32, 1024, 24, 16, 4.0, False, False),
    "vit_large_patch16_224": (224, 16, 1024, 24, 16, 4.0, False, False),
    "vit_large_patch16_384": (384, 16, 1024, 24, 16, 4.0, False, False),
    "vit_huge_patch14_224": (224, 14, 1280, 32, 16, 4.0, False, False),
    "deit_tiny_patch16_224": (224, 16, 192, 12, 3, 4.0, False, False),
    "deit_small_patch16_224": (224, 16, 384, 12, 6, 4.0, False, False),
    "deit_base_patch16_224": (224, 16, 768, 12, 12, 4.0, False, False),
    "deit_base_patch16_384": (384, 16, 768, 12, 12, 4.0, False, False),
    "vit_base_patch32_clip_224": (224, 32, 768, 12, 12, 4.0, True, False),
    "vit_base_patch16_clip_224": (224, 16, 768, 12, 12, 4.0, True, False),
    "vit_large_patch14_clip_224": (224, 14, 1024, 24, 16, 4.0, True, False),
    "vit_large_patch14_clip_336": (336, 14, 1024, 24, 16, 4.0, True, False),
    "vit_huge_patch14_clip_224": (224, 14, 1280, 32, 16, 4.0, True, False),
    "vit_huge_patch14_clip_378": (378, 14, 1280, 32, 16, 4.0, True, False),
    "vit_giant_patch14_clip_224": (224, 14, 1408, 40, 16, 48 / 11, True, False),
    "vit_gigantic_patch14_clip_224": (224, 14, 1664, 48, 16, 64 / 13, True, False),
    "vit_base_patch32_clip_quickgelu_224": (224, 32, 768, 12, 12, 4.0, True, True),
    "vit_base_patch16_clip_quickgelu_224": (224, 16, 768, 12, 12, 4.0, True, True),
    "vit_large_patch14_clip_quickgelu_224": (224, 14, 1024, 24, 16, 4.0, True, True),
    "vit_large_patch14_clip_quickgelu_336": (336, 14, 1024, 24, 16, 4.0, True, True),
    "vit_huge_patch14_clip_quickgelu_224": (224, 14, 1280, 32, 16, 4.0, True, True),
    "vit_huge_patch14_clip_quickgelu_378": (378, 14, 1280, 32, 16, 4.0, True, True),
    "vit_gigantic_patch14_clip_quickgelu_224": (224, 14, 1664, 48, 16, 64 / 13, True, True),
}

# Names (or name patterns) users will try that this project cannot express, and why.
_REFUSED = (
    (r"RN\d+(x\d+)?(-quickgelu)?",
     "OpenAI's ModifiedResNet image tower (3-conv stem, anti-aliased average-pool strides, "
     "attention-pooling head) is not this project's ResNet"),
    (r".*[Ss]ig[Ll][Ii][Pp].*",
     "SigLIP towers (Zhai et al. 2023) pool the image tokens with a multi-head attention-pooling "
     "head (MAP) and the text tower without a causal mask at the last token with a biased "
     "projection; this project's ViT pools 'cls' or 'gap' only, so neither open_clip's nor "
     "big_vision's SigLIP weights can be imported (train SigLIP from scratch instead)"),
    (r".*CLIPA.*",
     "CLIPA towers have no ln_pre, average-pool before their final LayerNorm and use a "
     "non-causal text tower with a different tokenizer"),
    (r".*worldwide.*",
     "MetaCLIP 2 'worldwide' models use a multilingual tokenizer and pool the text at its EOS id"),
    (r"ViT-M-16-alt",
     "this open_clip variant uses layer scale (ls_init_value), which our blocks do not have"),
    (r"EVA.*|eva.*|coca.*|convnext.*|ViTamin.*|MobileCLIP.*|PE-Core.*|.*roberta.*|mt5.*|nllb.*"
     r"|swin.*|vit_medium.*|vit_relpos.*",
     "its towers (EVA, CoCa, ConvNeXt, ViTamin, MobileCLIP, PE, Hugging Face text models, ...) "
     "are not the standard CLIP ViT/text transformer pair this project implements"),
    (r".*_reg\d.*", "register tokens (Darcet et al. 2024) are not in this project's ViT"),
    (r".*distilled.*", "DeiT's distillation token is not in this project's ViT"),
    (r".*_gap_.*|.*_siglip_.*|.*_dinov2.*|.*_rope.*|.*_relpos.*",
     "average pooling with fc_norm, MAP heads, DINOv2 layer scale and relative positions are "
     "not in this project's ViT"),
)


def _open_clip_spec(name: str) -> dict:
  (embed, size, patch, width, depth, head_width, ratio, t_width, t_heads, t_depth,
   quick) = _OPEN_CLIP[name]
  act = "quick_gelu" if quick else "gelu"
  image_kwargs = dict(
      patch_size=patch, width=width, depth=depth, num_heads=width // head_width,
      mlp_dim=int(width * ratio), pool="cls", posemb="learn", ln_pre=True, patch_bias=False,
      ln_eps=1e-5, activation=act)
  text_kwargs = dict(vocab_size=49408, context_length=77, width=t_width, depth=t_depth,
                     num_heads=t_heads, mlp_dim=4 * t_width, eot_id=None, ln_eps=1e-5,
                     activation=act)
  return dict(kind="clip", image_model="vit", image_kwargs=image_kwargs,
              text_kwargs=text_kwargs, embed_dim=embed, image_size=size)


def _timm_spec(name: str) -> dict:
  size, patch, width, depth, heads, ratio, clip, quick = _TIMM[name]
  kwargs = dict(patch_size=patch, width=width, depth=depth, num_heads=heads,
                mlp_dim=int(width * ratio), pool="cls", posemb="learn", patch_bias=not clip,
                ln_pre=clip, ln_eps=1e-5 if clip else 1e-6,
                activation="quick_gelu" if quick else "gelu")
  return dict(kind="encoder", name="vit", kwargs=kwargs, image_size=size)


MODELS: dict[str, str] = {**{n: "open_clip" for n in _OPEN_CLIP}, **{n: "timm_vit" for n in _TIMM},
                          "resnet50": "torchvision_resnet"}


def refusal(name: str) -> str | None:
  """Why the peer model ``name`` cannot be imported, or None."""
  if name in MODELS:
    return None
  for pattern, why in _REFUSED:
    if re.fullmatch(pattern, name):
      return why
  return None


def named_spec(name: str) -> dict:
  """Our architecture for the peer model ``name`` (open_clip config name, timm model name
  without its ``.pretrained_tag``, or ``resnet50``), with ``spec["peer"]`` recording it."""
  base = name.split(".", 1)[0] if name.startswith(("vit_", "deit_")) else name
  why = refusal(base)
  if why:
    raise ConfigError(f"{name!r} cannot be imported: {why}")
  if base not in MODELS:
    raise ConfigError(
        f"model {name!r} is not in the table of published architectures; use one of "
        f"{sorted(MODELS)} (docs/weights.md), or pass the full architecture as a spec "
        "(convert.core.import_state_dict(..., spec=...))")
  fmt = MODELS[base]
  if fmt == "open_clip":
    spec = _open_clip_spec(base)
  elif fmt == "timm_vit":
    spec = _timm_spec(base)
  else:
    spec = dict(kind="encoder", name="resnet50", kwargs=dict(width=1.0, stem="imagenet"),
                image_size=224)
  spec["peer"] = dict(format=fmt, model=base)
  return spec


def fingerprint(fmt: str, spec: dict) -> dict[str, tuple]:
  """The peer tensors' shapes that the architecture ``spec`` fixes, by config arithmetic (no
  model built): enough to tell the table's names apart, except by what no shape shows (heads,
  activation, LayerNorm epsilon)."""
  if fmt == "open_clip":
    iv, tx = spec["image_kwargs"], spec["text_kwargs"]
    w, p, grid = iv["width"], iv["patch_size"], spec["image_size"] // iv["patch_size"]
    return {"visual.conv1.weight": (w, 3, p, p),
            "visual.positional_embedding": (grid * grid + 1, w),
            "visual.transformer.resblocks": (iv["depth"],),
            "visual.transformer.resblocks.0.mlp.c_fc.weight": (iv["mlp_dim"], w),
            "visual.proj": (w, spec["embed_dim"]),
            "token_embedding.weight": (tx["vocab_size"], tx["width"]),
            "positional_embedding": (tx["context_length"], tx["width"]),
            "transformer.resblocks": (tx["depth"],),
            "transformer.resblocks.0.mlp.c_fc.weight": (tx["mlp_dim"], tx["width"]),
            "text_projection": (tx["width"], spec["embed_dim"])}
  if fmt == "timm_vit":
    kw = spec["kwargs"]
    w, p, grid = kw["width"], kw["patch_size"], spec["image_size"] // kw["patch_size"]
    return {"patch_embed.proj.weight": (w, 3, p, p),
            "patch_embed.proj.bias": (w,) if kw["patch_bias"] else None,
            "norm_pre.weight": (w,) if kw["ln_pre"] else None,
            "pos_embed": (1, grid * grid + 1, w), "blocks": (kw["depth"],),
            "blocks.0.mlp.fc1.weight": (kw["mlp_dim"], w)}
  return {}


def fingerprint_of(fmt: str, sd: dict[str, Any]) -> dict[str, tuple]:
  """``fingerprint`` read off a state dict (None where a tensor is absent)."""
  def shape(k):
    return tuple(np.shape(sd[k])) if k in sd else None
  if fmt == "open_clip":
    out = {k: shape(k) for k in fingerprint(fmt, _open_clip_spec("ViT-B-32"))}
    out["visual.transformer.resblocks"] = (_count(sd, r"visual\.transformer\.resblocks\.(\d+)\."),)
    out["transformer.resblocks"] = (_count(sd, r"transformer\.resblocks\.(\d+)\."),)
    return out
  if fmt == "timm_vit":
    out = {k: shape(k) for k in fingerprint(fmt, _timm_spec("vit_base_patch16_clip_224"))}
    out["blocks"] = (_count(sd, r"blocks\.(\d+)\."),)
    return out
  return {}


def names_matching(fmt: str, sd: dict[str, Any]) -> list[str]:
  """The table's names of format ``fmt`` whose shapes are those of ``sd``."""
  have = fingerprint_of(fmt, sd)
  return [n for n, f in MODELS.items() if f == fmt and fingerprint(fmt, named_spec(n)) == have]


def check_state_dict(spec: dict, sd: dict[str, Any]) -> None:
  """Raises naming the fix when the peer state dict ``sd`` is not the named architecture."""
  peer = spec.get("peer") or {}
  fmt, name = peer.get("format"), peer.get("model")
  if fmt == "open_clip":
    if "visual.attnpool.positional_embedding" in sd or "visual.layer1.0.conv1.weight" in sd:
      raise DataError(f"this file is an OpenAI ModifiedResNet CLIP, not {name!r}: "
                      f"{refusal('RN50')}")
    if (set(_OPENAI_META) & set(sd)) and spec["image_kwargs"]["activation"] != "quick_gelu":
      # Only OpenAI's own release writes these keys, and it was trained with QuickGELU.
      raise DataError(f"this is OpenAI's original CLIP checkpoint (it has {sorted(_OPENAI_META)}), "
                      f"trained with QuickGELU, but {name!r} uses GELU; use "
                      f"--model {name}-quickgelu")
  want = fingerprint(fmt, spec) if fmt else {}
  if not want:
    return
  have = fingerprint_of(fmt, sd)
  bad = [f"{k}: file {have[k]}, {name} {want[k]}" for k in want if have[k] != want[k]]
  if bad:
    alt = names_matching(fmt, sd)
    hint = (f"the file's shapes are those of {alt}: use --model with one of them "
            "(the name decides heads and activation, which shapes cannot show)" if alt else
            "no name in the table has the file's shapes (docs/weights.md lists them)")
    raise DataError(f"this {fmt} file is not {name!r}: {'; '.join(bad)}; {hint}")


def rules_for(fmt: str, spec: dict) -> tuple[list[Rule], tuple[str, ...]]:
  """``(rules, ignored peer-key prefixes)`` of ``fmt`` for the architecture ``spec``."""
  if fmt == "open_clip":
    iv, tx = spec["image_kwargs"], spec["text_kwargs"]
    r = [Rule("params/image_encoder/patch_embed/kernel", "visual.conv1.weight", "conv"),
         Rule("params/image_encoder/cls_token", "visual.class_embedding", "lead2"),
         Rule("params/image_encoder/pos_embedding", "visual.positional_embedding", "lead1")]
    r += _ln("image_encoder/ln_pre", "visual.ln_pre")
    r += _openclip_blocks("image_encoder", "visual.transformer", iv["depth"])
    r += _ln("image_encoder/ln_final", "visual.ln_post")
    r += [Rule("params/image_proj/kernel", "visual.proj", "copy"),
          Rule("params/text_encoder/token_embed/embedding", "token_embedding.weight", "copy"),
          Rule("params/text_encoder/pos_embedding", "positional_embedding", "copy")]
    r += _openclip_blocks("text_encoder", "transformer", tx["depth"])
    r += _ln("text_encoder/ln_final", "ln_final")
    r += [Rule("params/text_proj/kernel", "text_projection", "copy"),
          Rule("params/logit_scale", "logit_scale",
               "scalar1" if spec.get("logit_scale_shape") == [1] else "copy")]
    return r, _OPENAI_META
  if fmt == "timm_vit":
    kw = spec["kwargs"]
    r = [Rule("params/patch_embed/kernel", "patch_embed.proj.weight", "conv"),
         Rule("params/cls_token", "cls_token", "copy"),
         Rule("params/pos_embedding", "pos_embed", "copy")]
    if kw.get("patch_bias", True):  # timm: bias=not pre_norm (the CLIP towers have none)
      r.append(Rule("params/patch_embed/bias", "patch_embed.proj.bias", "copy"))
    if kw.get("ln_pre", False):
      r += _ln("ln_pre", "norm_pre")
    r += _timm_blocks("", spec["kwargs"]["depth"])
    r += _ln("ln_final", "norm")
    r = [dataclasses.replace(x, ours=x.ours.replace("params//", "params/")) for x in r]
    return r, ("head.",)
  if fmt == "torchvision_resnet":
    def conv_bn(ours, conv, bn):
      return [Rule(f"params/{ours}/{conv[0]}/kernel", f"{conv[1]}.weight", "conv"),
              Rule(f"params/{ours}/{bn[0]}/scale", f"{bn[1]}.weight", "copy"),
              Rule(f"params/{ours}/{bn[0]}/bias", f"{bn[1]}.bias", "copy"),
              Rule(f"batch_stats/{ours}/{bn[0]}/mean", f"{bn[1]}.running_mean", "copy"),
              Rule(f"batch_stats/{ours}/{bn[0]}/var", f"{bn[1]}.running_var", "copy")]
    r = conv_bn("stem", ("conv", "conv1"), ("bn", "bn1"))
    for s, n in enumerate((3, 4, 6, 3), start=1):
      for b in range(n):
        o, p = f"stage{s}_block{b + 1}", f"layer{s}.{b}"
        for k in (1, 2, 3):
          r += conv_bn(o, (f"conv{k}", f"{p}.conv{k}"), (f"bn{k}", f"{p}.bn{k}"))
        if b == 0:
          r += conv_bn(o, ("proj_conv", f"{p}.downsample.0"), ("proj_bn", f"{p}.downsample.1"))
    # num_batches_tracked is a counter PyTorch keeps for momentum=None; it is not a weight.
    return r, ("fc.", "num_batches_tracked")
  raise ValueError(f"format {fmt!r} is unknown; use one of {FORMATS}")
