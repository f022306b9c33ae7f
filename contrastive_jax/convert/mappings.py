"""Tensor-by-tensor maps between peer state dicts and this project's flax variables.

Supported layouts (PyTorch state dicts, names as the peers write them):

* ``open_clip``: open_clip's ``CLIP`` with a ViT image tower (OpenAI CLIP ViT-B/32, B/16, L/14
  and the LAION models of the same architectures; Radford et al. 2021; Cherti et al. 2023):
  ``visual.*`` (conv1 without bias, class_embedding, positional_embedding, ln_pre,
  transformer.resblocks.i, ln_post, proj), the text tower (token_embedding, positional_embedding,
  transformer.resblocks.i, ln_final, text_projection) and ``logit_scale``.
* ``timm_vit``: timm's ``VisionTransformer`` with a class token and token pooling (augreg ViTs,
  Steiner et al. 2022; DeiT without distillation token, Touvron et al. 2021); ``head.*`` (the
  classifier) is not part of the encoder and is skipped.
* ``torchvision_resnet``: torchvision ResNet-50 (v1.5, He et al. 2016); ``fc.*`` skipped,
  BatchNorm running statistics go to ``batch_stats``.

Not supported: OpenAI's ModifiedResNet image towers (CLIP RN50/RN101/RN50x4...: a 3-conv stem,
anti-aliased average-pool strides and an attention-pooling head), which this project's ResNet
does not express; their state dicts are refused with that reason.

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
# Specs: the JSON-able description of our model that a peer state dict corresponds to.


def openclip_spec(sd: dict[str, Any], *, activation: str, head_width: int = 64) -> dict:
  """Our architecture for an open_clip ViT CLIP state dict (shapes read as OpenAI's
  ``build_model`` does; heads = width / ``head_width``, 64 in every OpenAI and LAION ViT)."""
  if "visual.attnpool.positional_embedding" in sd or "visual.layer1.0.conv1.weight" in sd:
    raise ValueError(
        "this is an OpenAI ModifiedResNet CLIP (RN50/RN101/RN50x4...): its 3-conv stem, "
        "average-pool strides and attention-pooling head are not in this project's ResNet, "
        "so it cannot be imported; use a ViT CLIP")
  if "visual.conv1.weight" not in sd:
    raise ValueError("not an open_clip ViT state dict: 'visual.conv1.weight' is missing")
  if "visual.proj" not in sd or "text_projection" not in sd:
    raise ValueError("open_clip state dict lacks 'visual.proj' or 'text_projection'; only the "
                     "standard CLIP layout (attentional pooling and custom text towers are "
                     "not supported)")
  conv = sd["visual.conv1.weight"]
  width, patch = int(conv.shape[0]), int(conv.shape[-1])
  grid = int(round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5))
  text_width = int(sd["ln_final.weight"].shape[0])
  image_kwargs = dict(
      patch_size=patch, width=width, depth=_count(sd, r"visual\.transformer\.resblocks\.(\d+)\."),
      num_heads=width // head_width, mlp_dim=int(sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
      pool="cls", posemb="learn", ln_pre=True, patch_bias=False, ln_eps=1e-5,
      activation=activation)
  text_kwargs = dict(
      vocab_size=int(sd["token_embedding.weight"].shape[0]),
      context_length=int(sd["positional_embedding"].shape[0]), width=text_width,
      depth=_count(sd, r"transformer\.resblocks\.(\d+)\."), num_heads=text_width // head_width,
      mlp_dim=int(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]), eot_id=None,
      ln_eps=1e-5, activation=activation)
  return dict(kind="clip", image_model="vit", image_kwargs=image_kwargs,
              text_kwargs=text_kwargs, embed_dim=int(sd["text_projection"].shape[1]),
              image_size=grid * patch, logit_scale_shape=list(np.shape(sd["logit_scale"])))


def timm_vit_spec(sd: dict[str, Any], *, head_width: int = 64) -> dict:
  if "patch_embed.proj.weight" not in sd or "cls_token" not in sd:
    raise ValueError("not a timm ViT with a class token: 'patch_embed.proj.weight' or "
                     "'cls_token' is missing")
  if "dist_token" in sd or "fc_norm.weight" in sd or "reg_token" in sd:
    raise ValueError("timm ViT variants with a distillation/register token or fc_norm "
                     "(average pooling) are not supported; use a class-token ViT "
                     "(augreg, DeiT)")
  conv = sd["patch_embed.proj.weight"]
  width, patch = int(conv.shape[0]), int(conv.shape[-1])
  grid = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
  kwargs = dict(patch_size=patch, width=width, depth=_count(sd, r"blocks\.(\d+)\."),
                num_heads=width // head_width, mlp_dim=int(sd["blocks.0.mlp.fc1.weight"].shape[0]),
                pool="cls", posemb="learn", patch_bias=True, ln_pre=False, ln_eps=1e-6,
                activation="gelu")
  return dict(kind="encoder", name="vit", kwargs=kwargs, image_size=grid * patch)


def torchvision_resnet_spec(sd: dict[str, Any]) -> dict:
  if "conv1.weight" not in sd or "layer1.0.conv3.weight" not in sd:
    raise ValueError("not a torchvision ResNet-50 state dict ('conv1.weight' or "
                     "'layer1.0.conv3.weight' is missing)")
  blocks = tuple(_count(sd, rf"layer{s}\.(\d+)\.") for s in range(1, 5))
  if blocks != (3, 4, 6, 3):
    raise ValueError(f"torchvision ResNet with blocks {blocks}: only ResNet-50 (3, 4, 6, 3) is "
                     "supported")
  width = sd["conv1.weight"].shape[0] / 64
  return dict(kind="encoder", name="resnet50", kwargs=dict(width=width, stem="imagenet"),
              image_size=224)


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
    r = [Rule("params/patch_embed/kernel", "patch_embed.proj.weight", "conv"),
         Rule("params/patch_embed/bias", "patch_embed.proj.bias", "copy"),
         Rule("params/cls_token", "cls_token", "copy"),
         Rule("params/pos_embedding", "pos_embed", "copy")]
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


def spec_for(fmt: str, sd: dict[str, Any], *, activation: str | None = None) -> dict:
  if fmt == "open_clip":
    if activation is None:
      raise ValueError("open_clip needs the activation: 'quick_gelu' for OpenAI's weights and "
                       "open_clip's '-quickgelu' models, 'gelu' for the others (e.g. LAION "
                       "ViT-B-32)")
    return openclip_spec(sd, activation=activation)
  if fmt == "timm_vit":
    return timm_vit_spec(sd)
  if fmt == "torchvision_resnet":
    return torchvision_resnet_spec(sd)
  raise ValueError(f"format {fmt!r} is unknown; use one of {FORMATS}")
