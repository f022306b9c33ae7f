"""Config-declared evaluators (evaluate/runner.py), CLIP's ImageNet prompts, 1 vs 2 processes."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from contrastive_jax.configs import simclr_mnist
from contrastive_jax.errors import ConfigError
from contrastive_jax.evaluate import class_names, runner, zero_shot

import test_multihost

HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------- ImageNet prompts


def test_imagenet_names_templates_and_tfds_label_order():
  names, templates, wnids = (class_names.imagenet_class_names(), class_names.imagenet_templates(),
                             class_names.imagenet_wnids())
  assert len(names) == 1000 and len(templates) == 80 and len(set(templates)) == 80
  assert all(t.count("{}") == 1 for t in templates)
  # The released list names two synset pairs alike; every other name is distinct.
  dup = sorted({n for n in names if names.count(n) > 1})
  assert dup == ["missile", "sunglasses"] and len(set(names)) == 998
  assert [wnids[i] for i, n in enumerate(names) if n in dup] == [
      "n03773504", "n04008634", "n04355933", "n04356056"]
  # Label order = tfds imagenet2012's labels.txt (the ClassLabel the ImageNet variants share).
  labels_txt = os.path.join(os.path.dirname(tfds.__file__), "datasets", "imagenet2012",
                            "labels.txt")
  with open(labels_txt) as f:
    assert wnids == f.read().split()
  assert (names[0], wnids[0]) == ("tench", "n01440764")
  assert (names[999], wnids[999]) == ("toilet paper", "n15075141")
  sub_names, label_map = class_names.wnid_subset(["n15075141", "n01440764"])
  assert sub_names == ["toilet paper", "tench"]
  assert label_map[999] == 0 and label_map[0] == 1 and (label_map >= 0).sum() == 2


def test_imagenet_zero_shot_prompts():
  spec = {"classes": "imagenet", "templates": "clip"}
  names, prompts = runner.zero_shot_prompts(None, spec)
  assert len(names) == 1000 and len(prompts) == 1000 and len(prompts[0]) == 80
  assert prompts[0][0] == class_names.imagenet_templates()[0].format("tench")
  with pytest.raises(ConfigError, match="no '\\{\\}'"):
    runner.zero_shot_prompts(None, {"classes": "imagenet", "templates": ("a photo",)})


def test_class_embedding_is_normalised_mean_of_normalised_templates():
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(3, 4, 5)) * rng.uniform(0.1, 10.0, size=(3, 4, 1))  # unequal norms
  ref = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
  ref = ref.mean(axis=1)
  ref /= np.linalg.norm(ref, axis=-1, keepdims=True)
  np.testing.assert_allclose(zero_shot.ensemble_class_embeddings(emb.astype(np.float32)), ref,
                             rtol=1e-5, atol=1e-6)
  # Not the mean of raw embeddings (a long template would dominate).
  raw = emb.mean(axis=1)
  raw /= np.linalg.norm(raw, axis=-1, keepdims=True)
  assert not np.allclose(raw, ref, atol=1e-3)


# ----------------------------------------------------------------------------- specs


def test_default_specs_keep_the_embedded_metric_names():
  c = simclr_mnist.get_config("quick")
  c.eval.every_steps = 7
  specs = runner.specs_of(c, "views")
  assert {n: s["type"] for n, s in specs.items()} == {
      "knn": "knn", "linear": "linear_probe", "few": "few_label"}
  assert specs["knn"]["every_steps"] == 7 and specs["linear"]["every_steps"] == 0
  assert specs["knn"]["k"] == c.eval.knn_k and specs["few"]["shots"] == tuple(c.eval.few_shots)
  text = runner.specs_of(c, "image_text")
  assert text["zero_shot"]["type"] == "zero_shot" and text["retrieval"]["ks"] == (1, 5)


@pytest.mark.parametrize("evals, match", [
    ({"x": {"type": "nope"}}, "type='nope' is unknown"),
    ({"x": {"type": "knn", "shots": (1,)}}, "unknown key"),
    ({"x": {"type": "knn", "data": {"eval_splt": "test"}}}, "config.data does not"),
    ({"x": {"type": "knn", "every_steps": -1}}, "every_steps"),
])
def test_bad_specs_name_the_key(evals, match):
  c = simclr_mnist.get_config("quick")
  c.evals = evals
  with pytest.raises(ConfigError, match=match):
    runner.specs_of(c, "views")


def test_evaluator_data_overrides_config_data():
  c = simclr_mnist.get_config("quick")
  c.evals = {"v2": {"type": "knn", "data": {"eval_split": "train", "image_size": 32}}}
  spec = runner.specs_of(c, "views")["v2"]
  data = runner.data_config(c, spec)
  assert data.eval_split == "train" and data.image_size == 32
  assert data.source == c.data.source and c.data.eval_split == "test"  # the run's untouched


# ----------------------------------------------------------------------------- 1 vs 2 processes


def test_two_processes_give_the_numbers_of_one(tmp_path):
  """Each process reads and encodes only its shard; gathered features, summed hit counts:
  every evaluator's numbers equal a single process's over the same 4 devices."""
  port = test_multihost.free_port()
  worker = os.path.join(HERE, "multihost_eval_worker.py")
  out1, out2 = tmp_path / "one.json", tmp_path / "two.json"
  # One after the other: on a busy machine a third process can starve the pair's heartbeats.
  test_multihost.run_processes(
      lambda i: [sys.executable, worker, "0", "1", "4", "0", str(out1)], 1)
  test_multihost.run_processes(
      lambda i: [sys.executable, worker, str(i), "2", "2", str(port), str(out2)], 2)
  one, two = json.loads(out1.read_text()), json.loads(out2.read_text())
  assert (one["processes"], two["processes"], one["devices"], two["devices"]) == (1, 2, 4, 4)
  assert set(one["results"]) == set(two["results"])
  assert {"knn/top1", "linear/top1", "zero_shot/top1", "zs_custom/top5",
          "retrieval/text_to_image/R@5"} <= set(one["results"])
  assert one["results"]["knn/top1"] > 0  # not an empty evaluation
  for k, v in one["results"].items():
    np.testing.assert_allclose(two["results"][k], v, rtol=0, atol=1e-6, err_msg=k)


# ----------------------------------------------------------------------------- COCO retrieval


def _recall_float64(img, txt, text_to_image, k):
  """R@K both ways from the definition: an image's best own caption, a caption's own image."""
  img = img.astype(np.float64) / np.linalg.norm(img, axis=1, keepdims=True)
  txt = txt.astype(np.float64) / np.linalg.norm(txt, axis=1, keepdims=True)
  sims = img @ txt.T  # [N_img, N_txt]
  i2t = []
  for i in range(len(img)):
    order = np.argsort(-sims[i], kind="stable")
    i2t.append(np.flatnonzero(text_to_image[order] == i)[0] < k)
  t2i = [np.argsort(-sims[:, t], kind="stable")[:k].tolist().count(text_to_image[t]) > 0
         for t in range(len(txt))]
  return float(np.mean(i2t)), float(np.mean(t2i))


def _mock_coco_captions(num_images):
  """``_as_dataset`` of tfds ``coco_captions`` (encoded images, as under SkipDecoding): image
  ``i`` of a varying size with 5 + i % 3 captions (COCO has 5 to 7); tfds' own random mock
  gives the two fields of its caption sequence different lengths."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(3)
  examples = []
  for i in range(num_images):
    image = rng.integers(0, 255, size=(20 + i % 4, 24, 3), dtype=np.uint8)
    captions = [f"photo {i} caption {j} {'x' * int(rng.integers(0, 9))}"
                for j in range(5 + i % 3)]
    examples.append((tf.io.encode_png(image).numpy(), captions, f"coco_captions-test.{i}"))

  def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    del self, split, decoders, read_config, kwargs
    return tf.data.Dataset.from_generator(
        lambda: ({"image": png, "captions": {"text": caps}, "tfds_id": tid}
                 for png, caps, tid in examples),
        output_signature={"image": tf.TensorSpec([], tf.string),
                          "captions": {"text": tf.TensorSpec([None], tf.string)},
                          "tfds_id": tf.TensorSpec([], tf.string)})
  return as_dataset


def test_coco_retrieval_five_captions_per_image_on_mock_coco_captions():
  import multihost_eval_worker  # the worker's tiny CLIP config  pylint: disable=import-outside-toplevel
  from contrastive_jax import runs  # pylint: disable=import-outside-toplevel
  c = multihost_eval_worker.evaluator_config()
  data = dict(source="tfds", name="coco_captions", eval_split="test", cache=False,
              caption_key="captions/text", captions_per_image=5)
  c.evals = {"coco": dict(type="retrieval", data=data, ks=(1, 5, 10), batch_size=8)}
  with tfds.testing.mock_data(as_dataset_fn=_mock_coco_captions(12)):
    run = runs.build_run(c)
    state = run.init_state()
    evaluators = runner.Runner(c, run.method, run.mesh)
    res = evaluators.run(state, ["coco"])
    spec = evaluators.specs["coco"]
    local = runner.encode_split(evaluators.encoders, state, run.mesh, runner.data_config(c, spec),
                                "test", 8, [("img", "image_embedding", "image"),
                                            ("txt", "text_embedding", "tokens")])
  assert local["tokens"].shape[:2] == (12, 5) and local["txt"].shape[:2] == (12, 5)
  txt = local["txt"].reshape(60, -1)
  for k in (1, 5, 10):
    i2t, t2i = _recall_float64(local["img"], txt, np.repeat(np.arange(12), 5), k)
    assert res[f"coco/image_to_text/R@{k}"] == pytest.approx(i2t, abs=1e-9)
    assert res[f"coco/text_to_image/R@{k}"] == pytest.approx(t2i, abs=1e-9)


def test_imagenet_wnid_subset_prompts():
  wnids = ("n01443537", "n01440764")  # goldfish, tench
  names, prompts = runner.zero_shot_prompts(None, {"classes": "imagenet", "templates": "clip",
                                                   "wnids": wnids})
  assert names == ["goldfish", "tench"] and len(prompts[1]) == 80 and "tench" in prompts[1][0]


# ----------------------------------------------------------------------------- the CLIP configs


def _mock_tfds(num_images):
  """``_as_dataset`` for the image-text configs' evaluators: tfds ImageNet variants (encoded
  images, labels in the 1,000 classes) and ``coco_captions`` (see ``_mock_coco_captions``)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  coco = _mock_coco_captions(num_images)
  rng = np.random.default_rng(4)
  examples = [(tf.io.encode_png(rng.integers(0, 255, size=(18, 22, 3), dtype=np.uint8)).numpy(),
               int(rng.integers(0, 1000)), f"imagenet-validation.{i}") for i in range(num_images)]

  def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    if self.name == "coco_captions":
      return coco(self, split, decoders, read_config, **kwargs)
    return tf.data.Dataset.from_generator(
        lambda: ({"image": png, "label": label, "tfds_id": tid} for png, label, tid in examples),
        output_signature={"image": tf.TensorSpec([], tf.string),
                          "label": tf.TensorSpec([], tf.int64),
                          "tfds_id": tf.TensorSpec([], tf.string)})
  return as_dataset


@pytest.mark.slow  # a trainer run plus the CLI: about a minute on 2 busy cores
def test_clip_config_evaluators_in_the_loop_and_from_the_command_line(tmp_path):
  """The full-scale CLIP config's declaration (ImageNet zero-shot with CLIP's class names, the
  variants, COCO retrieval) on mock tfds data: in the loop (a results JSON per evaluation), at
  the end, and from ``python -m contrastive_jax.evaluate`` with the same numbers."""
  import multihost_eval_worker  # pylint: disable=import-outside-toplevel
  from contrastive_jax import configs, train  # pylint: disable=import-outside-toplevel
  from contrastive_jax.configs import common  # pylint: disable=import-outside-toplevel
  from contrastive_jax.evaluate import __main__ as evaluator  # pylint: disable=import-outside-toplevel
  c = multihost_eval_worker.evaluator_config()
  c.data.source, c.data.name = "mnist", "mnist_embedded"  # train on the embedded digits
  evals = common.image_text_evals("", every_steps=1, subset=8).to_dict()
  for spec in evals.values():
    if spec["type"] == "zero_shot":
      spec["templates"] = ("a photo of a {}.",)  # 1,000 prompts, not 80,000, on a CPU test
  c.evals = evals
  c.eval.batch_size, c.eval.embedding_plot = 8, ""
  configs.apply_overrides(c, {"total_steps": 2, "checkpoint.async_save": False})
  with tfds.testing.mock_data(as_dataset_fn=_mock_tfds(12)):
    summary = train.train_and_evaluate(c, str(tmp_path)).summary
    in_loop = json.loads((tmp_path / "eval" / "step_1.json").read_text())
    assert set(in_loop["evaluators"]) == {"coco", "imagenet_subset"}
    assert {"imagenet_subset/top1", "imagenet_subset/top5", "coco/text_to_image/R@10"} <= set(
        in_loop["results"])
    ev = summary["eval"]
    assert {"imagenet/top1", "imagenet_v2/top5", "imagenet_sketch/top1",
            "coco/image_to_text/R@10"} <= set(ev) and "imagenet_subset/top1" not in ev
    assert json.loads((tmp_path / "eval" / "step_2.json").read_text())["results"] == ev
    assert evaluator.main(["--workdir", str(tmp_path), "--eval=imagenet,coco"]) == 0
  cli = json.loads((tmp_path / "eval_imagenet+coco.json").read_text())["results"]
  assert cli and all(cli[k] == ev[k] for k in cli), (cli, ev)
