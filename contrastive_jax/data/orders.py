"""The three training orders of ``pipeline.train_iterator``, behind one small interface.

Each order holds this process's source and says, from the run seed alone, which example comes
at every position of every epoch, so that ``examples(start_step, ...)`` starts at any step
with exactly the examples of an uninterrupted run:

* ``IndexedOrder`` (random-access sources: embedded MNIST, image folders, CSV, and tfds /
  TFRecord with ``cache=True``): epoch ``e`` visits ``perm_e = stateless_shuffle(range(N),
  (seed, e))``. With global batch ``B = P * b`` over ``P`` processes, global step ``t`` of the
  epoch is ``perm_e[t B : (t + 1) B]`` and process ``p`` takes its ``p``-th slice of ``b``
  rows. The processes' shards are disjoint, their union is the epoch (less the ``N mod B``
  remainder that is dropped, a different one each epoch), and the global batch does not
  depend on ``P``.
* ``SeekOrder`` (streaming TFRecord shards, and tfds splits prepared as TFRecord files): each
  process reads only its record range (``streaming.assign_files``), in the seekable order of
  ``streaming.StreamOrder`` (seeded file order, interleave, windowed shuffle), so a resume
  opens no file before the resume point and reads at most one interleave group and one window
  again. Several TFRecord sources are mixed by weight (``streaming.mixed_examples``).
* ``ReplayOrder`` (tfds splits without TFRecord files: ``tfds.testing.mock_data``): process
  ``p`` reads its even sub-split; each epoch is a buffer shuffle seeded by (seed, e), and a
  resume reads and discards the records before it (bit-exact, but it reads them again).

Interface: ``source`` (for captions and error messages), ``num_examples``,
``steps_per_epoch`` (every epoch ends on a whole batch), ``stats`` (the iterator's bookkeeping
that the order knows before reading), ``describe`` (what an epoch is made of, for errors),
``positions`` (whether ``make_example`` must keep the records' ``streaming.POSITION_KEYS``),
``examples(start_step, make_example, par) -> (dataset, info)`` (infinite examples
``make_example(epoch, record)`` from ``start_step``; ``info`` goes to the iterator's stats)
and ``corrupt_tracker(info)`` (``streaming.CorruptTracker`` where records are skipped as they
are met, else None).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from contrastive_jax.data import augment as aug_lib
from contrastive_jax.data import records
from contrastive_jax.data import streaming

_INF_EPOCHS = 2**62

MakeExample = Callable[[tf.Tensor, dict[str, tf.Tensor]], dict[str, tf.Tensor]]


def epoch_rows(num_examples: int, seed: int, epoch, global_batch: int, process_index: int,
               process_count: int) -> tf.Tensor:
  """Rows ``[steps_per_epoch * b] int64`` of ``epoch`` read by this process, in order.

  Works on a tensor ``epoch`` (inside ``Dataset.flat_map``) and eagerly.
  """
  b = global_batch // process_count
  spe = num_examples // global_batch
  epoch = tf.cast(epoch, tf.int64)
  perm = tf.random.experimental.stateless_shuffle(
      tf.range(num_examples, dtype=tf.int64),
      seed=aug_lib.fold_in(tf.constant([seed, 0xE90C], tf.int64), epoch))
  perm = tf.reshape(perm[:spe * global_batch], [spe, process_count, b])
  return tf.reshape(perm[:, process_index, :], [-1])


def _epoch_shuffle_seed(seed: int, epoch) -> tf.Tensor:
  """A scalar int64 seed for ``Dataset.shuffle`` that differs per epoch."""
  s = aug_lib.fold_in(tf.constant([seed, 0x5B0F], tf.int64), epoch)
  return tf.random.stateless_uniform([], seed=s, minval=None, maxval=None, dtype=tf.int64)


def _from_epochs(epoch_records, start_step: int, steps_per_epoch: int, local_batch: int,
                 make_example: MakeExample, par) -> tf.data.Dataset:
  """Examples of ``epoch_records(epoch) -> (epoch, record)`` datasets from ``start_step`` on;
  the records before it are skipped before any decoding."""
  start_epoch, offset = divmod(int(start_step), steps_per_epoch)
  ds = tf.data.Dataset.range(start_epoch, _INF_EPOCHS).flat_map(epoch_records)
  ds = ds.skip(offset * local_batch)
  return ds.map(make_example, num_parallel_calls=par, deterministic=True)


class IndexedOrder:
  """An exact seeded permutation of an in-memory source per epoch (module docstring)."""

  def __init__(self, source: records.IndexedSource, seed: int, global_batch: int,
               process_index: int, process_count: int):
    self.source = source
    self.num_examples = len(source)
    self.steps_per_epoch = self.num_examples // global_batch
    self.describe = f"the {self.num_examples} examples of {source.name}"
    self.positions = False
    self.stats = {"corrupt_skipped": len(source.corrupt_files),
                  "corrupt_files": list(source.corrupt_files)}
    self._args = (seed, global_batch, process_index, process_count)

  def examples(self, start_step: int, make_example: MakeExample, par
               ) -> tuple[tf.data.Dataset, dict[str, Any]]:
    seed, global_batch, p, num_p = self._args
    cols = self.source.tf_columns()

    def epoch_records(epoch):
      rows = epoch_rows(self.num_examples, seed, epoch, global_batch, p, num_p)
      return tf.data.Dataset.from_tensor_slices(rows).map(
          lambda r: (epoch, {k: tf.gather(v, r) for k, v in cols.items()}))

    return _from_epochs(epoch_records, start_step, self.steps_per_epoch,
                        global_batch // num_p, make_example, par), {}

  def corrupt_tracker(self, info) -> None:
    del info  # corrupt images were dropped before step 0 (records.drop_corrupt)


class SeekOrder:
  """This process's record ranges of one or more sources of TFRecord files, mixed by
  ``weights``, in ``streaming.StreamOrder``'s seekable order (module docstring).

  Args:
    streams: this process's ``StreamSource`` of each source (with ``shards``).
    weights: mixing weight of each source.
    seed: run seed.
    local_batch: this process's batch ``b``.
    process_count: processes ``P`` (all have the same number of steps per epoch).
    cycle, window: ``data.cycle_length`` and ``data.shuffle_buffer``.
    skip_corrupt: skip undecodable records as they are met, keeping a ``reserve`` fraction
      of each window for them (``data.corrupt_reserve``).
  """

  def __init__(self, streams: Sequence[records.StreamSource], weights: Sequence[float],
               seed: int, local_batch: int, process_count: int, cycle: int, window: int,
               skip_corrupt: bool, reserve: float):
    reserve = float(reserve) if skip_corrupt else 0.0
    self.orders = [streaming.StreamOrder(s.shards, seed, int(cycle), int(window), reserve,
                                         source_index=i, parse=s.parse)
                   for i, s in enumerate(streams)]
    self.weights = list(weights)
    self.skip_corrupt = bool(skip_corrupt)
    self.local_batch = local_batch
    self.source = streams[0]
    self.num_examples = sum(o.num_records for o in self.orders)
    # Every process's epoch has the same number of steps, the smallest process's (record
    # ranges differ by at most one record per source, so at most one batch is cut): hosts
    # start their epochs together and see their records equally often.
    self.steps_per_epoch = min(
        sum(streaming.usable_records(hi - lo, o.window, o.reserve)
            for o, s in zip(self.orders, streams)
            for lo, hi in [streaming.process_records(s.split_examples, q, process_count)])
        for q in range(process_count)) // local_batch
    self.describe = f"this process's {self.num_examples} examples"
    self.positions = self.skip_corrupt  # the tracker finds skipped records from them
    self.stats = {"resume": "seek"}

  def examples(self, start_step: int, make_example: MakeExample, par
               ) -> tuple[tf.data.Dataset, dict[str, Any]]:
    b, start = self.local_batch, int(start_step) * self.local_batch
    if len(self.orders) == 1:  # epochs end on whole batches
      ds, info = streaming.kept_examples(self.orders[0], self.steps_per_epoch * b, start,
                                         self.skip_corrupt, make_example, par)
      return ds, info
    ds, infos = streaming.mixed_examples(self.orders, self.weights, start, self.skip_corrupt,
                                         make_example, par)
    return ds, {k: [i[k] for i in infos] for k in infos[0]}

  def corrupt_tracker(self, info) -> streaming.CorruptTracker | None:
    if not self.skip_corrupt:
      return None
    starts = info["resume_position"]
    return streaming.CorruptTracker(self.orders, starts if len(self.orders) > 1 else [starts])


class ReplayOrder:
  """A seeded buffer shuffle of this process's stream per epoch; a resume replays."""

  def __init__(self, source: records.StreamSource, seed: int, local_batch: int,
               shuffle_buffer: int, skip_corrupt: bool):
    self.source = source
    self.num_examples = source.num_examples
    self.steps_per_epoch = self.num_examples // local_batch
    self.describe = f"this process's {self.num_examples} examples"
    self.positions = False
    self.stats = {"resume": "replay"}
    self._args = (seed, local_batch, int(shuffle_buffer), bool(skip_corrupt))

  def examples(self, start_step: int, make_example: MakeExample, par
               ) -> tuple[tf.data.Dataset, dict[str, Any]]:
    seed, b, buffer, skip_corrupt = self._args
    stream, per_epoch = self.source.dataset, self.steps_per_epoch * b

    def epoch_records(epoch):
      return stream.shuffle(buffer, seed=_epoch_shuffle_seed(seed, epoch),
                            reshuffle_each_iteration=False).take(per_epoch).map(
                                lambda r: (epoch, r))

    ds = _from_epochs(epoch_records, start_step, self.steps_per_epoch, b, make_example, par)
    if skip_corrupt:  # skipped as met, not counted
      ds = ds.ignore_errors()
    return ds, {}

  def corrupt_tracker(self, info) -> None:
    del info  # corrupt records are skipped uncounted (ignore_errors)


TrainOrder = IndexedOrder | SeekOrder | ReplayOrder
