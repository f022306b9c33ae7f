"""Config-declared evaluators (evaluate/runner.py, evaluate/evaluators/), CLIP's ImageNet prompts,
1 vs 2 processes."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from contrastive_jax.configs import simclr_mnist
from contrastive_jax.errors import ConfigError
from contrastive_jax.evaluate import class_names, runner, streaming, zero_shot
from contrastive_jax.evaluate.evaluators import zero_shot as zero_shot_evaluator

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
  names, prompts = zero_shot_evaluator.prompts(None, spec)
  assert len(names) == 1000 and len(prompts) == 1000 and len(prompts[0]) == 80
  assert prompts[0][0] == class_names.imagenet_templates()[0].format("tench")
  with pytest.raises(ConfigError, match="no '\\{\\}'"):
    zero_shot_evaluator.prompts(None, {"classes": "imagenet", "templates": ("a photo",)})


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
  assert specs["knn"]["k"] == 200 and specs["few"]["shots"] == (10,)  # the old eval defaults
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
  c.eval.evaluators = evals
  with pytest.raises(ConfigError, match=match):
    runner.specs_of(c, "views")


def test_evaluator_data_overrides_config_data():
  c = simclr_mnist.get_config("quick")
  c.eval.evaluators = {"v2": {"type": "knn", "data": {"eval_split": "train", "image_size": 32}}}
  spec = runner.specs_of(c, "views")["v2"]
  data = streaming.data_config(c, spec)
  assert data.eval_split == "train" and data.image_size == 32
  assert data.source == c.data.source and c.data.eval_split == "test"  # the run's untouched


def test_a_new_evaluator_is_one_registered_module(monkeypatch):
  """The runner has no per-type code: a type registered in ``evaluators.EVALUATORS`` gets its
  settings' defaults, its own checks and its ``run``, under ``<prefix>/<metric>``."""
  import types  # pylint: disable=import-outside-toplevel
  from contrastive_jax import distributed  # pylint: disable=import-outside-toplevel
  from contrastive_jax.evaluate import evaluators  # pylint: disable=import-outside-toplevel

  def check(where, spec):
    if spec["scale"] <= 0:
      raise ConfigError(f"{where}.scale={spec['scale']} must be > 0")

  def run(ctx, state, spec):
    return {"value": spec["scale"] * state, "nested": {"seed": ctx.seed}}, None

  module = types.SimpleNamespace(SETTINGS=dict(scale=2.0), NEEDS_TEXT=False, check=check,
                                 programs=lambda spec, data: [], run=run)
  monkeypatch.setitem(evaluators.EVALUATORS, "scaled", module)
  c = simclr_mnist.get_config("quick")
  c.eval.evaluators = {"mine": dict(type="scaled", prefix="m"), "three": dict(type="scaled",
                                                                           scale=3.0)}
  method = types.SimpleNamespace(input_mode="views", encode=lambda state, x: x)
  evaluators_ = runner.Runner(c, method, distributed.make_mesh(1))
  assert evaluators_.specs["mine"]["batch_size"] == c.eval.batch_size
  assert evaluators_.run(5.0, ["mine", "three"]) == {
      "m/value": 10.0, "m/nested/seed": 0.0, "three/value": 15.0, "three/nested/seed": 0.0}
  c.eval.evaluators = {"bad": dict(type="scaled", scale=-1.0)}
  with pytest.raises(ConfigError, match=r"config\.eval\.evaluators\.bad\.scale=-1\.0 must"):
    runner.specs_of(c, "views")
  c.eval.evaluators = {"bad": dict(type="scaled", k=5)}
  with pytest.raises(ConfigError, match=r"unknown key\(s\) \['k'\] for type 'scaled'"):
    runner.specs_of(c, "views")


@pytest.mark.parametrize("evaluator, match", [
    (dict(type="knn", temperature=0.0), r"temperature=0\.0 must be > 0"),
    (dict(type="linear_probe", l2_grid=()), r"l2_grid=\(\) must be non-empty"),
    (dict(type="linear_probe", val_fraction=1.0), r"val_fraction=1\.0 must be in \(0, 1\)"),
    (dict(type="few_label", shots=(0, 10)), r"shots=\(0, 10\) must be"),
    (dict(type="retrieval", ks=(0,)), r"ks=\(0,\) must be positive"),
])
def test_each_type_checks_its_settings_before_compiling(evaluator, match):
  from contrastive_jax import distributed  # pylint: disable=import-outside-toplevel
  from contrastive_jax.configs import clip_mnist  # pylint: disable=import-outside-toplevel
  c = clip_mnist.get_config("quick")  # image-text: every type applies
  c.eval.evaluators = {"x": evaluator}
  with pytest.raises(ConfigError, match=r"config\.eval\.evaluators\.x\." + match):
    runner.check_config(c, distributed.make_mesh(1))


def test_check_config_names_the_evaluator_batch_and_is_off_with_evaluation():
  from contrastive_jax import distributed  # pylint: disable=import-outside-toplevel
  c = simclr_mnist.get_config("quick")
  c.eval.batch_size = 100
  with pytest.raises(ConfigError, match=r"config\.eval\.evaluators\.knn\.batch_size \(default "
                     r"config\.eval\.batch_size\) of 100 is not divisible by the 8 devices"):
    runner.check_config(c, distributed.make_mesh(8))
  c.eval.enabled = False
  runner.check_config(c, distributed.make_mesh(8))  # evaluation off: nothing to check


def test_a_config_saved_before_the_one_section_keeps_its_evaluators():
  """Saved configs (checkpoints) with ``config.evals`` and ``eval.knn_k`` / ``knn_temperature`` /
  ``few_shots``: the declared evaluators move into ``config.eval.evaluators`` and the old
  defaults fill the settings they left unset, as the old code resolved them."""
  from contrastive_jax import configs  # pylint: disable=import-outside-toplevel
  saved = simclr_mnist.get_config("quick").to_dict()
  saved["eval"] = {"enabled": True, "every_steps": 0, "batch_size": 64, "knn_k": 20,
                   "knn_temperature": 0.1, "few_shots": [1, 5], "raw_pixel_baseline": False,
                   "embedding_plot": ""}
  saved["evals"] = {"a": {"type": "knn"}, "b": {"type": "knn", "k": 7},
                    "c": {"type": "few_label"}}
  c = configs.config_from_json(saved)
  assert "evals" not in c and "knn_k" not in c.eval and c.eval.batch_size == 64
  specs = runner.specs_of(c, "views")
  assert (specs["a"]["k"], specs["a"]["temperature"], specs["b"]["k"]) == (20, 0.1, 7)
  assert specs["c"]["shots"] == (1, 5)
  undeclared = dict(saved, evals={})
  assert not configs.config_from_json(undeclared).eval.evaluators  # the defaults


def test_raw_pixel_baseline_uses_the_runs_few_label_shots():
  c = simclr_mnist.get_config("quick")
  assert runner._few_label_shots(c) == (10,)  # pylint: disable=protected-access
  c.eval.evaluators = {"knn": dict(type="knn"), "few": dict(type="few_label", shots=(1, 5))}
  assert runner._few_label_shots(c) == (1, 5)  # pylint: disable=protected-access


# ----------------------------------------------------------------------------- 1 vs 2 processes


def test_two_processes_give_the_numbers_of_one(tmp_path):
  """Each process reads and encodes only its shard; gathered features, summed hit counts:
  every evaluator's numbers equal a single process's over the same 4 devices."""
  worker = os.path.join(HERE, "multihost_eval_worker.py")
  out1, out2 = tmp_path / "one.json", tmp_path / "two.json"
  karpathy = list(write_karpathy_fixture(tmp_path))  # Flickr30k-format retrieval, 12 images
  # One after the other: on a busy machine a third process can starve the pair's heartbeats.
  test_multihost.run_processes(
      lambda i, port: [sys.executable, worker, "0", "1", "4", "0", str(out1)] + karpathy, 1)
  test_multihost.run_processes(
      lambda i, port: [sys.executable, worker, str(i), "2", "2", str(port), str(out2)] +
      karpathy, 2)
  one, two = json.loads(out1.read_text()), json.loads(out2.read_text())
  assert (one["processes"], two["processes"], one["devices"], two["devices"]) == (1, 2, 4, 4)
  assert set(one["results"]) == set(two["results"])
  assert {"knn/top1", "linear/top1", "zero_shot/top1", "zs_custom/top5",
          "retrieval/text_to_image/R@5", "flickr/image_to_text/R@10"} <= set(one["results"])
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
  c.eval.evaluators = {"coco": dict(type="retrieval", data=data, ks=(1, 5, 10), batch_size=8)}
  with tfds.testing.mock_data(as_dataset_fn=_mock_coco_captions(12)):
    run = runs.build_run(c)
    state = run.init_state()
    evaluators = runner.Runner(c, run.method, run.mesh)
    res = evaluators.run(state, ["coco"])
    spec = evaluators.specs["coco"]
    local = streaming.encode_split(evaluators.encoders, state, run.mesh,
                                   streaming.data_config(c, spec), "test", 8,
                                   [("img", "image_embedding", "image"),
                                    ("txt", "text_embedding", "tokens")])
  assert local["tokens"].shape[:2] == (12, 5) and local["txt"].shape[:2] == (12, 5)
  txt = local["txt"].reshape(60, -1)
  for k in (1, 5, 10):
    i2t, t2i = _recall_float64(local["img"], txt, np.repeat(np.arange(12), 5), k)
    assert res[f"coco/image_to_text/R@{k}"] == pytest.approx(i2t, abs=1e-9)
    assert res[f"coco/text_to_image/R@{k}"] == pytest.approx(t2i, abs=1e-9)


# ----------------------------------------------------------------------------- Karpathy JSON


def write_karpathy_fixture(folder, num_test=12, coco=False):
  """A Karpathy-format split file over real photos (skimage.data, cropped and flipped into
  distinct small JPEGs): ``num_test`` test images with 5 + i % 3 captions, 2 train, 1 val, 1
  restval. ``coco``: entries carry ``filepath`` (``val2014/``) as ``dataset_coco.json`` does.
  Returns ``(json_path, images_dir)``."""
  import skimage.data  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  folder = str(folder)
  photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(),
            skimage.data.rocket()]
  splits = ["test"] * num_test + ["train", "train", "val", "restval"]
  sub = "val2014" if coco else ""
  os.makedirs(os.path.join(folder, "images", sub), exist_ok=True)
  entries = []
  for i, split in enumerate(splits):
    photo = photos[i % len(photos)]
    y, x = 7 * (i // len(photos)), 11 * (i // len(photos))
    crop = photo[y:y + 96 + 4 * (i % 3), x:x + 120]
    crop = crop[:, ::-1] if i % 2 else crop
    name = f"{i:04d}.jpg"
    with open(os.path.join(folder, "images", sub, name), "wb") as f:
      f.write(tf.io.encode_jpeg(np.ascontiguousarray(crop)).numpy())
    entry = {"filename": name, "imgid": 100 + i, "split": split,
             "sentences": [{"raw": f"{i}.{j} a photo", "tokens": []}
                           for j in range(5 + i % 3)]}
    if coco:
      entry["filepath"] = sub
    entries.append(entry)
  path = os.path.join(folder, "dataset_coco.json" if coco else "dataset_flickr30k.json")
  with open(path, "w") as f:
    json.dump({"images": entries, "dataset": "coco" if coco else "flickr30k"}, f)
  return path, os.path.join(folder, "images")


@pytest.mark.parametrize("coco", [False, True])
def test_karpathy_json_retrieval_matches_float64_reference(tmp_path, coco):
  """Flickr30k / COCO Karpathy test split from the JSON file: 12 images (padded last batch),
  first five captions each, R@1/5/10 both ways equal to the float64 definition."""
  import multihost_eval_worker  # pylint: disable=import-outside-toplevel
  from contrastive_jax import runs  # pylint: disable=import-outside-toplevel
  path, images = write_karpathy_fixture(tmp_path, coco=coco)
  c = multihost_eval_worker.evaluator_config()
  c.eval.evaluators = {"flickr": multihost_eval_worker.karpathy_evaluator(path, images)}
  run = runs.build_run(c)
  state = run.init_state()
  evaluators = runner.Runner(c, run.method, run.mesh)
  res = evaluators.run(state, ["flickr"])
  local = streaming.encode_split(evaluators.encoders, state, run.mesh,
                                 streaming.data_config(c, evaluators.specs["flickr"]), "test", 16,
                                 [("img", "image_embedding", "image"),
                                  ("txt", "text_embedding", "tokens")])
  assert local["tokens"].shape[:2] == (12, 5)
  assert local["index"].tolist() == list(range(100, 112))  # the test split, in file order
  tok = streaming.pipeline.make_tokenizer(streaming.data_config(c, evaluators.specs["flickr"]))
  assert (local["tokens"][2, 4] == tok.encode(["2.4 a photo"])[0]).all()  # 7 captions: first 5
  txt = local["txt"].reshape(60, -1)
  for k in (1, 5, 10):
    i2t, t2i = _recall_float64(local["img"], txt, np.repeat(np.arange(12), 5), k)
    assert res[f"flickr/image_to_text/R@{k}"] == pytest.approx(i2t, abs=1e-9)
    assert res[f"flickr/text_to_image/R@{k}"] == pytest.approx(t2i, abs=1e-9)
  assert res["flickr/image_to_text/R@10"] > res["flickr/image_to_text/R@1"]  # not degenerate


def test_karpathy_json_errors_name_the_fix(tmp_path):
  from contrastive_jax.data import sources  # pylint: disable=import-outside-toplevel
  from contrastive_jax.errors import DataError  # pylint: disable=import-outside-toplevel
  path, images = write_karpathy_fixture(tmp_path, num_test=2)
  with pytest.raises(DataError, match="does not exist; point data.path"):
    sources.karpathy_json_source(str(tmp_path / "nope.json"), images, "test")
  with pytest.raises(DataError, match="no images in split 'test'; images per split"):
    empty = dict(json.loads(open(path).read()))
    empty["images"] = [e for e in empty["images"] if e["split"] != "test"]
    other = tmp_path / "empty.json"
    other.write_text(json.dumps(empty))
    sources.karpathy_json_source(str(other), images, "test")
  with pytest.raises(DataError, match="not in"):
    sources.karpathy_json_source(path, images, "testing")
  os.remove(os.path.join(images, "0001.jpg"))
  with pytest.raises(DataError, match="0001.jpg.*does not exist; set data.images_dir"):
    sources.karpathy_json_source(path, images, "test")
  src = sources.karpathy_json_source(path, images, "train+restval")  # the Karpathy train set
  assert src.columns["id"].tolist() == [102, 103, 105] and src.columns["caption"].shape == (3, 5)
  with pytest.raises(DataError, match="fewer than data.captions_per_image=6"):
    sources.karpathy_json_source(path, images, "train+restval", captions_per_image=6)


def test_imagenet_wnid_subset_prompts():
  wnids = ("n01443537", "n01440764")  # goldfish, tench
  names, prompts = zero_shot_evaluator.prompts(None, {"classes": "imagenet",
                                                       "templates": "clip", "wnids": wnids})
  assert names == ["goldfish", "tench"] and len(prompts[1]) == 80 and "tench" in prompts[1][0]


@pytest.mark.parametrize("subset,first,last", [("imagenet_r", "n01443537", "n12267677"),
                                                ("imagenet_a", "n01498041", "n12267677")])
def test_imagenet_r_and_a_wnids_are_200_imagenet_classes_in_tfds_label_space(subset, first,
                                                                             last):
  wnids = class_names.subset_wnids(subset)
  all_ids = class_names.imagenet_wnids()
  assert len(wnids) == 200 and len(set(wnids)) == 200 and set(wnids) <= set(all_ids)
  assert list(wnids) == sorted(wnids) and (wnids[0], wnids[-1]) == (first, last)
  # tfds labels ImageNet-R/-A with imagenet2012's 1,000-class ClassLabel (builder info only).
  label = tfds.builder(subset).info.features["label"]
  assert label.num_classes == 1000
  names, label_map = class_names.wnid_subset(subset)
  for i, w in enumerate(wnids):
    assert label_map[label.str2int(w)] == i and names[i] == class_names.imagenet_class_names()[
        all_ids.index(w)]
  assert (label_map >= 0).sum() == 200
  # The classes the tfds builders' own tests expect to meet are in the subset.
  expected = {"imagenet_r": ("n01443537", "n01484850", "n12267677"),
              "imagenet_a": ("n01580077", "n01616318", "n07697313")}[subset]
  assert set(expected) <= set(wnids)
  # Spot checks against the authors' scripts: ImageNet-A's class 0 is 1k label 6 (stingray).
  if subset == "imagenet_a":
    assert label_map[6] == 0 and names[0] == "stingray" and label_map[988] == 199


def test_bad_wnids_name_the_fix():
  c = simclr_mnist.get_config("quick")
  for wnids, match in [("imagenet_x", "not a known subset"), (("n0000",), "not ImageNet-1k"),
                       (("n01440764", "n01440764"), "repeated")]:
    c.eval.evaluators = {"zs": dict(type="zero_shot", classes="imagenet", wnids=wnids)}
    with pytest.raises(ConfigError, match=match):
      runner.specs_of(c, "image_text")
  c.eval.evaluators = {"zs": dict(type="zero_shot", wnids="imagenet_r")}
  with pytest.raises(ConfigError, match="needs classes='imagenet'"):
    runner.specs_of(c, "image_text")


def test_imagenet_r_zero_shot_scores_the_200_classes():
  """Zero-shot on mock tfds ``imagenet_r`` (labels in the 1,000-class space): top-1/5 equal a
  float64 scoring of the images against the 200 class embeddings with the labels mapped into
  the subset. So that a wrong mapping shows, half the images are labelled with the class the
  model ranks first for them (found in a first pass), half with another."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import multihost_eval_worker  # pylint: disable=import-outside-toplevel
  from contrastive_jax import runs  # pylint: disable=import-outside-toplevel
  wnids = class_names.subset_wnids("imagenet_r")
  in_1k = [class_names.imagenet_wnids().index(w) for w in wnids]
  rng = np.random.default_rng(5)
  pngs = [tf.io.encode_png(rng.integers(0, 255, size=(18, 20, 3), dtype=np.uint8)).numpy()
          for _ in range(12)]
  labels_1k = [in_1k[0]] * len(pngs)  # set after the first pass

  def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    del self, split, decoders, read_config, kwargs
    return tf.data.Dataset.from_generator(
        lambda: ({"image": png, "label": y, "tfds_id": f"imagenet_r-test.{i}"}
                 for i, (png, y) in enumerate(zip(pngs, list(labels_1k)))),
        output_signature={"image": tf.TensorSpec([], tf.string),
                          "label": tf.TensorSpec([], tf.int64),
                          "tfds_id": tf.TensorSpec([], tf.string)})

  c = multihost_eval_worker.evaluator_config()
  c.eval.evaluators = {"imagenet_r": dict(
      type="zero_shot", classes="imagenet", wnids="imagenet_r", templates=("{}",), batch_size=8,
      data=dict(source="tfds", name="imagenet_r", eval_split="test", cache=False))}
  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    run = runs.build_run(c)
    state = run.init_state()
    evaluators = runner.Runner(c, run.method, run.mesh)
    data = streaming.data_config(c, evaluators.specs["imagenet_r"])
    local = streaming.encode_split(evaluators.encoders, state, run.mesh, data, "test", 8,
                                   [("emb", "image_embedding", "image")])
    names, prompts = zero_shot_evaluator.prompts(data, evaluators.specs["imagenet_r"])
    classes = zero_shot_evaluator.class_embeddings(evaluators.encoders, state, run.mesh,
                                                   streaming.pipeline.make_tokenizer(data),
                                                   prompts, 8)
    img = local["emb"].astype(np.float64)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    scores = img @ classes.astype(np.float64).T  # [N, 200]
    best = scores.argmax(axis=1)
    labels = np.where(np.arange(len(pngs)) % 2 == 0, best, (best + 7) % 200)
    labels_1k[:] = [in_1k[i] for i in labels]
    res = evaluators.run(state, ["imagenet_r"])
  assert len(names) == 200 and classes.shape[0] == 200
  own = scores[np.arange(len(labels)), labels]
  # Ties count against the image (zero_shot.top_k_hits): classes whose prompts are identical
  # after the 16-byte context have identical embeddings.
  above = (scores >= own[:, None]).sum(axis=1) - 1
  for k in (1, 5):
    assert res[f"imagenet_r/top{k}"] == pytest.approx(np.mean(above < k), abs=1e-9)
  assert res["imagenet_r/top1"] >= 0.25  # the mapping is exercised, not an empty check


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


def test_image_text_evals_declare_all_variants_and_flickr30k():
  # pylint: disable-next=import-outside-toplevel
  from contrastive_jax.configs import clip_vit_b32, common
  c = clip_vit_b32.get_config()
  c.eval.evaluators = common.image_text_evals(
      "gs://b/tfds", every_steps=5000, variants=tuple(common.IMAGENET_VARIANTS),
      flickr30k=("gs://b/dataset_flickr30k.json", "gs://b/img"))
  specs = runner.specs_of(c, "image_text")
  assert set(specs) == {"imagenet_subset", "imagenet", "imagenet_v2", "imagenet_sketch",
                        "imagenet_r", "imagenet_a", "coco", "flickr30k"}
  assert (specs["imagenet_r"]["wnids"], specs["imagenet_a"]["wnids"]) == ("imagenet_r",
                                                                          "imagenet_a")
  assert not specs["imagenet_v2"]["wnids"] and specs["imagenet_r"]["data"]["name"] == "imagenet_r"
  assert specs["flickr30k"]["data"]["source"] == "karpathy_json"
  assert zero_shot_evaluator.prompts(None, specs["imagenet_a"])[0][0] == "stingray"
  assert {n for n, s in specs.items() if s["every_steps"]} == {"imagenet_subset", "coco"}
  with pytest.raises(ValueError, match="unknown"):
    common.image_text_evals("", every_steps=0, variants=("imagenet_c",))


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
  c.eval.evaluators = evals
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


# ----------------------------------------------------------------------------- feature cache


def test_linear_probe_features_cached_per_host_and_never_trusted_blindly(tmp_path, monkeypatch):
  """Frozen features go to ``workdir/eval/features/step_<N>/``, one file per host and split; a
  re-run at the same step reads them (no encode call) with identical numbers; a truncated or
  tampered file, or another step, is recomputed."""
  import multihost_eval_worker  # pylint: disable=import-outside-toplevel
  from contrastive_jax import runs  # pylint: disable=import-outside-toplevel
  from contrastive_jax.evaluate import feature_cache  # pylint: disable=import-outside-toplevel
  c = multihost_eval_worker.evaluator_config()
  c.eval.evaluators = {"linear": dict(type="linear_probe", batch_size=16,
                                      l2_grid=(1e-3, 1e-1), cache_features=True)}
  calls = []
  real = streaming.encode_split

  def spy(*args, **kwargs):
    calls.append(args[4])  # the split
    return real(*args, **kwargs)

  monkeypatch.setattr(streaming, "encode_split", spy)
  with tfds.testing.mock_data(num_examples=24):
    run = runs.build_run(c)
    state = run.init_state()

    def evaluate(step):
      return runner.Runner(c, run.method, run.mesh, workdir=str(tmp_path)).run(
          state, ["linear"], step=step)

    first = evaluate(3)
    files = sorted((tmp_path / "eval" / "features" / "step_3").glob("*.npz"))
    assert calls == ["train", "test"] and len(files) == 2
    assert all(f.name.endswith(".process_0_of_1.npz") for f in files)
    assert evaluate(3) == first and calls == ["train", "test"]  # read back, nothing encoded

    # A partial file (writer killed, disk full): detected and recomputed, then rewritten.
    data = files[0].read_bytes()
    files[0].write_bytes(data[:len(data) // 2])
    assert evaluate(3) == first and len(calls) == 3
    assert files[0].read_bytes() == data
    # A file that reads but whose features changed: the checksum catches it.
    with np.load(files[1]) as z:
      arrays = {k: z[k] for k in z.files}
    arrays["feat"] = arrays["feat"] + 1.0
    np.savez(files[1], **arrays)
    key = json.loads(arrays["__meta__"].tobytes())["key"]
    assert feature_cache.load(files[1], key) is None  # the checksum, not the key, rejects it
    assert evaluate(3) == first and len(calls) == 4
    assert evaluate(3) == first and len(calls) == 4  # both good again
    evaluate(4)  # another step: other weights, other files
    assert len(calls) == 6 and len(list((tmp_path / "eval" / "features").glob("*/*.npz"))) == 4
