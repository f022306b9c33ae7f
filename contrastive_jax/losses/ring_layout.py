"""The static layout of a ring pass: what a ring loss is (``RingSpec``), how a block is cut
into tiles (``Layout``, ``Tile``), where a tile's columns sit in the all-gather layout, and how
blocks move between devices (``pass_on``). Used by ``ring_driver``.

Tiles follow Inf-CL (Cheng et al. 2024, "Breaking the Memory Barrier: Near Infinite Batch Size
Scaling for Contrastive Loss"): row tiles of anchors against column tiles of candidates, as
even as possible, the padded rows and columns masked.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax
import jax.numpy as jnp

from contrastive_jax.losses.common import PLAIN, NegativeOptions


@dataclasses.dataclass(frozen=True)
class RingSpec:
  """Static description of one ring loss (hashable: a ``custom_vjp`` non-diff argument).

  kind: the accumulator: "infonce" (plain InfoNCE), "stats" (``NegativeOptions`` or group
    ids) or "sigmoid" (SigLIP).
  divide: the scalar is a temperature (logits ``sim / scale``) rather than a logit scale
    (``sim * scale``).
  pos_shift: anchor r's positive is column ``(r + pos_shift) % c`` of its own block.
  mask_self: drop column r of anchor r's own block (NT-Xent: an anchor is not its own candidate).
  halves: the block is ``halves`` stacked sub-blocks, each a slice of a different global
    column range (NT-Xent's block is [z1_j; z2_j]: columns j n.. and N + j n..); used for the
    tie rule of the accuracy only.
  keys_grad: whether the keys receive a gradient (False for MoCo v3's momentum keys).
  axis_name: the ring axis, or None for one device.
  tile: at most this many rows and columns of a block are scored at once (None: the block).
  options: how negatives are treated (kind "stats").
  """
  kind: str
  divide: bool
  pos_shift: int
  mask_self: bool
  halves: int
  keys_grad: bool
  axis_name: str | None
  tile: int | None = None
  options: NegativeOptions = PLAIN


def ring_size(axis_name: str | None) -> int:
  return 1 if axis_name is None else int(jax.lax.axis_size(axis_name))


def my_index(axis_name: str | None) -> jax.Array:
  return jnp.zeros((), jnp.int32) if axis_name is None else jax.lax.axis_index(axis_name)


def varying(x: jax.Array, axis_name: str | None) -> jax.Array:
  """Marks a replicated value as device-varying, so that loop carries and the cotangents of the
  custom VJP (per-device partial sums) have one type; autodiff turns this into a ``psum``."""
  if axis_name is None:
    return x
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)        # jax >= 0.9; older: ``aval.vma``
  varying = manual.varying if manual is not None else getattr(aval, "vma", frozenset())
  if axis_name in varying:
    return x
  return jax.lax.pcast(x, axis_name, to="varying")


def pass_on(x: Any, axis_name: str | None, size: int) -> Any:
  """Sends ``x`` (a pytree) one step along the ring: device i -> i + 1 mod W."""
  if axis_name is None or size == 1:
    return x
  perm = [(i, (i + 1) % size) for i in range(size)]
  return jax.tree.map(lambda v: jax.lax.ppermute(v, axis_name, perm), x)


def tiling(size: int, tile: int | None) -> tuple[int, int]:
  """``(length, count)`` of the tiles covering ``size`` rows with tiles of at most ``tile``.

  The tiles are as even as possible (``length = ceil(size / count)``), so the padding, which
  is masked, is less than one row per tile: 1,000 rows with ``tile=256`` are 4 tiles of 250.
  ``tile=None`` (or ``tile >= size``) is one tile, the whole block.
  """
  if tile is None or tile >= size:
    return size, 1
  count = -(-size // tile)
  return -(-size // count), count


def pad_rows(x: jax.Array, rows: int) -> jax.Array:
  """[r, ...] -> [rows, ...] with zero rows appended (a no-op when ``rows == r``)."""
  extra = rows - x.shape[0]
  return x if extra == 0 else jnp.pad(x, [(0, extra)] + [(0, 0)] * (x.ndim - 1))


def row_slice(x: jax.Array, start: jax.Array, length: int) -> jax.Array:
  """Rows ``start .. start + length`` of ``x`` (a tile; ``start`` may be traced)."""
  return jax.lax.dynamic_slice_in_dim(x, start, length, axis=0)


def add_to_rows(x: jax.Array, start: jax.Array, update: jax.Array) -> jax.Array:
  """``x`` with ``update`` added to its rows ``start ..`` (in place inside a loop)."""
  old = row_slice(x, start, update.shape[0])
  return jax.lax.dynamic_update_slice_in_dim(x, old + update, start, axis=0)


@dataclasses.dataclass(frozen=True)
class Tile:
  """Where the tile (row tile ``rows``, column tile from ``col0``) of the block held at ``hop``
  sits; builds its masks from [t] targets that depend on ``hop``, so that XLA fuses them into
  their consumers instead of hoisting constant [t, u] masks out of the loops."""
  spec: RingSpec
  hop: jax.Array
  rows: jax.Array          # [t] block-local row indices (anchors), padded rows included
  col0: jax.Array          # first block-local column of the tile
  width: int               # u, columns per tile
  num_cols: int            # c, real columns of the block (the rest is padding)
  padded: bool             # whether the block has padded columns

  @property
  def cols(self) -> jax.Array:
    return self.col0 + jnp.arange(self.width)

  def pos_local(self) -> jax.Array:
    """[t] tile-local column of each row's positive, -1 where it is not in this tile."""
    local = (self.rows + self.spec.pos_shift) % self.num_cols - self.col0
    inside = (self.hop == 0) & (local >= 0) & (local < self.width)
    return jnp.where(inside, local, -1)

  def is_pos(self) -> jax.Array:
    return jnp.arange(self.width)[None, :] == self.pos_local()[:, None]

  def mask(self, logits: jax.Array) -> jax.Array:
    """-inf at the excluded entries: the anchor itself (NT-Xent, own block) and padding."""
    if self.spec.mask_self:
      own = jnp.where(self.hop == 0, self.rows, -1)
      logits = jnp.where(self.cols[None, :] == own[:, None], -jnp.inf, logits)
    if self.padded:
      logits = jnp.where(self.cols[None, :] < self.num_cols, logits, -jnp.inf)
    return logits


def global_columns(spec: RingSpec, source: jax.Array, cols: jax.Array, c: int,
                   size: int) -> jax.Array:
  """Global column index (in the all-gather layout) of block ``source``'s columns ``cols``.

  Increasing along the block for every source, so a tile's first maximal local column is also
  its first maximal global column.
  """
  width = c // spec.halves
  return (cols // width) * (size * width) + source * width + cols % width


@dataclasses.dataclass(frozen=True)
class Layout:
  """The shape of one ring pass: ``m`` anchors in ``num_rt`` row tiles of ``t``, blocks of ``c``
  candidates in ``num_ct`` column tiles of ``u``, ``size`` devices, this one ``me``."""
  spec: RingSpec
  m: int
  c: int
  t: int
  num_rt: int
  u: int
  num_ct: int
  size: int
  me: jax.Array

  @classmethod
  def of(cls, spec: RingSpec, anchors: jax.Array, keys: jax.Array) -> Layout:
    m, c = anchors.shape[0], keys.shape[0]
    return cls(spec, m, c, *tiling(m, spec.tile), *tiling(c, spec.tile),
               ring_size(spec.axis_name), my_index(spec.axis_name))

  def pad(self, x: jax.Array | None, rows: int) -> jax.Array | None:
    """Zero rows appended to embeddings; -1 (unknown) to group ids; ``None`` stays ``None``."""
    if x is None:
      return None
    if jnp.issubdtype(x.dtype, jnp.integer):
      return pad_rows(x + 1, rows) - 1
    return pad_rows(x, rows)

  def tile(self, hop: jax.Array, rows: jax.Array, j: jax.Array) -> Tile:
    return Tile(self.spec, hop, rows, j * self.u, self.u, self.c,
                self.u * self.num_ct != self.c)


def check_tile(tile: Any) -> int | None:
  """``None`` or 0 (no tiling) or a positive int; raised before anything is traced."""
  if isinstance(tile, bool) or not (tile is None or isinstance(tile, numbers.Integral)) or (
      tile is not None and tile < 0):
    raise ValueError(f"tile must be a positive int (rows and columns scored at once) or "
                     f"None/0 for whole blocks, got {tile!r}; e.g. set config.loss_tile=1024")
  return int(tile) if tile else None
