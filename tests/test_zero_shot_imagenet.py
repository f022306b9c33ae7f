"""Zero-shot ImageNet of a converted file, one command (evaluate/zero_shot_imagenet.py), on
``tfds.testing.mock_data`` with a tiny CLIP: the command's top-1 equals the plain computation
(``model.apply`` on the same images and prompts, ``zero_shot.zero_shot_accuracy``), the
weights are loaded sharded (FSDP, no whole read of the file), and a non-CLIP file is refused."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

pytest.importorskip("regex")
pytest.importorskip("ftfy")
from contrastive_jax.data import clip_bpe  # noqa: E402

if not clip_bpe.default_vocab_path():
  pytest.skip("needs the CLIP BPE vocabulary (an installed open_clip)", allow_module_level=True)

import tensorflow_datasets as tfds  # noqa: E402

from contrastive_jax.convert import core, tensor_io  # noqa: E402
from contrastive_jax.data import pipeline  # noqa: E402
from contrastive_jax.evaluate import class_names, zero_shot, zero_shot_imagenet  # noqa: E402
from contrastive_jax.models import CLIP  # noqa: E402

TEMPLATES = ("a photo of a {}.", "a drawing of a {}.")
SPEC = dict(kind="clip", image_model="vit", embed_dim=16, image_size=16, logit_scale_shape=[],
            image_kwargs=dict(patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64,
                              pool="cls", posemb="learn", ln_pre=True, patch_bias=False,
                              ln_eps=1e-5, activation="gelu"),
            text_kwargs=dict(vocab_size=49_408, context_length=77, width=32, depth=1,
                             num_heads=2, mlp_dim=64, eot_id=None, ln_eps=1e-5,
                             activation="gelu"))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  model = core.build_from_spec(SPEC)
  variables = model.init(jax.random.key(3), *core.example_inputs(SPEC), train=False)
  path = str(tmp_path_factory.mktemp("w") / "tiny_clip.safetensors")
  core.save_converted(path, SPEC, {k: np.asarray(v) for k, v in
                                   core.flatten(dict(variables)).items()}, "open_clip")
  return path, variables


def test_one_command_matches_the_plain_computation(weights, tmp_path, monkeypatch):
  path, variables = weights
  out = tmp_path / "zs.json"

  def no_full_read(*a, **k):
    raise AssertionError("the weights were read whole")

  seen = {}
  hits = zero_shot.zero_shot_hits

  def spy_hits(image_emb, class_emb, labels, **kw):
    seen.update(image_emb=image_emb, class_emb=class_emb, labels=labels)
    return hits(image_emb, class_emb, labels, **kw)

  with tfds.testing.mock_data(num_examples=24):
    monkeypatch.setattr(tensor_io, "read_safetensors", no_full_read)
    monkeypatch.setattr(zero_shot, "zero_shot_hits", spy_hits)
    rc = zero_shot_imagenet.main(["--weights", path, "--batch_size", "8", "--templates",
                                  "|".join(TEMPLATES), "--out", str(out)])
    monkeypatch.undo()
    assert rc == 0
    got = json.loads(out.read_text())["results"]
    # The same numbers by hand: the first 24 validation images, the 1,000 classes.
    config = zero_shot_imagenet.weights_config(SPEC, path, batch_size=8, templates=TEMPLATES)
    images, labels = [], []
    for b in pipeline.eval_iterator(config.data, "validation", 8):
      images.append(np.asarray(b["image"])[b["mask"]])
      labels.append(np.asarray(b["label"])[b["mask"]])
  images, labels = np.concatenate(images), np.concatenate(labels)
  assert len(labels) == 24
  model = core.build_from_spec(SPEC)
  tok = pipeline.make_tokenizer(config.data)
  encode_text = jax.jit(lambda t: model.apply(variables, t, method=CLIP.encode_text))
  classes = zero_shot.class_text_embeddings(encode_text, tok.encode,
                                            class_names.imagenet_class_names(), TEMPLATES)
  image_emb = model.apply(variables, images, method=CLIP.encode_image)
  want = zero_shot.zero_shot_accuracy(np.asarray(image_emb), classes, labels)
  # A random model's accuracies are ~0 either way: compare what they are computed from.
  np.testing.assert_array_equal(seen["labels"], labels)
  np.testing.assert_allclose(seen["class_emb"], classes, atol=2e-6)
  np.testing.assert_allclose(seen["image_emb"], image_emb, atol=2e-6)
  assert set(got) == {"top1", "top5"}
  for k in got:
    assert got[k] == pytest.approx(want[k], abs=1e-9), (k, got, want)


def test_refuses_a_file_that_is_not_a_clip(tmp_path, capsys):
  path = str(tmp_path / "enc.safetensors")
  core.save_converted(path, {"kind": "encoder", "name": "vit", "kwargs": {}, "image_size": 16},
                      {"params/cls_token": np.zeros((1, 1, 8), np.float32)})
  assert zero_shot_imagenet.main(["--weights", path]) == 2
  assert "zero-shot needs a CLIP" in capsys.readouterr().err


def test_convert_from_runs_the_importer_first(tmp_path, monkeypatch):
  """``--convert_from`` hands the peer file to ``convert import`` (process 0) before loading."""
  from contrastive_jax.convert import __main__ as convert_cli
  calls = []
  monkeypatch.setattr(convert_cli, "main", lambda argv: calls.append(argv) or 0)
  monkeypatch.setattr(zero_shot_imagenet, "evaluate_weights",
                      lambda weights, **kw: calls.append(weights) or {"top1": 0.5})
  assert zero_shot_imagenet.main(["--weights", str(tmp_path / "w.safetensors"), "--convert_from",
                                  "peer.safetensors", "--model", "ViT-B-32-quickgelu"]) == 0
  assert calls == [["import", "--model", "ViT-B-32-quickgelu", "--input", "peer.safetensors",
                    "--output", str(tmp_path / "w.safetensors")],
                   str(tmp_path / "w.safetensors")]
  # Without the model name it refuses (the name fixes what a state dict cannot show).
  assert zero_shot_imagenet.main(["--weights", str(tmp_path / "w.safetensors"), "--convert_from",
                                  "peer.safetensors"]) == 2
