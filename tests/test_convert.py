"""Parity of converted peer weights (open_clip, timm, torchvision) with the peers' own forward.

Needs torch and the peer libraries (requirements-test.txt, installed by scripts/test.sh); the
tests skip cleanly without them. Random initialisation of the peers' models, with LayerNorm
scales/biases and the logit scale moved off their defaults, stands in for published weights (no
download). Tolerance: max |ours - peer| <= 1e-5 on L2-normalised float32 embeddings (unit
vectors; float32 summation order differs), relative 1e-4 on un-normalised encoder features.

Every family of the table of named architectures (``mappings.MODELS``) is checked numerically
at its real head width, MLP ratio, activation and norm placement on a 2-layer model with a few
heads (``_reduced``), both directions; full size is checked without a forward: the table
against the peers' own definitions (open_clip's model config JSONs, timm's model functions) for
every name, and a complete import of full-size zero-stride state dicts for H/14, g/14, bigG/14.
"""

from __future__ import annotations

import copy
import inspect
import json
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from contrastive_jax import convert  # noqa: E402
from contrastive_jax.convert import core, mappings  # noqa: E402
from contrastive_jax.errors import ConfigError, DataError  # noqa: E402
from contrastive_jax.models import CLIP  # noqa: E402

ATOL_EMB = 1e-5


def _sd(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _shape_only_sd(model) -> dict[str, np.ndarray]:
  """Zero-stride arrays of the model's tensor shapes: no memory for a meta-device model."""
  return {k: np.broadcast_to(np.zeros((), np.float32), tuple(v.shape))
          for k, v in model.state_dict().items()}


def _images(n, size, seed=0):
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def _texts(n, length=77, seed=1, vocab=49408):
  """SOT, random ids, EOT (the largest id, where open_clip's argmax pools), zero padding."""
  rng = np.random.default_rng(seed)
  out = np.zeros((n, length), np.int64)
  for i, k in enumerate(rng.integers(3, min(20, length), n)):
    out[i, 0] = vocab - 2
    out[i, 1:k] = rng.integers(1, vocab - 3, k - 1)
    out[i, k] = vocab - 1
  return out


def _peer_clip(model, images, tokens):
  with torch.no_grad():
    img = model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2)), normalize=True)
    txt = model.encode_text(torch.from_numpy(tokens), normalize=True)
  return img.numpy(), txt.numpy()


def _ours_clip(spec, flat, images, tokens):
  model = core.build_from_spec(spec)
  variables = core.unflatten({k: jnp.asarray(v) for k, v in flat.items()})
  both = jax.jit(lambda v, x, t: (model.apply(v, x, method=CLIP.encode_image),
                                  model.apply(v, t, method=CLIP.encode_text)))
  img, txt = both(variables, images, tokens.astype(np.int32))  # one compile
  return np.asarray(img), np.asarray(txt)


def _perturb(model, seed=0):
  """LayerNorm scales and biases, all other biases, class tokens and the logit scale moved off
  their initial values (1, 0, 0, log(1/0.07)), so a mapping that mixes them up shows."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 and ("ln" in name or "norm" in name) and name.endswith("weight"):
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
      elif name.endswith("bias") or "cls_token" in name or "class_embedding" in name:
        p.copy_(0.05 * torch.randn(p.shape, generator=g))
    if hasattr(model, "logit_scale"):
      model.logit_scale.fill_(3.1)
  return model.eval()


def _rel_err(ours, peer):
  return float(np.max(np.abs(ours - peer)) / np.max(np.abs(peer)))


# --- open_clip: the peer's own config JSON, reduced to 2 layers and a few heads -----------------


def _openclip_cfg(name, heads=None, small_text=True):
  """open_clip's config for ``name``; with ``heads``: 2 layers, ``heads`` heads at the real head
  width and MLP ratio, a 2-patch image, a 2-layer text tower of 2 heads of 64 (its real head
  width and MLP ratio) over 16 positions and 512 ids, embed_dim 48."""
  cfg = copy.deepcopy(open_clip.get_model_config(name))
  if heads:
    v = cfg["vision_cfg"]
    v.update(layers=2, width=heads * v.get("head_width", 64), image_size=2 * v["patch_size"])
    cfg["text_cfg"].update(width=128, heads=2, layers=2)
    if small_text:
      cfg["text_cfg"].update(context_length=16, vocab_size=512)
    cfg["embed_dim"] = 48
  return cfg


def _openclip_shapes(cfg) -> dict[str, tuple]:
  """Every tensor of open_clip's standard CLIP state dict for ``cfg``, by config arithmetic."""
  v, t, e = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]
  w, p, tw = v["width"], v["patch_size"], t["width"]
  g = v["image_size"] // p
  out = {"visual.class_embedding": (w,), "visual.positional_embedding": (g * g + 1, w),
         "visual.proj": (w, e), "visual.conv1.weight": (w, 3, p, p),
         "token_embedding.weight": (t["vocab_size"], tw),
         "positional_embedding": (t["context_length"], tw), "text_projection": (tw, e),
         "logit_scale": ()}
  for ln, width in (("visual.ln_pre", w), ("visual.ln_post", w), ("ln_final", tw)):
    out[f"{ln}.weight"] = out[f"{ln}.bias"] = (width,)
  for prefix, width, mlp, depth in (
      ("visual.transformer", w, int(w * v.get("mlp_ratio", 4.0)), v["layers"]),
      ("transformer", tw, 4 * tw, t["layers"])):
    for i in range(depth):
      b = f"{prefix}.resblocks.{i}"
      for ln in ("ln_1", "ln_2"):
        out[f"{b}.{ln}.weight"] = out[f"{b}.{ln}.bias"] = (width,)
      out.update({f"{b}.attn.in_proj_weight": (3 * width, width),
                  f"{b}.attn.in_proj_bias": (3 * width,),
                  f"{b}.attn.out_proj.weight": (width, width), f"{b}.attn.out_proj.bias": (width,),
                  f"{b}.mlp.c_fc.weight": (mlp, width), f"{b}.mlp.c_fc.bias": (mlp,),
                  f"{b}.mlp.c_proj.weight": (width, mlp), f"{b}.mlp.c_proj.bias": (width,)})
  return out


def _zeros(shapes) -> dict[str, np.ndarray]:
  """Zero-stride arrays: a full-size state dict that takes no memory."""
  return {k: np.broadcast_to(np.zeros((), np.float32), s) for k, s in shapes.items()}


def _reduced_spec(name, heads, small_text=True):
  """Our table's architecture for ``name`` with the reductions of ``_openclip_cfg`` /
  ``_timm_reduced`` (head width, MLP ratio, activation, norms as in the table)."""
  spec = mappings.named_spec(name)
  tower = spec["image_kwargs"] if spec["kind"] == "clip" else spec["kwargs"]
  head_width, w0, m0 = tower["width"] // tower["num_heads"], tower["width"], tower["mlp_dim"]
  width = heads * head_width
  tower.update(depth=2, num_heads=heads, width=width, mlp_dim=width * m0 // w0)
  spec["image_size"] = 2 * tower["patch_size"]
  if spec["kind"] == "clip":
    spec["text_kwargs"].update(width=128, num_heads=2, depth=2, mlp_dim=512)
    if small_text:
      spec["text_kwargs"].update(context_length=16, vocab_size=512)
    spec["embed_dim"] = 48
  spec["peer"]["model"] = f"{name} (reduced)"
  return spec


def _small_openclip(name="ViT-B-16", heads=2, seed=0, small_text=True):
  cfg = _openclip_cfg(name, heads, small_text)
  torch.manual_seed(seed)
  return _perturb(open_clip.model.CLIP(**cfg), seed), _reduced_spec(name, heads, small_text)


def _small_texts(n):
  return _texts(n, 16, vocab=512)


# The families of open_clip's table: head width 64 (S, M, B, L; QuickGELU at full size in the
# ViT-B/32 test below), 80 (H/14), 88 with MLP ratio 4.3637 (g/14), 104 with 4.9231 (bigG/14,
# QuickGELU). Four heads: width // 64 != heads, so a guessed head count cannot pass.
OPEN_CLIP_FAMILIES = ["ViT-B-16", "ViT-H-14", "ViT-g-14", "ViT-bigG-14-quickgelu"]


@pytest.mark.parametrize("name", OPEN_CLIP_FAMILIES)
def test_openclip_family_parity_both_directions(name):
  model, spec = _small_openclip(name, heads=4)
  sd = _sd(model)
  assert {k: v.shape for k, v in sd.items()} == _openclip_shapes(_openclip_cfg(name, 4))
  spec, flat = convert.import_state_dict(sd, spec=spec)
  size = spec["image_size"]
  images, tokens = _images(2, size), _small_texts(3)
  peer_img, peer_txt = _peer_clip(model, images, tokens)
  img, txt = _ours_clip(spec, flat, images, tokens)
  assert _rel_err(img, peer_img) < 1e-5 and _rel_err(txt, peer_txt) < 1e-5
  assert float(flat["params/logit_scale"]) == pytest.approx(3.1)
  back = convert.export_state_dict("open_clip", spec, flat)
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_openclip_vit_b32_full_size_parity_and_round_trip():
  torch.manual_seed(0)
  model = _perturb(open_clip.create_model("ViT-B-32-quickgelu", pretrained=None))
  sd = _sd(model)
  spec, flat = convert.import_state_dict(sd, "ViT-B-32-quickgelu")
  assert spec["image_kwargs"]["width"] == 768 and spec["embed_dim"] == 512
  images, tokens = _images(2, 224), _texts(3)
  peer_img, peer_txt = _peer_clip(model, images, tokens)
  img, txt = _ours_clip(spec, flat, images, tokens)
  assert _rel_err(img, peer_img) < 1e-5 and _rel_err(txt, peer_txt) < 1e-5
  assert float(flat["params/logit_scale"]) == float(sd["logit_scale"])

  # Export: the exact inverse, and open_clip loads it (strict) and gives the same embeddings.
  back = convert.export_state_dict("open_clip", spec, flat)
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
  again_img, again_txt = _peer_clip(model, images, tokens)
  np.testing.assert_array_equal(again_img, peer_img)
  np.testing.assert_array_equal(again_txt, peer_txt)


def test_openclip_table_is_open_clip_configs():
  """Every open_clip name of the table has the architecture of open_clip's own config JSON."""
  names = [n for n, f in mappings.MODELS.items() if f == "open_clip"]
  assert {"ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "ViT-g-14",
          "ViT-bigG-14", "ViT-B-32-quickgelu", "ViT-L-14-quickgelu"} <= set(names)
  for name in names:
    cfg, spec = _openclip_cfg(name), mappings.named_spec(name)
    v, t, iv, tx = cfg["vision_cfg"], cfg["text_cfg"], spec["image_kwargs"], spec["text_kwargs"]
    act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"
    assert (iv["width"], iv["depth"], iv["patch_size"], spec["image_size"]) == (
        v["width"], v["layers"], v["patch_size"], v["image_size"]), name
    assert iv["width"] // iv["num_heads"] == v.get("head_width", 64), name
    assert iv["mlp_dim"] == int(v["width"] * v.get("mlp_ratio", 4.0)), name
    assert (tx["width"], tx["num_heads"], tx["depth"], tx["context_length"], tx["vocab_size"]) == (
        t["width"], t["heads"], t["layers"], t["context_length"], t["vocab_size"]), name
    assert (iv["activation"], tx["activation"], spec["embed_dim"]) == (act, act, cfg["embed_dim"])
    assert not set(v) - {"image_size", "layers", "width", "patch_size", "head_width",
                         "mlp_ratio"}, name  # no option of open_clip's that the table ignores


def test_openclip_full_size_tensor_map(name="ViT-bigG-14"):
  """Complete import of a full-size (zero-stride) state dict: every tensor mapped and shaped
  (the other names: the table test above; their families: the parity tests)."""
  sd = _zeros(_openclip_shapes(_openclip_cfg(name)))
  spec, flat = convert.import_state_dict(sd, name)
  assert len(flat) == len(sd)
  assert spec["peer"] == {"format": "open_clip", "model": name}


def test_file_and_name_disagree_or_cannot_tell():
  sd = _zeros(_openclip_shapes(_openclip_cfg("ViT-L-14")))
  with pytest.raises(DataError, match=r"not 'ViT-H-14'.*\['ViT-L-14', 'ViT-L-14-quickgelu'\]"):
    convert.import_state_dict(sd, "ViT-H-14")
  openai = {**sd, "input_resolution": np.array(224), "context_length": np.array(77),
            "vocab_size": np.array(49408)}  # only OpenAI's own release has these: QuickGELU
  with pytest.raises(DataError, match="use --model ViT-L-14-quickgelu"):
    convert.import_state_dict(openai, "ViT-L-14")
  for refused, why in (("RN50", "ModifiedResNet"), ("ViT-B-16-SigLIP", "attention-pooling"),
                       ("vit_so400m_patch14_siglip_224", "attention-pooling"),
                       ("vit_base_patch16_reg4_gap_256", "register tokens"),
                       ("ViT-M-16-alt", "layer scale"), ("ViT-X-99", "not in the table")):
    with pytest.raises(ConfigError, match=why):
      convert.import_state_dict(sd, refused)
  with pytest.raises(ConfigError, match="model name"):
    convert.import_state_dict(sd)


# --- timm: the peer's own model functions ---------------------------------------------------------


def _timm_args(name) -> dict:
  """The keyword arguments timm's model function ``name`` passes to its VisionTransformer
  (captured, no model built), plus ``img_size`` from its default pretrained config."""
  import timm.models.deit as deit_mod
  import timm.models.vision_transformer as vit_mod
  captured = {}

  def capture(cls, variant, pretrained, **kw):
    captured.update(kw)

  with mock.patch.object(vit_mod, "build_model_with_cfg", capture), \
       mock.patch.object(deit_mod, "build_model_with_cfg", capture):
    timm.models.model_entrypoint(name)(pretrained=False)
  params = inspect.signature(vit_mod.VisionTransformer).parameters
  args = {k: v for k, v in captured.items() if k in params}
  args.setdefault("img_size", timm.models.get_pretrained_cfg(name).input_size[-1])
  return args


def _timm_arch(args) -> tuple:
  """(width, depth, heads, patch, mlp_dim, pre_norm, eps, activation, image size)."""
  eps = getattr(args.get("norm_layer"), "keywords", {}).get("eps", 1e-6)
  act = {"quick_gelu": "quick_gelu"}.get(args.get("act_layer"), "gelu")
  w = args["embed_dim"]
  return (w, args["depth"], args["num_heads"], args["patch_size"],
          int(w * args.get("mlp_ratio", 4.0)), args.get("pre_norm", False), eps, act,
          args["img_size"])


def test_timm_table_is_timm_definitions():
  names = [n for n, f in mappings.MODELS.items() if f == "timm_vit"]
  assert {"vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224",
          "vit_huge_patch14_224", "vit_huge_patch14_clip_224"} <= set(names)
  for name in names:
    args, spec = _timm_args(name), mappings.named_spec(name)
    kw = spec["kwargs"]
    assert not set(args) - {"img_size", "patch_size", "embed_dim", "depth", "num_heads",
                            "mlp_ratio", "pre_norm", "norm_layer", "act_layer"}, (name, args)
    assert _timm_arch(args) == (
        kw["width"], kw["depth"], kw["num_heads"], kw["patch_size"], kw["mlp_dim"], kw["ln_pre"],
        kw["ln_eps"], kw["activation"], spec["image_size"]), name
    assert kw["patch_bias"] == (not kw["ln_pre"])  # timm: bias=not pre_norm


# Head width 64 (S), 80 (H/14 and its CLIP tower with QuickGELU), 88 with MLP ratio 48/11 (giant
# CLIP), 104 with 64/13 (gigantic CLIP = bigG).
TIMM_FAMILIES = ["vit_small_patch16_224", "vit_huge_patch14_224",
                 "vit_huge_patch14_clip_quickgelu_224", "vit_giant_patch14_clip_224",
                 "vit_gigantic_patch14_clip_224"]


@pytest.mark.parametrize("name", TIMM_FAMILIES)
def test_timm_family_parity_both_directions(name):
  import timm.models.vision_transformer as vit_mod
  args = _timm_args(name)
  head_width = args["embed_dim"] // args["num_heads"]
  args.update(depth=2, num_heads=4, embed_dim=4 * head_width, img_size=2 * args["patch_size"])
  torch.manual_seed(0)
  model = _perturb(vit_mod.VisionTransformer(**args, num_classes=0))
  sd = _sd(model)
  spec, flat = convert.import_state_dict(sd, spec=_reduced_spec(name, 4))
  images = _images(2, spec["image_size"])
  with torch.no_grad():
    peer = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  ours = np.asarray(jax.jit(core.build_from_spec(spec).apply)(core.unflatten(flat), images))
  assert _rel_err(ours, peer) < 1e-5
  back = convert.export_state_dict("timm_vit", spec, flat)
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_timm_full_size_tensor_map():
  with torch.device("meta"):
    model = timm.create_model("vit_huge_patch14_clip_224", pretrained=False)
  spec, flat = convert.import_state_dict(_shape_only_sd(model), "vit_huge_patch14_clip_224.laion2b")
  assert spec["kwargs"]["num_heads"] == 16 and spec["kwargs"]["width"] == 1280
  assert len(flat) == len(model.state_dict()) - 2  # head.weight, head.bias: the classifier


def test_torchvision_resnet50_full_size_parity():
  torch.manual_seed(0)
  model = torchvision.models.resnet50()
  with torch.no_grad():  # non-trivial BN statistics and affine terms
    for mod in model.modules():
      if isinstance(mod, torch.nn.BatchNorm2d):
        mod.running_mean.normal_(0, 0.1)
        mod.running_var.uniform_(0.5, 1.5)
        mod.weight.uniform_(0.5, 1.0)
        mod.bias.normal_(0, 0.1)
  model.fc = torch.nn.Identity()
  model.eval()
  spec, flat = convert.import_state_dict(_sd(model), "resnet50")
  images = _images(2, 64)
  with torch.no_grad():
    peer = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  ours = np.asarray(jax.jit(core.build_from_spec(spec).apply)(core.unflatten(flat), images))
  assert np.max(np.abs(ours - peer)) < 1e-3 * max(1.0, np.abs(peer).max())
  back = convert.export_state_dict("torchvision_resnet", spec, flat)
  for k in back:
    np.testing.assert_array_equal(back[k], _sd(model)[k], err_msg=k)


def test_import_errors_name_the_tensor():
  model, spec = _small_openclip()
  sd = _sd(model)
  missing = dict(sd)
  del missing["visual.ln_pre.bias"]
  with pytest.raises(ValueError, match=r"missing tensors \['visual.ln_pre.bias'\]"):
    convert.import_state_dict(missing, spec=spec)
  extra = {**sd, "visual.surprise": np.zeros(3, np.float32)}
  with pytest.raises(ValueError, match=r"unexpected tensors \['visual.surprise'\]"):
    convert.import_state_dict(extra, spec=spec)
  bad = {**sd, "visual.transformer.resblocks.1.mlp.c_fc.bias": np.zeros(7, np.float32)}
  with pytest.raises(ValueError, match=r"visual.transformer.resblocks.1.mlp.c_fc.bias"):
    convert.import_state_dict(bad, spec=spec)
  rn = {"visual.layer1.0.conv1.weight": np.zeros((64, 64, 1, 1), np.float32)}
  with pytest.raises(ValueError, match="ModifiedResNet"):
    convert.import_state_dict(rn, "ViT-B-32")


def test_converted_file_records_the_peer_and_torch_pickle(tmp_path):
  model, spec = _small_openclip()
  sd = _sd(model)
  pt = tmp_path / "peer.pt"
  torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, pt)
  from contrastive_jax.convert import tensor_io
  read, _ = tensor_io.read_tensors(str(pt))
  assert set(read) == set(sd)
  spec, flat = convert.import_state_dict(read, spec=spec)
  path = str(tmp_path / "ours.safetensors")
  convert.save_converted(path, spec, flat)
  meta = core.read_metadata(path)
  assert (meta["format"], meta["peer_model"], meta["version"]) == (
      "open_clip", "ViT-B-16 (reduced)", core.FILE_VERSION)
  spec2, flat2 = convert.load_converted(path)
  assert spec2 == spec == meta["spec"]
  for k in flat:
    np.testing.assert_array_equal(flat2[k], np.asarray(flat[k]))
  # the safetensors package (peer's reader) reads our file
  from safetensors.numpy import load_file
  theirs = load_file(path)
  np.testing.assert_array_equal(theirs["params/logit_scale"], flat["params/logit_scale"])


def test_check_against_model_refuses_what_shapes_cannot_show(tmp_path):
  """H/14's image tower (4 heads of 80 here): loading it into a model with the old guess
  width // 64 = 5 heads, or with QuickGELU, has the right shapes and the wrong function."""
  from contrastive_jax.models import build_model
  model, spec = _small_openclip("ViT-H-14", heads=4)
  spec, flat = convert.import_state_dict(_sd(model), spec=spec)
  path = str(tmp_path / "h14.safetensors")
  convert.save_converted(path, spec, flat)
  right = core.build_from_spec(spec)
  core.check_against_model(path, right)  # passes
  iv = spec["image_kwargs"]
  guessed = core.build_from_spec({**spec, "image_kwargs": {**iv, "num_heads": 5}})
  with pytest.raises(ConfigError, match=r"image_encoder.num_heads: file 4, config 5"):
    core.check_against_model(path, guessed)
  # init_from refuses it before touching the state (no optimizer or state needed to see it).
  from types import SimpleNamespace
  from contrastive_jax.convert import init as init_lib
  config = SimpleNamespace(init_from=SimpleNamespace(path=path, patterns=(), prefix=""))
  with pytest.raises(ConfigError, match=r"image_encoder.num_heads: file 4, config 5"):
    init_lib.load_params(config, None, guessed)
  quick = core.build_from_spec({**spec, "text_kwargs": {**spec["text_kwargs"],
                                                        "activation": "quick_gelu"}})
  with pytest.raises(ConfigError, match=r"text_encoder.activation: file 'gelu'"):
    core.check_against_model(path, quick)
  # Only the towers that receive weights are checked (LiT loads the image tower alone).
  core.check_against_model(path, quick, ["params/image_encoder/ln_pre/scale"])
  # An encoder file placed in a CLIP tower with init_from.prefix.
  tmodel = _perturb(timm.models.vision_transformer.VisionTransformer(
      img_size=28, patch_size=14, embed_dim=320, depth=2, num_heads=4, num_classes=0))
  tspec, tflat = convert.import_state_dict(_sd(tmodel),
                                           spec=_reduced_spec("vit_huge_patch14_224", 4))
  tpath = str(tmp_path / "timm.safetensors")
  convert.save_converted(tpath, tspec, tflat)
  clip = core.build_from_spec({**spec, "image_model": "vit", "image_kwargs": {
      **tspec["kwargs"], "num_heads": 5}})
  with pytest.raises(ConfigError, match="image_encoder.num_heads: file 4, config 5"):
    core.check_against_model(tpath, clip, ["params/image_encoder/cls_token"], "image_encoder/")
  core.check_against_model(tpath, build_model("vit", **tspec["kwargs"]))


def test_older_files_warn_and_upgrade(tmp_path, caplog):
  """A file of the older format (no peer name) loads with a warning naming the upgrade, is not
  jax-exported, and ``upgrade`` rewrites it checked against the name."""
  from contrastive_jax.convert import __main__ as cli, tensor_io
  model, spec = _small_openclip()
  spec, flat = convert.import_state_dict(_sd(model), spec=spec)
  old = str(tmp_path / "old.safetensors")
  old_spec = {k: v for k, v in spec.items() if k != "peer"}
  tensor_io.write_safetensors(old, flat, {core.SPEC_KEY: json.dumps(old_spec),
                                          core.FORMAT_KEY: "open_clip"})
  with caplog.at_level("WARNING"):
    convert.load_converted(old)
    core.check_against_model(old, core.build_from_spec(spec))
  assert sum("convert upgrade --model NAME" in r.getMessage() for r in caplog.records) == 2
  assert cli.main(["jax-export", "--input", old, "--tower", "image",
                   "--output", str(tmp_path / "x")]) == 2
  # upgrade checks the name: this reduced file is no published model
  new = str(tmp_path / "new.safetensors")
  assert cli.main(["upgrade", "--model", "ViT-B-16", "--input", old, "--output", new]) == 2
  (tmp_path / "spec.json").write_text(json.dumps(spec))
  assert cli.main(["upgrade", "--spec", str(tmp_path / "spec.json"), "--input", old,
                   "--output", new]) == 0
  assert core.read_metadata(new)["version"] == core.FILE_VERSION
  spec2, flat2 = convert.load_converted(new)
  assert spec2 == spec
  for k in flat:
    np.testing.assert_array_equal(flat2[k], np.asarray(flat[k]), err_msg=k)


def test_cli_import_export_and_jax_export(tmp_path):
  """The CLI round trip on a safetensors file written by the peer's own ``safetensors``, and the
  serialized jax.export towers equal the open_clip embeddings."""
  from safetensors.torch import save_file
  from contrastive_jax.convert import __main__ as cli, export
  model, spec = _small_openclip()
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "peer.safetensors")
  ours, back = str(tmp_path / "ours.safetensors"), str(tmp_path / "back.safetensors")
  (tmp_path / "spec.json").write_text(json.dumps(spec))
  peer = str(tmp_path / "peer.safetensors")
  assert cli.main(["import", "--spec", str(tmp_path / "spec.json"), "--input", peer,
                   "--output", ours]) == 0
  assert cli.main(["export", "--input", ours, "--output", back]) == 0
  from safetensors.numpy import load_file
  sd, again = _sd(model), load_file(back)
  assert set(again) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(again[k], sd[k], err_msg=k)
  images, tokens = _images(3, 32), _small_texts(3)
  peer_img, peer_txt = _peer_clip(model, images, tokens)
  for tower, x, want in (("image", images, peer_img), ("text", tokens.astype(np.int32), peer_txt)):
    path = str(tmp_path / f"{tower}.jaxexport")
    assert cli.main(["jax-export", "--input", ours, "--tower", tower, "--output", path]) == 0
    got = np.asarray(export.load_tower(path).call(x))
    assert np.max(np.abs(got - want)) < ATOL_EMB
  # The older interface (an activation flag deciding silently) is refused with the fix.
  assert cli.main(["import", "--format", "open_clip", "--activation", "quick_gelu", "--input",
                   peer, "--output", back]) == 2
  assert cli.main(["import", "--model", "ViT-B-32", "--input", peer, "--output", back]) == 2


def test_zero_shot_logits_equal_open_clip():
  """Our zero-shot evaluator (prompt-ensembled class embeddings, CLIP BPE tokens) on converted
  weights gives open_clip's zero-shot logits (its own tokenizer and encoders, same recipe)."""
  pytest.importorskip("ftfy")
  from contrastive_jax.data import clip_bpe
  from contrastive_jax.evaluate import zero_shot
  model, spec = _small_openclip("ViT-B-16-quickgelu", small_text=False)
  spec, flat = convert.import_state_dict(_sd(model), spec=spec)
  ours = core.build_from_spec(spec)
  variables = core.unflatten({k: jnp.asarray(v) for k, v in flat.items()})
  names, templates = ["cat", "dog", "traffic light"], ["a photo of a {}.", "a drawing of the {}!"]
  tok = clip_bpe.ClipBPETokenizer(clip_bpe.default_vocab_path())
  text_fn = jax.jit(lambda t: ours.apply(variables, t, method=CLIP.encode_text))
  class_emb = zero_shot.class_text_embeddings(text_fn, tok.encode, names, templates)
  images = _images(4, 32)
  img = np.asarray(ours.apply(variables, images, method=CLIP.encode_image))
  logits = np.exp(float(flat["params/logit_scale"])) * img @ class_emb.T

  peer_tok = open_clip.get_tokenizer("ViT-B-32")
  with torch.no_grad():
    rows = []
    for n in names:
      e = model.encode_text(peer_tok([t.format(n) for t in templates]), normalize=True)
      e = e.mean(0)
      rows.append(e / e.norm())
    peer_img = model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2)), normalize=True)
    peer = (model.logit_scale.exp() * peer_img @ torch.stack(rows).T).numpy()
  assert np.max(np.abs(logits - peer)) < 1e-3  # logits ~ scale 14.3 x cosine
