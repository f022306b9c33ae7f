"""Streams of TFRecord files: their split across hosts, and a seekable order of each host's part.

Serves TFRecord shards with a shard index and tfds splits prepared as TFRecord files (counts
from the split's shard lengths, ``sources.tfds_file_stream``) alike.

**Host splitting** (``assign_files``): process ``p`` of ``P`` reads the consecutive record
range ``process_records(total, p, P)`` of the files taken in order, as pieces of files
(``ShardedFiles``), so every process has the same number of records to within one.

**Seekable order** (``StreamOrder``). The order of process ``p``'s records in epoch ``e`` is a
pure function of (seed, e) and the per-file record counts of the shard index
(``sources.read_tfrecord_index``):

1. **File order**: a stateless permutation of this process's files, seeded by (seed, e).
2. **Interleave**: consecutive groups of ``cycle`` files; each group is read round-robin, one
   record from each file in turn (``tf.data`` interleave with ``cycle_length`` = group size,
   ``cycle`` files read in parallel, ``deterministic=True``); a file that ends drops out of the
   turn, and the next group starts when the whole group is read.
3. **Windowed shuffle**: the interleaved stream is cut into windows of ``W`` records (the last
   one shorter) and each window is permuted by a stateless shuffle seeded by (seed, e, window).
   This replaces a shuffle buffer of ``W`` records: the same memory, the same locality (a
   window spans about ``W / cycle`` records of each of ``cycle`` files), but the position of
   every record is known without reading what comes before it.
4. **Kept records**: window ``k`` yields its records in permuted order. With
   ``skip_corrupt``, records that fail to decode are skipped as they are met, and a window
   yields at most ``K_k = size_k - ceil(reserve * size_k)`` records (its first ``K_k`` good
   ones): the ``reserve`` fraction makes the number of records a window yields independent of
   how many of its records are corrupt (up to ``ceil(reserve * size_k)`` of them).

An epoch is the first ``steps_per_epoch * b`` kept records, ``steps_per_epoch = usable // b``
with ``usable = sum_k K_k``. Global step ``s`` is therefore at epoch ``e = s // spe`` and kept
position ``q = (s mod spe) * b``, i.e. window ``k = q // K`` and offset ``o = q mod K`` (all
windows but the last have the same ``K``). A resume (``seek``) skips the groups before window
``k`` without opening their files, reads (does not parse) the records of window ``k``'s group
that precede it, permutes window ``k`` and drops its first ``o`` records: at most one group of
``cycle`` files plus one window is read again, whatever the data set's size.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from contrastive_jax.data import augment as aug_lib
from contrastive_jax.data import records

_FILE_ORDER, _WINDOW_PERM, _MIX = 0xF11E, 0x3D0F, 0x313C
_INF_EPOCHS = 2**62
MIX_BLOCK = 1000  # records of the mixed stream over which the weights hold exactly
POSITION_KEYS = ("_source", "_epoch", "_window", "_slot")


# ----------------------------------------------------------------------------- host splitting

@dataclasses.dataclass(frozen=True)
class ShardedFiles:
  """This process's part of a set of TFRecord files: ``counts[i]`` consecutive records of
  ``files[i]`` from record ``offsets[i]`` (empty: all 0). A file can be shared with the
  neighbouring processes, each reading its own record range (``assign_files``)."""
  files: tuple[str, ...]
  counts: tuple[int, ...]
  offsets: tuple[int, ...] = ()

  def record_index(self, i: int, k: int) -> int:
    """Index in ``files[i]`` of this process's ``k``-th record of that file."""
    return (self.offsets[i] if self.offsets else 0) + k

  def record_dataset(self, i) -> tf.data.Dataset:
    """``(file index, record index in the file, serialized record)`` of file ``i`` (a scalar
    tensor), in file order; nothing is parsed. The records before the range are skipped by
    TFRecord framing (read past, not copied or checked)."""
    i = tf.cast(i, tf.int64)
    ds = tf.data.TFRecordDataset(tf.gather(tf.constant(self.files), i))
    first = tf.constant(0, tf.int64)
    if self.offsets:
      first = tf.gather(tf.constant(self.offsets, tf.int64), i)
    ds = ds.skip(first).take(tf.gather(tf.constant(self.counts, tf.int64), i))
    return ds.enumerate(first).map(lambda r, x: (i, r, x))


def process_records(total: int, process_index: int, process_count: int) -> tuple[int, int]:
  """``[start, end)``: process ``p``'s range of a split's ``total`` records, counted across
  its files in order; the ranges of the ``P`` processes differ in length by at most one."""
  return (process_index * total // process_count,
          (process_index + 1) * total // process_count)


def assign_files(files: Sequence[str], counts: Sequence[int], process_index: int,
                 process_count: int, offsets: Sequence[int] = ()) -> ShardedFiles:
  """Process ``p``'s part of ``files`` (``counts`` records each, from ``offsets``): the
  consecutive record range ``process_records(sum(counts), p, P)`` of the files taken in order,
  as pieces of files.

  Balanced by records, not by files, so that (1) every process has the same number of records
  to within one, hence the same epoch (whole files would give the hosts of 1,024 equal shards
  on 48 hosts 21 or 22 files: epochs about 5% apart), and (2) with fewer files than processes
  each record is read by one process only (a strided ``Dataset.shard`` of every file made
  every host read every file whole). A process reads one to ``ceil(F / P) + 1`` files.
  """
  offsets = tuple(offsets) or (0,) * len(files)
  lo, hi = process_records(sum(counts), process_index, process_count)
  out_files, out_counts, out_offsets = [], [], []
  start = 0
  for f, n, off in zip(files, counts, offsets):
    a, b = max(lo, start), min(hi, start + n)
    if b > a:
      out_files.append(f)
      out_counts.append(b - a)
      out_offsets.append(off + a - start)
    start += n
  return ShardedFiles(tuple(out_files), tuple(out_counts), tuple(out_offsets))




# ----------------------------------------------------------------------------- seekable order

def _keep(size: int, reserve: float) -> int:
  return size - math.ceil(reserve * size)


def usable_records(num_records: int, window: int, reserve: float) -> int:
  """Kept records of an epoch of ``num_records`` records in windows of ``window`` with a
  ``reserve`` fraction for corrupt records (``StreamOrder.usable``)."""
  num_windows = max(1, math.ceil(num_records / window))
  last = num_records - (num_windows - 1) * window
  return (num_windows - 1) * _keep(window, reserve) + _keep(last, reserve)


class StreamOrder:
  """The seekable order of one process's TFRecord shards (module docstring).

  Args:
    shards: this process's files and counts.
    seed: run seed.
    cycle: files read in parallel (interleave group size).
    window: shuffle window ``W`` in records.
    reserve: fraction of each window kept in reserve for corrupt records (0 without
      ``skip_corrupt``).
    source_index: position in a mix; ids of source ``i > 0`` hash ``mix<i>/<file>:<record>``
      so that equal file names in two sources give different examples.
    parse: ``(names, file index, record index, serialized) -> {image_bytes, label, id[,
      caption]}`` (``StreamSource.parse``); default ``records.tfrecord_record``.
  """

  def __init__(self, shards: ShardedFiles, seed: int, cycle: int, window: int,
               reserve: float = 0.0, source_index: int = 0, parse=None):
    if cycle < 1 or window < 1:
      raise ValueError(f"data.cycle_length={cycle} and data.shuffle_buffer={window} must be "
                       ">= 1")
    if not 0 <= reserve < 1:
      raise ValueError(f"data.corrupt_reserve={reserve} must be in [0, 1)")
    self.shards = shards
    self.counts = np.asarray(shards.counts, np.int64)
    self.num_files = len(self.counts)
    self.num_records = int(self.counts.sum())
    self.seed = int(seed)
    self.cycle = int(cycle)
    self.window = int(window)
    self.reserve = float(reserve)
    self.num_windows = max(1, math.ceil(self.num_records / self.window))
    self.keep_full = self.keep(self.window)
    self.usable = usable_records(self.num_records, self.window, self.reserve)
    self.source_index = int(source_index)
    names = [os.path.basename(f) for f in shards.files]
    if source_index:
      names = [f"mix{source_index}/{f}" for f in names]
    self._names = tf.constant(names)
    self._parse = parse or records.tfrecord_record

  def keep(self, size: int) -> int:
    """Records a window of ``size`` records yields."""
    return _keep(size, self.reserve)

  # ----------------------------------------------------------------- order (graph and eager)

  def file_order(self, epoch) -> tf.Tensor:
    """``[F] int64`` file indices of ``epoch`` (a tensor or an int)."""
    seed = aug_lib.fold_in(tf.constant([self.seed, _FILE_ORDER], tf.int64), epoch)
    return tf.random.experimental.stateless_shuffle(
        tf.range(self.num_files, dtype=tf.int64), seed=seed)

  def window_perm(self, epoch, window, size) -> tf.Tensor:
    seed = aug_lib.fold_in(aug_lib.fold_in(
        tf.constant([self.seed, _WINDOW_PERM], tf.int64), epoch), window)
    return tf.random.experimental.stateless_shuffle(tf.range(size, dtype=tf.int64), seed=seed)

  def _group_counts(self, epoch: int) -> np.ndarray:
    order = self.file_order(epoch).numpy()
    return order, self.counts[order]

  def seek(self, epoch: int, window: int) -> tuple[int, int]:
    """``(group, records to skip in it)`` where ``window`` of ``epoch`` starts."""
    _, counts = self._group_counts(epoch)
    sums = np.add.reduceat(counts, np.arange(0, self.num_files, self.cycle))
    ends = np.cumsum(sums)
    x = window * self.window
    g = int(np.searchsorted(ends, x, side="right"))
    start = int(ends[g - 1]) if g else 0
    return g, x - start

  def records(self, epoch, first_group=0, skip=0, first_window=0) -> tf.Tensor:
    """Records of ``epoch`` in order from ``first_window``: dicts of ``epoch, window, slot``
    (position in the permuted window), ``file``, ``record`` (the record's index in its file)
    and ``serialized``. Graph-compatible in ``epoch``."""
    epoch = tf.cast(epoch, tf.int64)
    c = self.cycle
    num_groups = -(-self.num_files // c)
    order = self.file_order(epoch)
    pad = -tf.ones([num_groups * c - self.num_files], tf.int64)
    groups = tf.reshape(tf.concat([order, pad], 0), [num_groups, c])

    def read_group(row):
      files = tf.boolean_mask(row, row >= 0)
      return tf.data.Dataset.from_tensor_slices(files).interleave(
          self.shards.record_dataset, cycle_length=c, block_length=1, num_parallel_calls=c,
          deterministic=True)

    recs = tf.data.Dataset.from_tensor_slices(groups).skip(first_group).flat_map(read_group)
    recs = recs.skip(skip).batch(self.window)

    def permute(k, rec):
      f, r, x = rec
      size = tf.shape(x, out_type=tf.int64)[0]
      perm = self.window_perm(epoch, k, size)
      return {"epoch": tf.fill([size], epoch), "window": tf.fill([size], k),
              "slot": tf.range(size), "file": tf.gather(f, perm),
              "record": tf.gather(r, perm), "serialized": tf.gather(x, perm)}

    return recs.enumerate(first_window).map(permute).unbatch()

  def parse(self, rec) -> dict[str, tf.Tensor]:
    """A ``records`` element -> ``{image_bytes, caption, label, id, _epoch, _window, _slot}``."""
    out = self._parse(self._names, rec["file"], rec["record"], rec["serialized"])
    out.update(_source=tf.constant(self.source_index, tf.int64), _epoch=rec["epoch"],
               _window=rec["window"], _slot=rec["slot"])
    return out

  def window_keep(self, window) -> tf.Tensor:
    """``K_k`` of ``window`` (a tensor)."""
    size = tf.minimum(tf.constant(self.window, tf.int64),
                      self.num_records - tf.cast(window, tf.int64) * self.window)
    reserve = tf.cast(tf.math.ceil(self.reserve * tf.cast(size, tf.float64)), tf.int64)
    return size - reserve

  # ----------------------------------------------------------------- names (eager)

  def locate(self, epoch: int, window: int, slot: int) -> tuple[str, int]:
    """``(file, record index in the file)`` at ``slot`` of ``window`` in ``epoch``."""
    size = min(self.window, self.num_records - window * self.window)
    x = window * self.window + int(self.window_perm(epoch, window, size).numpy()[slot])
    order, counts = self._group_counts(epoch)
    for g0 in range(0, self.num_files, self.cycle):
      n = counts[g0:g0 + self.cycle]
      if x >= n.sum():
        x -= int(n.sum())
        continue
      # Round-robin: after R full turns, sum(min(n_i, R)) records are out.
      lo, hi = 0, int(n.max())
      while lo < hi:  # largest R with sum(min(n, R)) <= x
        mid = (lo + hi + 1) // 2
        if np.minimum(n, mid).sum() <= x:
          lo = mid
        else:
          hi = mid - 1
      rem = x - int(np.minimum(n, lo).sum())
      live = np.flatnonzero(n > lo)
      i = g0 + int(live[rem])
      return self.shards.files[order[i]], self.shards.record_index(int(order[i]), lo)
    raise IndexError(f"slot {slot} of window {window} is past the end of epoch {epoch}")


class CorruptTracker:
  """Counts and names the records a ``skip_corrupt`` stream skipped, from the position columns
  (``POSITION_KEYS``) of the kept records: within a window the kept records are the good ones
  in slot order, so a gap in the slots is a corrupt record."""

  def __init__(self, orders: list[StreamOrder], starts: list[tuple[int, int, int]],
               max_names: int = 1000):
    self.orders = orders
    self.starts = starts  # per source: (epoch, window, offset) of the resume point
    self.prev: list[tuple[int, int, int] | None] = [None] * len(orders)
    self.max_names = max_names

  def update(self, batch: dict[str, np.ndarray], stats: dict) -> list[str]:
    """Pops the position columns from ``batch``; returns the names of new corrupt records."""
    src, e, w, j = (batch.pop(k) for k in POSITION_KEYS)
    found = []
    for i in range(len(e)):
      s = int(src[i])
      cur, prev, start = (int(e[i]), int(w[i]), int(j[i])), self.prev[s], self.starts[s]
      if prev is not None and prev[:2] == cur[:2]:
        lo = prev[2] + 1
      elif prev is None and start[2] > 0 and cur[:2] == start[:2]:
        lo = cur[2]  # resumed inside this window: what precedes was seen before the restart
      else:
        lo = 0
      for slot in range(lo, cur[2]):
        f, r = self.orders[s].locate(cur[0], cur[1], slot)
        found.append(f"{f} record #{r}")
      self.prev[s] = cur
    if found:
      stats["corrupt_skipped"] += len(found)
      room = self.max_names - len(stats["corrupt_files"])
      stats["corrupt_files"].extend(found[:max(room, 0)])
    return found


def kept_examples(order: StreamOrder, per_epoch: int, start: int, skip_corrupt: bool,
                  make_example, par) -> tuple[tf.data.Dataset, dict]:
  """Infinite examples ``make_example(epoch, record)`` of one source from kept position
  ``start`` on; an epoch is its first ``per_epoch <= order.usable`` kept records.

  Without ``skip_corrupt`` the records before the resume point are skipped before parsing;
  with it, the records of the resume window before the offset are decoded (their validity
  decides which records the window keeps) and dropped.
  """
  if not 0 < per_epoch <= order.usable:
    raise ValueError(f"per_epoch={per_epoch} must be in (0, {order.usable}]")
  epoch0, q = divmod(int(start), per_epoch)
  k0, o = divmod(q, order.keep_full)
  group, skip = order.seek(epoch0, k0)
  first = order.records(epoch0, group, skip, k0)
  info = {"resume_records_skipped": int(skip + o), "resume_groups_skipped": group,
          "resume_position": (epoch0, k0, o)}

  def example(rec):
    return make_example(rec["epoch"], order.parse(rec))

  if not skip_corrupt:
    ds = first.skip(o).take(per_epoch - q).concatenate(
        tf.data.Dataset.range(epoch0 + 1, _INF_EPOCHS).flat_map(
            lambda e: order.records(e).take(per_epoch)))
    return ds.map(example, num_parallel_calls=par, deterministic=True), info
  ds = first.concatenate(tf.data.Dataset.range(epoch0 + 1, _INF_EPOCHS).flat_map(order.records))
  # Each record's decode in its own one-element dataset: its errors (a corrupt image) drop that
  # record only, while errors upstream (a damaged TFRecord file) still stop the run.
  ds = ds.interleave(
      lambda rec: tf.data.Dataset.from_tensors(rec).map(example).ignore_errors(),
      cycle_length=tf.data.AUTOTUNE if par == tf.data.AUTOTUNE else max(par, 1),
      block_length=1, num_parallel_calls=par, deterministic=True)
  int64 = lambda v: tf.constant(v, tf.int64)

  def keep(state, ex):
    e, k, n, m = state
    ee, kk = ex["_epoch"], ex["_window"]
    new_window = tf.logical_or(tf.not_equal(ee, e), tf.not_equal(kk, k))
    n = tf.where(new_window, int64(0), n)
    m = tf.where(tf.not_equal(ee, e), int64(0), m)
    off = tf.where(tf.logical_and(tf.equal(ee, epoch0), tf.equal(kk, k0)), int64(o), int64(0))
    ok = (n >= off) & (n < order.window_keep(kk)) & (m < per_epoch)
    return (ee, kk, n + 1, m + tf.cast(ok, tf.int64)), (ok, ex)

  def kept(ok, ex):
    del ex
    return ok

  def example_only(ok, ex):
    del ok
    return ex

  ds = ds.scan((int64(epoch0), int64(k0), int64(0), int64(q)), keep)
  return ds.filter(kept).map(example_only), info


def mix_block(weights, block: int | None = None) -> np.ndarray:
  """``[S] int64`` records of each source per block of ``block`` (default ``MIX_BLOCK``):
  ``weights`` normalised times ``block``, rounded by largest remainder (summing to ``block``)."""
  block = block or MIX_BLOCK
  w = np.asarray(weights, np.float64) / np.sum(weights)
  exact = w * block
  n = np.floor(exact).astype(np.int64)
  extra = block - int(n.sum())
  n[np.argsort(-(exact - n), kind="stable")[:extra]] += 1
  return n


def mix_choices(weights, seed: int, block_index) -> tf.Tensor:
  """``[block] int64`` source of each record of mixed block ``block_index``: each source
  ``mix_block(weights)[i]`` times, in an order seeded by (seed, block)."""
  pattern = np.repeat(np.arange(len(weights)), mix_block(weights))
  s = aug_lib.fold_in(tf.constant([seed, _MIX], tf.int64), block_index)
  return tf.gather(tf.constant(pattern, tf.int64), tf.random.experimental.stateless_shuffle(
      tf.range(len(pattern), dtype=tf.int64), seed=s))


def mixed_examples(orders: list[StreamOrder], weights, start: int, skip_corrupt: bool,
                   make_example, par) -> tuple[tf.data.Dataset, list[dict]]:
  """Examples of several sources mixed by weight, from mixed position ``start`` on.

  Record ``t`` of the mixed stream comes from source ``mix_choices(weights, seed, t //
  MIX_BLOCK)[t % MIX_BLOCK]``, so the weights hold exactly over every block of
  ``MIX_BLOCK`` records; each source is an infinite stream of its own epochs (all its kept
  records). A resume counts each source's records before ``start`` in O(MIX_BLOCK) and seeks
  every source there.
  """
  seed = orders[0].seed
  blk, rem = divmod(int(start), MIX_BLOCK)
  counts = blk * mix_block(weights)
  head = mix_choices(weights, seed, blk).numpy()[:rem]
  counts += np.bincount(head, minlength=len(orders))
  dss, infos = [], []
  for order, n in zip(orders, counts):
    ds, info = kept_examples(order, order.usable, int(n), skip_corrupt, make_example, par)
    dss.append(ds)
    infos.append(info)
  choice = tf.data.Dataset.range(blk, _INF_EPOCHS).flat_map(
      lambda k: tf.data.Dataset.from_tensor_slices(mix_choices(weights, seed, k))).skip(rem)
  return tf.data.Dataset.choose_from_datasets(dss, choice), infos
