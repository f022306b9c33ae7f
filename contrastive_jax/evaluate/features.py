"""Frozen-feature extraction for the evaluators, sharded over the ``"data"`` mesh axis.

Every evaluator of this package (kNN monitor, linear and few-label probes, zero-shot
classification, retrieval) works on features computed once by a frozen encoder. This module
runs that encoder over a whole dataset with the global batch split over all devices of the mesh,
one compilation for the whole pass: the last, short batch is padded with zeros to the same
shape and the padded rows are masked out, so every example is counted exactly once and the
rows come back in their original order.

Requirements on ``encode_fn``: it maps a global batch ``[b, H, W, 3]`` to ``[b, F]`` row by
row (each output row depends only on its own input row), as an encoder in evaluation mode does
(BatchNorm with running statistics, no dropout). A function that mixed rows (train-mode
BatchNorm) would see the zero padding and give different features for the last batch.

Multi-host: ``extract_features`` is exact in a single process. With several processes each
process passes its *local* images (its shard of the dataset) and gets its local features back,
in its local order; ``batch_size`` is then the *global* batch (each process contributes
``batch_size // process_count`` rows a step), and the processes agree on the number of steps
(the largest local count decides; processes with fewer rows feed masked zeros) so that no
process waits on a collective the others never enter.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from contrastive_jax.distributed import check_batch_divisible, data_sharding, host_local_to_global


def _host_local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a ``"data"``-sharded global array, in global row order.

  With one process this is ``np.asarray(x)``; with several it is the block of rows whose devices
  this process addresses (the block it contributed through ``host_local_to_global``).
  """
  if jax.process_count() == 1:
    return np.asarray(x)
  shards = {}
  for shard in x.addressable_shards:
    start = shard.index[0].start or 0
    shards.setdefault(start, np.asarray(shard.data))  # one copy per row block (no replicas)
  return np.concatenate([shards[s] for s in sorted(shards)], axis=0)


def _num_steps_all_processes(local_steps: int) -> int:
  """The largest step count over processes (every process must run the same jitted steps)."""
  if jax.process_count() == 1:
    return local_steps
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  counts = multihost_utils.process_allgather(np.asarray(local_steps, np.int64))
  return int(np.max(counts))


def _bind(jitted: Callable[..., jax.Array], variables: Any) -> Callable[[jax.Array], jax.Array]:
  return jitted if variables is None else functools.partial(jitted, variables)


def extract_features(encode_fn: Callable[..., jax.Array], images: np.ndarray, *,
                     mesh: Mesh, batch_size: int, variables: Any = None) -> np.ndarray:
  """Runs ``encode_fn`` over ``images`` in global batches sharded on ``"data"``.

  Args:
    encode_fn: jittable ``[b, H, W, C] -> [b, F]`` map of a global batch, row by row (the
      caller closes over the parameters), or ``(variables, [b, H, W, C]) -> [b, F]`` when
      ``variables`` is given. Any output dtype; returned as float32.
    images: ``[N, H, W, C]`` (any dtype; uint8 stays uint8 until ``encode_fn`` casts it) for
      this process: the whole dataset in a single process, this process's shard otherwise.
    mesh: the 1-D ``("data",)`` mesh of ``contrastive_jax.distributed.make_mesh``.
    batch_size: global batch per step; a multiple of ``mesh.size`` (and of the process count).
    variables: optional pytree (parameters, BatchNorm statistics, a train state) passed to
      ``encode_fn`` as a jit argument, in whatever sharding it already has. Prefer this in a
      training loop: jit caches by function, so a stable ``encode_fn`` compiles once per run,
      while a fresh closure at every evaluation is traced and compiled again (and its closed-over
      parameters become constants of the program).

  Returns:
    ``[N, F] float32``: exactly one row per input image, in input order.
  """
  check_batch_divisible(batch_size, mesh, "evaluation batch_size")
  images = np.asarray(images)
  if images.ndim < 1 or images.shape[0] == 0:
    raise ValueError(f"extract_features got images of shape {images.shape}; pass at least one "
                     "image as [N, H, W, C]")
  local_batch = batch_size // jax.process_count()
  n = images.shape[0]
  steps = _num_steps_all_processes(-(-n // local_batch))
  sharding = data_sharding(mesh)
  # One jit object and one input shape for every step: a single compilation.
  encode = _bind(jax.jit(encode_fn, out_shardings=sharding), variables)

  def fetch(out: jax.Array, valid: int) -> np.ndarray:
    return _host_local_rows(out)[:valid].astype(np.float32)

  outputs, pending = [], None
  for step in range(steps):
    chunk = images[step * local_batch:(step + 1) * local_batch]
    valid = chunk.shape[0]
    if valid < local_batch:
      pad = np.zeros((local_batch - valid,) + images.shape[1:], images.dtype)
      chunk = np.concatenate([chunk, pad], axis=0)
    out = encode(host_local_to_global(chunk, mesh))
    # Fetch the previous step only after dispatching this one, so the host-to-device copy and
    # the computation of step s overlap with the device-to-host copy of step s - 1.
    if pending is not None:
      outputs.append(fetch(*pending))
    pending = (out, valid)
  if pending is not None:
    outputs.append(fetch(*pending))
  feats = np.concatenate(outputs, axis=0)
  if feats.ndim != 2 or feats.shape[0] != n:
    raise ValueError(f"encode_fn must map [b, ...] images to [b, F] features; got features of "
                     f"shape {feats.shape} for {n} images")
  return feats


def extract_features_from_iterator(encode_fn: Callable[..., jax.Array],
                                   batches: Iterable[Mapping[str, Any]], *,
                                   mesh: Mesh, variables: Any = None) -> np.ndarray:
  """Features of an iterator of padded batches, masked rows dropped.

  Args:
    encode_fn: as in :func:`extract_features`.
    batches: dicts with ``"image"`` ``[b, H, W, C]`` and ``"mask"`` ``[b]`` (bool or 0/1; 0 marks
      padding rows) as this process's local batch, ``b * process_count`` a multiple of
      ``mesh.size``. Keep ``b`` fixed (pad the last batch, as an evaluation pipeline does) to
      compile once. With several processes, every process must yield the same number of
      batches.
    mesh: the ``("data",)`` mesh.
    variables: as in :func:`extract_features`.

  Returns:
    ``[M, F] float32``: the rows whose mask is set, in iteration order (``M`` = number of set
    mask entries over all local batches).
  """
  sharding = data_sharding(mesh)
  encode = _bind(jax.jit(encode_fn, out_shardings=sharding), variables)
  outputs, pending = [], None
  for batch in batches:
    if "image" not in batch or "mask" not in batch:
      raise ValueError(f"extract_features_from_iterator needs batches with 'image' and 'mask' "
                       f"keys; got keys {sorted(batch)}")
    image = np.asarray(batch["image"])
    mask = np.asarray(batch["mask"]).astype(bool).reshape(-1)
    if mask.shape[0] != image.shape[0]:
      raise ValueError(f"batch 'mask' has {mask.shape[0]} entries for {image.shape[0]} images; "
                       "they must match")
    check_batch_divisible(image.shape[0] * jax.process_count(), mesh, "evaluation batch")
    out = encode(host_local_to_global(image, mesh))
    if pending is not None:
      outputs.append(_host_local_rows(pending[0])[pending[1]].astype(np.float32))
    pending = (out, mask)
  if pending is not None:
    outputs.append(_host_local_rows(pending[0])[pending[1]].astype(np.float32))
  if not outputs:
    raise ValueError("extract_features_from_iterator got an empty iterator of batches")
  return np.concatenate(outputs, axis=0)


def map_row_chunks(fn: Callable[..., Any], rows: Any, *consts: Any, chunk: int,
                   static: Mapping[str, Any] | None = None) -> Any:
  """``fn(*rows[i:i + chunk], *consts, **static)`` over fixed-size row chunks, concatenated.

  The evaluators' memory bound: a ``[chunk, N_train]`` similarity block instead of
  ``[N_test, N_train]``. The last chunk is zero-padded to ``chunk`` rows (one compilation) and
  its padded outputs dropped, so ``fn`` must treat rows independently.

  Args:
    fn: jittable ``(*[chunk, ...] row blocks, *consts) -> [chunk, ...]`` (or a pytree of such).
    rows: one ``[N, ...]`` array, or a tuple of arrays sharing ``N`` (e.g. features and labels),
      split together.
    consts: arguments passed whole to every call (put on device once).
    chunk: rows per call (positive).
    static: hashable keyword arguments of ``fn`` made static under ``jit``. Pass a module-level
      ``fn`` with its settings here rather than a fresh closure: jit caches by function, so a
      repeated evaluation (the trainer's periodic kNN monitor) then compiles only once.

  Returns:
    ``[N, ...]`` numpy array(s) of ``fn``'s outputs, with ``fn``'s pytree structure.
  """
  if chunk <= 0:
    raise ValueError(f"chunk={chunk} must be positive")
  rows = tuple(np.asarray(r) for r in rows) if isinstance(rows, tuple) else (np.asarray(rows),)
  n = rows[0].shape[0]
  if any(r.shape[0] != n for r in rows):
    raise ValueError(f"row arrays differ in length: {[r.shape[0] for r in rows]}")
  if n == 0:
    raise ValueError("map_row_chunks got zero rows")
  static = dict(static or {})
  jitted = functools.partial(jax.jit(fn, static_argnames=tuple(static)), **static)
  consts = tuple(jnp.asarray(c) for c in consts)
  chunk = min(chunk, n)
  outputs = []
  for start in range(0, n, chunk):
    parts = []
    for r in rows:
      part = r[start:start + chunk]
      if part.shape[0] < chunk:
        part = np.concatenate([part, np.zeros((chunk - part.shape[0],) + r.shape[1:], r.dtype)])
      parts.append(part)
    outputs.append((jitted(*parts, *consts), min(chunk, n - start)))
  trimmed = [jax.tree.map(lambda o, v=v: np.asarray(o)[:v], out) for out, v in outputs]
  return jax.tree.map(lambda *parts: np.concatenate(parts, axis=0), *trimmed)
