"""Streaming TFRecord input (TFRecord shards and tfds splits prepared as TFRecord files): index
counts, seek on resume, lazy corrupt skipping, crop decode."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import tensorflow as tf
from tiny_tfds import digits_builder_cls

from contrastive_jax.configs import common
from contrastive_jax.data import pipeline, records
from contrastive_jax.data import sources as S
from contrastive_jax.data import streaming

SIZES = (3, 9, 5, 1, 8, 6)  # records per file: unequal, so the round-robin order is not trivial


def _image(i: int) -> bytes:
  rng = np.random.default_rng(i)
  return tf.io.encode_jpeg(rng.integers(0, 256, (10, 12, 3), np.uint8)).numpy()


def _write(folder, corrupt=()) -> list[str]:
  """One file per size in ``SIZES`` (each with its own index); ``corrupt``: (file, record)
  pairs whose image bytes are garbage."""
  files, k = [], 0
  for f, n in enumerate(SIZES):
    exs = []
    for r in range(n):
      image = b"\xff\xd8\xff not a jpeg" if (f, r) in corrupt else _image(k)
      exs.append((image, f"caption {k}", k % 3))
      k += 1
    files += S.write_image_text_tfrecords(exs, os.path.join(folder, f"s{f}"), 1)
  return files


def _config(folder, **kw):
  return common.data_config("tfrecord", path=os.path.join(folder, "s*.tfrecord"), image_size=8,
                            recipe="clip", shuffle_buffer=8, cycle_length=2, **kw)


def _iter(c, start_step=0, batch=4):
  return pipeline.train_iterator(c, mode="views", global_batch=batch, seed=3, start_step=start_step,
                          process_index=0, process_count=1)


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_counts_from_index_without_reading(tmp_path, monkeypatch, caplog):
  files = _write(str(tmp_path))
  assert S.read_tfrecord_index(str(tmp_path)) == {
      os.path.basename(f): n for f, n in zip(files, SIZES)}

  def no_reading(*a, **k):
    raise AssertionError("records were read to count them")

  with monkeypatch.context() as m:
    m.setattr(S.tfrecord, "count_examples", no_reading)
    pattern = str(tmp_path / "s*")  # also matches the index files: they are left out
    # Consecutive record ranges of the files in order: 16 records each, file 2 split 4 + 1.
    s0, s1 = (S.tfrecord_stream(pattern, p, 2) for p in range(2))
    assert s0.num_examples == s1.num_examples == 16
    assert (s0.shards.files, s0.shards.counts, s0.shards.offsets) == (
        tuple(files[:3]), (3, 9, 4), (0, 0, 0))
    assert (s1.shards.files, s1.shards.counts, s1.shards.offsets) == (
        tuple(files[2:]), (1, 1, 8, 6), (4, 0, 0, 0))
    # More processes than files: process 2 of 8 reads records 8-11 only (of file 1).
    s = S.tfrecord_stream(pattern, 2, 8)
    assert (s.shards.files, s.shards.counts, s.shards.offsets) == ((files[1],), (4,), (5,))
  os.remove(tmp_path / "s1.index.json")
  with caplog.at_level(logging.WARNING):
    s = S.tfrecord_stream(str(tmp_path / "s*"), 0, 1)
  assert s.num_examples == sum(SIZES)
  assert "1 of 6 TFRecord files have no index entry" in caplog.text
  assert "index_tfrecords" in caplog.text


def test_resume_seeks_and_is_bit_exact(tmp_path):
  files = _write(str(tmp_path))
  c = _config(str(tmp_path))
  it = _iter(c)
  spe = it.stats["steps_per_epoch"]
  assert spe == sum(SIZES) // 4 == 8
  full = [next(it) for _ in range(3 * spe)]
  epochs = [np.concatenate([b["index"] for b in full[e * spe:(e + 1) * spe]]) for e in range(3)]
  for ids in epochs:  # each epoch: distinct records; different orders
    assert len(set(ids.tolist())) == spe * 4
  assert not np.array_equal(epochs[0], epochs[1])
  for s in (3, 7, 9, 21):
    it = _iter(c, start_step=s)
    for a in full[s:s + 4]:
      _assert_same(a, next(it))
  # Seek, not replay: at step 6 of epoch 2 (window 3, records 24..) the files of the groups
  # before it are never opened: overwrite them with garbage (reading it raises DataLossError)
  # and the resumed batches are the same.
  order = streaming.StreamOrder(S.tfrecord_stream(c.path, 0, 1).shards, 3, 2, 8)
  group, skip = order.seek(2, 3)
  file_order = order.file_order(2).numpy()
  assert group >= 1 and skip < 2 * max(SIZES)
  for i in file_order[:2 * group]:
    with open(files[i], "wb") as fh:
      fh.write(b"garbage, not a TFRecord file" * 10)
  it = _iter(c, start_step=2 * spe + 6)
  assert it.stats["resume_groups_skipped"] == group
  assert it.stats["resume_records_skipped"] == skip  # offset 0 in window 3
  for a in full[2 * spe + 6:3 * spe]:
    _assert_same(a, next(it))


def test_corrupt_skipped_as_met_counted_named_resumable(tmp_path, caplog):
  corrupt = {(1, 4), (4, 0), (5, 5)}
  files = _write(str(tmp_path), corrupt)
  c = _config(str(tmp_path), skip_corrupt=True, corrupt_reserve=0.5, crop_decode="on")
  it = _iter(c, batch=2)
  spe = it.stats["steps_per_epoch"]
  assert spe == (3 * 4 + 4) // 2  # windows 8, 8, 8, 8 keep 4 each
  assert it.stats["corrupt_skipped"] == 0  # nothing is read before the first batch
  with caplog.at_level(logging.WARNING):
    full = [next(it) for _ in range(3 * spe)]
  bad_ids = {int(records._record_id(tf.constant(os.path.basename(files[f])),
                                    tf.constant(r, tf.int64)))
             for f, r in corrupt}
  seen = np.concatenate([b["index"] for b in full])
  assert not set(seen.tolist()) & bad_ids
  names = it.stats["corrupt_files"]
  assert it.stats["corrupt_skipped"] == len(names) >= 1
  assert set(names) <= {f"{files[f]} record #{r}" for f, r in corrupt}, names
  assert all(n in caplog.text for n in names)
  for b in full:
    assert not any(k.startswith("_") for k in b)
  for e in range(3):
    ids = seen[e * spe * 2:(e + 1) * spe * 2]
    assert len(set(ids.tolist())) == len(ids)
  for s in (3, 5, 9, 13):
    it = _iter(c, start_step=s, batch=2)
    for a in full[s:s + 3]:
      _assert_same(a, next(it))


def _encoded(im, fmt, subsampling=None):
  import io
  from PIL import Image
  buf = io.BytesIO()
  if fmt == "PNG":
    Image.fromarray(im).save(buf, "PNG")
  else:
    Image.fromarray(im).save(buf, "JPEG", quality=90, subsampling=subsampling)
  return buf.getvalue()


@pytest.mark.parametrize("fmt,sub", [("JPEG", "4:2:0"), ("JPEG", "4:4:4"), ("PNG", None)])
def test_crop_window_decode_equals_full_decode_then_crop(fmt, sub):
  """Within the decoded window the crop decode is exact; on the window's outer ring a
  chroma-subsampled JPEG differs (libjpeg upsamples chroma from neighbours outside the
  window): measured up to 20/255 there on skimage photos, bound 40/255. After the resize to
  the view, the views differ by at most 0.02 (measured 0.002) on the [0, 1] scale."""
  from contrastive_jax.data import augment as A
  from skimage import data as skdata
  data = tf.constant(_encoded(skdata.chelsea(), fmt, sub))  # 300 x 451
  full = tf.io.decode_image(data, channels=3).numpy().astype(np.int32)
  cfg = A.recipe_config("simclr", 32, {"crop_area": (0.05, 0.3)})
  ring_diff = 0
  for i in range(12):
    ex = A.example_seed(0, 0, i)
    seeds = [A.view_seed(ex, v) for v in (1, 2)]
    crops = [c.numpy().astype(np.int32) for c in A.decode_crops(data, seeds, cfg)]
    bs = [A.sample_crop_box(s, 300, 451, cfg.crop_area, cfg.crop_aspect).numpy() for s in seeds]
    top, left = min(b[0] for b in bs), min(b[1] for b in bs)
    bottom, right = max(b[0] + b[2] for b in bs), max(b[1] + b[3] for b in bs)
    for (t, l, h, w), crop in zip(bs, crops):
      diff = np.abs(crop - full[t:t + h, l:l + w])
      rows, cols = np.arange(t, t + h)[:, None], np.arange(l, l + w)[None, :]
      ring = (rows == top) | (rows == bottom - 1) | (cols == left) | (cols == right - 1)
      assert diff[~ring].max(initial=0) == 0
      ring_diff = max(ring_diff, diff[ring].max(initial=0))
    # The whole view: the same numbers as augment_view on the fully decoded image.
    got = A.encoded_views(data, ex, cfg)
    want = [A.augment_view(tf.constant(full.astype(np.uint8)), s, cfg, v)
            for s, v in zip(seeds, (1, 2))]
    for g, w in zip(got, want):
      if sub == "4:2:0":
        np.testing.assert_allclose(g.numpy(), w.numpy(), atol=0.02)  # measured <= 0.002
      else:
        np.testing.assert_array_equal(g.numpy(), w.numpy())
  assert ring_diff <= (40 if sub == "4:2:0" else 0)


def test_mix_block_weights_exact():
  assert streaming.mix_block((0.7, 0.3)).tolist() == [700, 300]
  assert streaming.mix_block((1, 1, 1)).tolist() == [334, 333, 333]
  a = streaming.mix_choices((0.7, 0.3), 0, 5).numpy()
  b = streaming.mix_choices((0.7, 0.3), 0, 6).numpy()
  assert np.bincount(a).tolist() == [700, 300] and not np.array_equal(a, b)


def test_weighted_mix_deterministic_and_resumable(tmp_path, monkeypatch):
  monkeypatch.setattr(streaming, "MIX_BLOCK", 100)  # weights exact over 100 records
  os.makedirs(tmp_path / "a")
  os.makedirs(tmp_path / "b")
  _write(str(tmp_path / "a"))
  S.write_image_text_tfrecords([(_image(100 + i), f"b {i}", 0) for i in range(11)],
                               str(tmp_path / "b" / "s"), 2)
  c = _config(str(tmp_path / "a"), mix_paths=(str(tmp_path / "b" / "s*"),),
              mix_weights=(0.7, 0.3))
  ids_b = set()
  for f in sorted((tmp_path / "b").glob("*.tfrecord")):
    ids_b |= {int(records._record_id(tf.constant("mix1/" + f.name), tf.constant(r, tf.int64)))
              for r in range(6)}
  it = _iter(c, batch=4)
  full = [next(it) for _ in range(52)]
  ids = np.concatenate([b["index"] for b in full[:50]])  # two mix blocks
  assert sum(int(i) in ids_b for i in ids) == 60
  assert sum(int(i) in ids_b for i in ids[:100]) == 30
  for s in (2, 24, 37):
    it = _iter(c, start_step=s, batch=4)
    for a in full[s:s + 2]:
      _assert_same(a, next(it))
  with pytest.raises(ValueError, match="mix_weights"):
    _iter(_config(str(tmp_path / "a"), mix_paths=("x",), mix_weights=(1.0,)))


def test_damaged_tfrecord_file_is_named_not_skipped(tmp_path):
  """skip_corrupt drops undecodable images; a file whose record framing is damaged stops the
  run with its name (skipping it silently would lose its records and shift every position)."""
  files = _write(str(tmp_path))
  raw = open(files[1], "rb").read()
  with open(files[1], "wb") as fh:
    fh.write(raw[:len(raw) // 2] + b"\x00" * 7 + raw[len(raw) // 2 + 7:])
  it = _iter(_config(str(tmp_path), skip_corrupt=True))
  with pytest.raises(records.CorruptImageError, match=r"s1-00000-of-00001.tfrecord.*damaged"):
    for _ in range(2 * it.stats["steps_per_epoch"]):
      next(it)


def test_more_processes_than_files_split_by_record_ranges(tmp_path):
  """8 processes over 6 files: each reads its own 4 consecutive records (not every file,
  strided); together they read every record once, with ids naming them, and every
  process has the same epoch."""
  files = _write(str(tmp_path))
  names = [(os.path.basename(f), r) for f, n in zip(files, SIZES) for r in range(n)]
  seen = []
  for p in range(8):
    it = pipeline.train_iterator(_config(str(tmp_path)), mode="views", global_batch=8, seed=0,
                                 process_index=p, process_count=8)
    shards = S.tfrecord_stream(str(tmp_path / "s*.tfrecord"), p, 8).shards
    assert sum(shards.counts) == 4 and len(shards.files) < len(files)
    want = {int(records._record_id(tf.constant(f), tf.constant(r, tf.int64)))
            for f, r in names[4 * p:4 * p + 4]}
    assert it.stats["num_examples"] == it.stats["steps_per_epoch"] == 4
    ids = [int(next(it)["index"][0]) for _ in range(8)]
    assert set(ids[:4]) == set(ids[4:]) == want and ids[:4] != ids[4:]
    seen += ids[:4]
  assert len(set(seen)) == len(seen) == 32


def test_epochs_equal_on_every_process(tmp_path):
  """3 processes over 32 records (10, 11 and 11 of them; batch 1 per process): every
  process's epoch has the smallest process's 10 steps, so all start their epochs together
  (whole files per process gave 4, 17 and 11)."""
  _write(str(tmp_path))
  spe = [pipeline.train_iterator(_config(str(tmp_path)), mode="views", global_batch=3, seed=0,
                                 process_index=p, process_count=3).stats["steps_per_epoch"]
         for p in range(3)]
  assert spe == [10, 10, 10]


# ----------------------------------------------------------------------------- tfds files

TFDS_N, TFDS_SHARDS = 40, 4


def _tfds_builder_cls():
  """40 distinct images in 4 TFRecord shards (``DownloadConfig(num_shards=4)``)."""
  return digits_builder_cls("SeekDigits", TFDS_N, num_classes=5)


def _prepare_tfds(data_dir, file_format="tfrecord"):
  import tensorflow_datasets as tfds
  builder = _tfds_builder_cls()(data_dir=data_dir, file_format=file_format)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      compute_stats=tfds.download.ComputeStatsMode.SKIP, num_shards=TFDS_SHARDS))
  return builder


@pytest.fixture(scope="module")
def seek_tfds(tmp_path_factory):
  """A real tfds data_dir (files on disk, not mocked) of ``seek_digits``, in 4 shards."""
  data_dir = str(tmp_path_factory.mktemp("tfds_seek"))
  builder = _prepare_tfds(data_dir)
  assert builder.info.splits["train"].num_shards == TFDS_SHARDS
  return data_dir


def _tfds_config(data_dir, split="train"):
  return common.data_config("tfds", name="seek_digits", data_dir=data_dir, train_split=split,
                            image_size=8, recipe="clip", shuffle_buffer=6, cycle_length=1)


def _tfds_iter(c, p, start_step=0):
  return pipeline.train_iterator(c, mode="views", global_batch=4, seed=5, start_step=start_step,
                                 process_index=p, process_count=2)


def test_tfds_files_read_as_tfds_reads_them(seek_tfds):
  """A sub-split covering parts of files (train[5:37]: 5, 10, 10 and 7 records of the 4 files)
  on 2 processes: the two read every example of the sub-split once, with tfds' own ids and
  labels; the training stream's epoch is made of them (less each process's remainder)."""
  import tensorflow_datasets as tfds
  split = "train[5:37]"
  ds = tfds.builder("seek_digits", data_dir=seek_tfds).as_dataset(
      split=split, read_config=tfds.ReadConfig(add_tfds_id=True))
  want = {int(tf.strings.to_hash_bucket_fast(ex["tfds_id"], 2**62)): int(ex["label"])
          for ex in ds}
  assert len(want) == 32
  read = {}
  for p in range(2):
    stream = S.tfds_file_stream("seek_digits", split, seek_tfds, p, 2)
    assert stream.shards.offsets == ((5, 0, 0), (1, 0))[p]
    assert stream.shards.counts == ((5, 10, 1), (9, 7))[p]
    for ex in stream.dataset.as_numpy_iterator():
      assert ex["id"] not in read
      read[ex["id"]] = ex["label"]
  assert read == want
  # The record indices that name a skipped corrupt record are the ones read, in record
  # ranges too (8 processes over 4 files: process 3 reads records 7-9 of file 1, 0 of file 2).
  files = [i.filename for i in tfds.builder("seek_digits", data_dir=seek_tfds).info.splits[
      split].file_instructions]
  for shards in (S.tfds_file_stream("seek_digits", split, seek_tfds, 0, 2).shards,
                 streaming.assign_files(files, [5, 10, 10, 7], 3, 8, [5, 0, 0, 0])):
    for i, n in enumerate(shards.counts):
      recs = [r for _, r, _ in shards.record_dataset(i).as_numpy_iterator()]
      assert recs == [shards.record_index(i, k) for k in range(n)]
  assert [r for _, r, _ in streaming.assign_files(files, [5, 10, 10, 7], 3, 8, [5, 0, 0, 0])
          .record_dataset(0).as_numpy_iterator()] == [7, 8, 9]
  got = {}
  for p in range(2):
    it = _tfds_iter(_tfds_config(seek_tfds, split), p)
    assert it.stats["resume"] == "seek"
    assert it.stats["steps_per_epoch"] == 16 // 2
    for _ in range(it.stats["steps_per_epoch"]):
      b = next(it)
      got.update(zip(b["index"].tolist(), b["label"].tolist()))
  assert len(got) == 32 and all(want[i] == label for i, label in got.items())


def test_tfds_resume_seeks_and_is_bit_exact(seek_tfds, tmp_path):
  """2 processes over 4 shards (2 files each, read one after the other: cycle_length=1):
  a resume in the second file of an epoch gives the batches of the uninterrupted stream, and
  it never opens the epoch's first file: overwritten with garbage, it would fail the read."""
  import shutil
  for p in range(2):
    data_dir = str(tmp_path / f"p{p}")
    shutil.copytree(seek_tfds, data_dir)
    c = _tfds_config(data_dir)
    it = _tfds_iter(c, p)
    spe = it.stats["steps_per_epoch"]
    assert it.stats["resume"] == "seek" and spe == 20 // 2
    full = [next(it) for _ in range(2 * spe)]
    it = _tfds_iter(c, p, 3)  # inside a window of epoch 0
    for a in full[3:6]:
      _assert_same(a, next(it))
    # Epoch 1, step 7: kept record 14 of 20, window 2 (records 12..17), in the second file.
    s = spe + 7
    order = streaming.StreamOrder(S.tfds_file_stream("seek_digits", "train", data_dir, p, 2)
                                  .shards, 5, 1, 6)
    group, skip = order.seek(1, 2)
    assert group == 1 and skip == 2  # the first file (10 records) is passed over unread
    first = order.shards.files[int(order.file_order(1).numpy()[0])]
    with open(first, "wb") as fh:
      fh.write(b"garbage, not a TFRecord file" * 10)
    it = _tfds_iter(c, p, s)
    # Re-read: the 2 records of the second file before window 2, and window 2's first 2.
    assert it.stats["resume_groups_skipped"] == 1 and it.stats["resume_records_skipped"] == 4
    for a in full[s:2 * spe]:
      _assert_same(a, next(it))


def test_tfds_mock_data_replays_and_says_so(caplog):
  import tensorflow_datasets as tfds
  c = common.data_config("tfds", name="mnist", image_size=8, recipe="clip", shuffle_buffer=8)
  with tfds.testing.mock_data(num_examples=16):
    with caplog.at_level(logging.WARNING):
      it = pipeline.train_iterator(c, mode="views", global_batch=4, seed=0, process_index=0,
                                   process_count=1)
    assert it.stats["resume"] == "replay"
    assert "cannot be read by seeking" in caplog.text and "REPLAYS" in caplog.text
    full = [next(it) for _ in range(6)]
    it = pipeline.train_iterator(c, mode="views", global_batch=4, seed=0, start_step=4,
                                 process_index=0, process_count=1)
    for a in full[4:]:
      _assert_same(a, next(it))


def test_tfds_files_missing_on_disk_fall_back_to_replay(seek_tfds, tmp_path, caplog):
  import shutil
  data_dir = str(tmp_path / "copy")
  shutil.copytree(seek_tfds, data_dir)
  stream = S.tfds_file_stream("seek_digits", "train", data_dir, 0, 1)
  os.remove(stream.shards.files[0])
  with caplog.at_level(logging.WARNING):
    assert S.tfds_file_stream("seek_digits", "train", data_dir, 0, 1) is None
  assert "is not on disk" in caplog.text and "REPLAYS" in caplog.text


def test_tfds_array_record_refused_with_fix(tmp_path):
  _prepare_tfds(str(tmp_path), file_format="array_record")
  with pytest.raises(ValueError, match=r"array_record files.*file_format=tfrecord"):
    _tfds_iter(_tfds_config(str(tmp_path)), 0)
