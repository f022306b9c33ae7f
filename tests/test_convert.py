"""Parity of converted peer weights (open_clip, timm, torchvision) with the peers' own forward.

Needs torch and the peer libraries (requirements-test.txt, installed by scripts/test.sh); the
tests skip cleanly without them. Random initialisation of the peers' models stands in for
published weights (no download). Tolerance: max |ours - peer| <= 1e-5 on L2-normalised float32
embeddings (unit vectors; float32 matmul and LayerNorm summation order differ), 1e-3 on the
un-normalised ResNet-50 features (magnitudes ~1; 53 conv/BN layers). Full-size numerics for
ViT-B/32 CLIP, timm ViT-Ti/16 and ResNet-50; ViT-B/16 and ViT-L/14 CLIP and DeiT-S are checked
at full size for the complete tensor map and shapes (meta-device peer models, zero-stride
arrays) and numerically on 2-layer models of the same family.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from contrastive_jax import convert  # noqa: E402
from contrastive_jax.convert import core  # noqa: E402
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


def _texts(n, length=77, seed=1):
  """SOT, random ids, EOT (the largest id, where open_clip's argmax pools), zero padding."""
  rng = np.random.default_rng(seed)
  out = np.zeros((n, length), np.int64)
  for i, k in enumerate(rng.integers(3, 20, n)):
    out[i, 0] = 49406
    out[i, 1:k] = rng.integers(1, 49405, k - 1)
    out[i, k] = 49407
  return out


def _peer_clip(model, images, tokens):
  with torch.no_grad():
    img = model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2)), normalize=True)
    txt = model.encode_text(torch.from_numpy(tokens), normalize=True)
  return img.numpy(), txt.numpy()


def _ours_clip(spec, flat, images, tokens):
  model = core.build_from_spec(spec)
  variables = core.unflatten({k: jnp.asarray(v) for k, v in flat.items()})
  img = jax.jit(lambda v, x: model.apply(v, x, method=CLIP.encode_image))(variables, images)
  txt = jax.jit(lambda v, t: model.apply(v, t, method=CLIP.encode_text))(
      variables, tokens.astype(np.int32))
  return np.asarray(img), np.asarray(txt)


def _small_openclip(patch, width, quick_gelu, image_size):
  torch.manual_seed(0)
  m = open_clip.model.CLIP(
      embed_dim=48, quick_gelu=quick_gelu,
      vision_cfg=dict(image_size=image_size, layers=2, width=width, patch_size=patch,
                      mlp_ratio=4.0),
      text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=2))
  return m.eval()


def test_openclip_vit_b32_full_size_parity_and_round_trip():
  torch.manual_seed(0)
  model = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).eval()
  sd = _sd(model)
  spec, flat = convert.import_state_dict("open_clip", sd, activation="quick_gelu")
  assert spec["image_kwargs"]["width"] == 768 and spec["embed_dim"] == 512
  images, tokens = _images(2, 224), _texts(3)
  peer_img, peer_txt = _peer_clip(model, images, tokens)
  img, txt = _ours_clip(spec, flat, images, tokens)
  assert np.max(np.abs(img - peer_img)) < ATOL_EMB
  assert np.max(np.abs(txt - peer_txt)) < ATOL_EMB
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
  _, flat2 = convert.import_state_dict("open_clip", back, activation="quick_gelu")
  for k in flat:
    np.testing.assert_array_equal(np.asarray(flat2[k]), np.asarray(flat[k]), err_msg=k)


@pytest.mark.parametrize("patch,width,quick_gelu,image_size", [
    (16, 128, False, 32),   # ViT-B/16 family (GELU, as open_clip's non-quickgelu models)
    (14, 128, True, 28),    # ViT-L/14 family (QuickGELU, as OpenAI's weights)
])
def test_openclip_reduced_parity(patch, width, quick_gelu, image_size):
  model = _small_openclip(patch, width, quick_gelu, image_size)
  spec, flat = convert.import_state_dict(
      "open_clip", _sd(model), activation="quick_gelu" if quick_gelu else "gelu")
  images, tokens = _images(2, image_size), _texts(2)
  peer_img, peer_txt = _peer_clip(model, images, tokens)
  img, txt = _ours_clip(spec, flat, images, tokens)
  assert np.max(np.abs(img - peer_img)) < ATOL_EMB
  assert np.max(np.abs(txt - peer_txt)) < ATOL_EMB


@pytest.mark.parametrize("name,width,depth,patch", [
    ("ViT-B-16", 768, 12, 16), ("ViT-L-14", 1024, 24, 14)])
def test_openclip_full_size_tensor_map(name, width, depth, patch):
  model = open_clip.create_model(name, pretrained=None, device="meta")
  spec, flat = convert.import_state_dict("open_clip", _shape_only_sd(model), activation="gelu")
  iv = spec["image_kwargs"]
  assert (iv["width"], iv["depth"], iv["patch_size"]) == (width, depth, patch)
  assert len(flat) == len(model.state_dict())  # every tensor mapped, nothing dropped


def test_timm_vit_tiny_full_size_parity():
  torch.manual_seed(0)
  model = timm.create_model("vit_tiny_patch16_224.augreg_in21k", pretrained=False,
                            num_classes=0).eval()
  spec, flat = convert.import_state_dict("timm_vit", _sd(model))
  images = _images(2, 224)
  with torch.no_grad():
    peer = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  ours = jax.jit(core.build_from_spec(spec).apply)(core.unflatten(flat), images)
  assert np.max(np.abs(np.asarray(ours) - peer)) < 1e-4 * max(1.0, np.abs(peer).max())


def test_timm_deit_small_full_size_tensor_map():
  with torch.device("meta"):
    model = timm.create_model("deit_small_patch16_224", pretrained=False)
  spec, flat = convert.import_state_dict("timm_vit", _shape_only_sd(model))
  assert spec["kwargs"]["width"] == 384 and spec["kwargs"]["num_heads"] == 6
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
  spec, flat = convert.import_state_dict("torchvision_resnet", _sd(model))
  images = _images(2, 64)
  with torch.no_grad():
    peer = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  ours = np.asarray(jax.jit(core.build_from_spec(spec).apply)(core.unflatten(flat), images))
  assert np.max(np.abs(ours - peer)) < 1e-3 * max(1.0, np.abs(peer).max())
  back = convert.export_state_dict("torchvision_resnet", spec, flat)
  for k in back:
    np.testing.assert_array_equal(back[k], _sd(model)[k], err_msg=k)


def test_import_errors_name_the_tensor():
  model = _small_openclip(16, 128, False, 32)
  sd = _sd(model)
  missing = dict(sd)
  del missing["visual.ln_pre.bias"]
  with pytest.raises(ValueError, match=r"missing tensors \['visual.ln_pre.bias'\]"):
    convert.import_state_dict("open_clip", missing, activation="gelu")
  extra = {**sd, "visual.surprise": np.zeros(3, np.float32)}
  with pytest.raises(ValueError, match=r"unexpected tensors \['visual.surprise'\]"):
    convert.import_state_dict("open_clip", extra, activation="gelu")
  bad = {**sd, "visual.transformer.resblocks.1.mlp.c_fc.bias": np.zeros(7, np.float32)}
  with pytest.raises(ValueError, match=r"visual.transformer.resblocks.1.mlp.c_fc.bias"):
    convert.import_state_dict("open_clip", bad, activation="gelu")
  with pytest.raises(ValueError, match="ModifiedResNet"):
    rn50 = open_clip.create_model("RN50", pretrained=None, device="meta")
    convert.import_state_dict("open_clip", _shape_only_sd(rn50), activation="quick_gelu")


def test_converted_file_and_torch_pickle(tmp_path):
  model = _small_openclip(16, 128, False, 32)
  sd = _sd(model)
  pt = tmp_path / "peer.pt"
  torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, pt)
  from contrastive_jax.convert import tensor_io
  read, _ = tensor_io.read_tensors(str(pt))
  assert set(read) == set(sd)
  spec, flat = convert.import_state_dict("open_clip", read, activation="gelu")
  convert.save_converted(str(tmp_path / "ours.safetensors"), spec, flat, "open_clip")
  spec2, flat2 = convert.load_converted(str(tmp_path / "ours.safetensors"))
  assert spec2 == spec
  for k in flat:
    np.testing.assert_array_equal(flat2[k], np.asarray(flat[k]))
  # the safetensors package (peer's reader) reads our file
  from safetensors.numpy import load_file
  theirs = load_file(str(tmp_path / "ours.safetensors"))
  np.testing.assert_array_equal(theirs["params/logit_scale"], flat["params/logit_scale"])


def test_cli_import_export_and_jax_export(tmp_path):
  """The CLI round trip on a safetensors file written by the peer's own ``safetensors``, and the
  serialized jax.export towers equal the open_clip embeddings."""
  from safetensors.torch import save_file
  from contrastive_jax.convert import __main__ as cli, export
  model = _small_openclip(16, 128, False, 32)
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "peer.safetensors")
  ours, back = str(tmp_path / "ours.safetensors"), str(tmp_path / "back.safetensors")
  assert cli.main(["import", "--format", "open_clip", "--activation", "gelu", "--input",
                   str(tmp_path / "peer.safetensors"), "--output", ours]) == 0
  assert cli.main(["export", "--format", "open_clip", "--input", ours, "--output", back]) == 0
  from safetensors.numpy import load_file
  sd, again = _sd(model), load_file(back)
  assert set(again) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(again[k], sd[k], err_msg=k)
  images, tokens = _images(3, 32), _texts(3)
  peer_img, peer_txt = _peer_clip(model, images, tokens)
  for tower, x, want in (("image", images, peer_img), ("text", tokens.astype(np.int32), peer_txt)):
    path = str(tmp_path / f"{tower}.jaxexport")
    assert cli.main(["jax-export", "--input", ours, "--tower", tower, "--output", path]) == 0
    got = np.asarray(export.load_tower(path).call(x))
    assert np.max(np.abs(got - want)) < ATOL_EMB
  assert cli.main(["import", "--format", "open_clip", "--input", ours, "--output", back]) == 2


def test_zero_shot_logits_equal_open_clip():
  """Our zero-shot evaluator (prompt-ensembled class embeddings, CLIP BPE tokens) on converted
  weights gives open_clip's zero-shot logits (its own tokenizer and encoders, same recipe)."""
  pytest.importorskip("ftfy")
  from contrastive_jax.data import clip_bpe
  from contrastive_jax.evaluate import zero_shot
  model = _small_openclip(16, 128, True, 32)
  spec, flat = convert.import_state_dict("open_clip", _sd(model), activation="quick_gelu")
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
