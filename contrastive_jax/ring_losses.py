"""Memory-bounded ring forms of the in-batch contrastive losses (same values and gradients).

The all-gather losses of ``losses.py`` build an ``[n, N]`` logit matrix on every device (``n``
local rows, ``N`` global candidates), so per-device memory grows with the *global* batch. Here
the candidate (key) blocks ``[n, D]`` travel around the ring of the ``"data"`` axis instead
(``jax.lax.ppermute``, device ``i`` sends to ``i + 1 mod W``); after ``k`` hops device ``i``
holds the block of device ``i - k mod W``. Each device scores its local anchors against one
``[n, n]`` block at a time and keeps per-row running statistics, the blockwise (online)
log-sum-exp of Milakov & Gimelshein 2018 ("Online normalizer calculation for softmax"), as in
ring attention (Liu et al. 2023) and the chunked SigLIP loss (Zhai et al. 2023, Sec. 3.3):

  m_r <- max(m_r, max_c l_rc),   s_r <- s_r exp(m_r_old - m_r) + sum_c exp(l_rc - m_r),
  lse_r = m_r + log s_r,         loss_r = lse_r - l_r,pos.

The positive of every anchor lives in the anchor's own block (hop 0: the block whose source
index equals this device's index), which is where the label offset ``axis_index * n`` of the
all-gather form went; self-masking (NT-Xent) also only happens there, with ``-inf``.

Backward pass (``jax.custom_vjp``): nothing per block is stored. The residuals are the inputs
and the per-row ``lse`` ``[n]``; the backward pass sends the key blocks around the ring again,
recomputes each block's logits and ``P = exp(l - lse)`` (the softmax restricted to the block)
and, with ``g_r`` the cotangent of row r's loss, ``G = g (P - Y)`` (``Y`` the one-hot positive,
own block only) ``= dL/dl``. With logits ``l = f(s) sim`` (``f(s) = 1/T`` for a temperature,
``f(s) = s`` for a logit scale):

  dL/dA      = f(s) sum_blocks G K_b          accumulated on the anchors' device;
  dL/dK_b    = f(s) G^T A                      a gradient buffer that travels *with* block b:
               every device adds its share for the block it holds, then passes block and
               buffer on together; after W hops both are back at the block's owner;
  dL/ds      = f'(s) sum_rc G_rc sim_rc = f'(s) sum_r g_r (E_{P_r}[sim_r] - sim_r,pos)
               = f'(s) sum_r A_r . (sum_b G_b K_b)_r  (sim = A K^T: read off the dL/dA sum),
               (f' = -1/T^2 for a temperature, 1 for a scale).

SigLIP's loss is additive over blocks (no normaliser): ``loss_r = sum_c softplus(-z_rc l_rc)``
with ``l = t sim + b``, ``z = +1`` on the positive; its backward pass is the same ring with
``G = -g z sigmoid(-z l)`` and ``dL/db = sum G``.

Tiles inside the block (``tile``; Inf-CL, Cheng et al. 2024, "Breaking the Memory Barrier: Near
Infinite Batch Size Scaling for Contrastive Loss"): with ``tile=None`` a hop scores its whole
``[n, n]`` block at once, so the peak temporary memory per device is O(n x n), which at large
*local* batches is the wall (NT-Xent's ``[2n, 2n]`` block at n = 32,768 is 16 GiB). With
``tile=t`` a hop runs a loop over row tiles of ``t`` anchors and, inside it, a loop over
column tiles of ``t`` candidates; only one ``[t, t]`` tile of logits is live. The per-row
statistics above are updated tile by tile (the online log-sum-exp is the same recurrence over
finer pieces), and the backward pass recomputes tile by tile: dL/dA of a row tile accumulates
over its column tiles, dL/dK_b of a column tile is added into its rows of the travelling
buffer. Peak temporary memory is then O(n x D + t^2): the embeddings, the blocks and gradient
buffers in flight, and one tile. The FLOPs are the same; only the loop overhead grows. Local
rows need not be divisible by ``t``: the tiles are made as even as possible (1,000 rows and
``t = 256`` are 4 tiles of 250), and the few padded rows and columns that remain are masked
(``-inf`` logits, zero cotangents).

Without tiles the peak is O(n x n) (one block of logits) plus O(n x D) (the blocks in flight
and the gradient buffer), in the forward and the backward pass: no ``[n, N]`` array either way.
Each hop is one iteration of a ``fori_loop`` whose body is the same for every hop (the own
block is selected by ``hop == 0`` inside it), so the compiler cannot overlap two blocks.

Top-1 accuracy is exact, including ties: a running (max, argmax) per row, where the argmax is
the *global* column index in the all-gather layout and ties go to the smaller index, exactly
``jnp.argmax`` over the gathered row; a hit is ``argmax == positive's global column``.

Signatures, conventions (what is averaged or summed, the ``2T`` of MoCo v3), input handling
(raw embeddings, L2-normalised in float32 inside) and metrics equal those of ``losses.py``;
``axis_name=None`` is the ring of length one (the single-device loss).

Communication: clip makes two ring passes (image->text and text->image), each moving one
``[n, D]`` float32 block per hop forward and, in the backward pass, the block plus its
``[n, D]`` gradient buffer; W hops per pass (the forward's last hop only brings the block
home) instead of one all-gather: more latencies, the price of the bounded memory. On one
device (or ``axis_name=None``) no message is sent.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from contrastive_jax import losses
from contrastive_jax.losses import (_check_embeddings, _check_positive, _global_mean,
                                    _out, _sim)
from contrastive_jax.losses import l2_normalize as _normalize


# ----------------------------------------------------------------------------- ring engine


@dataclasses.dataclass(frozen=True)
class _RingSpec:
  """Static description of one ring loss (hashable: a ``custom_vjp`` non-diff argument).

  kind: "softmax" (InfoNCE, online log-sum-exp) or "sigmoid" (SigLIP, additive).
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
  options: how negatives are treated (``_ring_stats`` only; the plain ring is InfoNCE).
  """
  kind: str
  divide: bool
  pos_shift: int
  mask_self: bool
  halves: int
  keys_grad: bool
  axis_name: str | None
  tile: int | None = None
  options: losses.NegativeOptions = losses.PLAIN


def _ring_size(axis_name: str | None) -> int:
  return 1 if axis_name is None else int(jax.lax.axis_size(axis_name))


def _my_index(axis_name: str | None) -> jax.Array:
  return jnp.zeros((), jnp.int32) if axis_name is None else jax.lax.axis_index(axis_name)


def _varying(x: jax.Array, axis_name: str | None) -> jax.Array:
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


def _hop(x: Any, axis_name: str | None, size: int) -> Any:
  """Sends ``x`` (a pytree) one step along the ring: device i -> i + 1 mod W."""
  if axis_name is None or size == 1:
    return x
  perm = [(i, (i + 1) % size) for i in range(size)]
  return jax.tree.map(lambda v: jax.lax.ppermute(v, axis_name, perm), x)


def _factor(spec: _RingSpec, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``f(s)`` and ``f'(s)`` of ``logits = f(s) * sim (+ bias)``."""
  if spec.divide:
    return 1.0 / scale, -1.0 / (scale * scale)
  return scale, jnp.ones_like(scale)


def _tiling(size: int, tile: int | None) -> tuple[int, int]:
  """``(length, count)`` of the tiles covering ``size`` rows with tiles of at most ``tile``.

  The tiles are as even as possible (``length = ceil(size / count)``), so the padding, which
  is masked, is less than one row per tile: 1,000 rows with ``tile=256`` are 4 tiles of 250.
  ``tile=None`` (or ``tile >= size``) is one tile, the whole block.
  """
  if tile is None or tile >= size:
    return size, 1
  count = -(-size // tile)
  return -(-size // count), count


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
  """[r, ...] -> [rows, ...] with zero rows appended (a no-op when ``rows == r``)."""
  extra = rows - x.shape[0]
  return x if extra == 0 else jnp.pad(x, [(0, extra)] + [(0, 0)] * (x.ndim - 1))


def _rows(x: jax.Array, start: jax.Array, length: int) -> jax.Array:
  """Rows ``start .. start + length`` of ``x`` (a tile; ``start`` may be traced)."""
  return jax.lax.dynamic_slice_in_dim(x, start, length, axis=0)


def _add_rows(x: jax.Array, start: jax.Array, update: jax.Array) -> jax.Array:
  """``x`` with ``update`` added to its rows ``start ..`` (in place inside a loop)."""
  old = _rows(x, start, update.shape[0])
  return jax.lax.dynamic_update_slice_in_dim(x, old + update, start, axis=0)


def _tile_logits(spec: _RingSpec, anchors, tile_keys, bias):
  """[t, D] pre-scaled anchors x [u, D] keys -> [t, u] float32 logits ``f(s) A.K^T (+ b)``.

  The factor ``f(s)`` scales the anchors before the matmul, so the matmul's output is the
  logits tile itself: scaling the [t, u] product instead costs a second [t, u] buffer (XLA on
  CPU does not fuse the scaling into the dot). Values equal ``losses.py`` up to float32
  rounding (one multiplication moved before the sum).
  """
  logits = _sim(anchors, tile_keys)
  if spec.kind == "sigmoid":
    logits = logits + bias
  return logits


@dataclasses.dataclass(frozen=True)
class _Tile:
  """Where the tile (row tile ``rows``, column tile from ``col0``) of the block held at ``hop``
  sits; builds its masks from [t] targets that depend on ``hop``, so that XLA fuses them into
  their consumers instead of hoisting constant [t, u] masks out of the loops."""
  spec: _RingSpec
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


def _global_columns(spec: _RingSpec, source: jax.Array, cols: jax.Array, c: int,
                    size: int) -> jax.Array:
  """Global column index (in the all-gather layout) of block ``source``'s columns ``cols``.

  Increasing along the block for every source, so a tile's first maximal local column is also
  its first maximal global column.
  """
  width = c // spec.halves
  return (cols // width) * (size * width) + source * width + cols % width


def _ring_forward(spec: _RingSpec, anchors, keys, scale, bias):
  """Returns per-row loss [m], hit [m] and the per-row lse [m] (softmax) for the backward.

  One loop of W identical hops (score the block held, then pass it on): the scheduler never
  overlaps two iterations, so the peak is one tile's logits whatever W is. Inside a hop, a loop
  over row tiles and, inside that, a loop over column tiles updates the per-row statistics of
  the tile's rows. The last hop brings every block home again; it is one [c, D] message and
  keeps the body free of special cases.
  """
  axis, size = spec.axis_name, _ring_size(spec.axis_name)
  me = _my_index(axis)
  m, c = anchors.shape[0], keys.shape[0]
  dtype = anchors.dtype
  t, num_rt = _tiling(m, spec.tile)
  u, num_ct = _tiling(c, spec.tile)
  f = _factor(spec, scale)[0]
  anchors = _pad_rows(anchors, t * num_rt)                                    # [m', D]
  keys = _pad_rows(keys, u * num_ct)                                          # [c', D]

  def tile_update(hop, block, rows, a, j, stats):
    pos_logit, best, best_col, state = stats
    tile = _Tile(spec, hop, rows, j * u, u, c, u * num_ct != c)
    logits = tile.mask(_tile_logits(spec, a, _rows(block, j * u, u), bias))    # [t, u]
    pos = tile.pos_local()
    # A gather of t entries, not a masked [t, u] sum (which XLA materialises on CPU).
    picked = jnp.take_along_axis(logits, jnp.maximum(pos, 0)[:, None], axis=1)[:, 0]
    pos_logit = pos_logit + jnp.where(pos >= 0, picked, 0.0)
    # Running argmax with argmax's rule: the first maximal global column wins.
    local = jnp.argmax(logits, axis=1)
    tile_max = jnp.max(logits, axis=1)
    tile_col = _global_columns(spec, (me - hop) % size, tile.cols, c, size)[local]
    better = (tile_max > best) | ((tile_max == best) & (tile_col < best_col))
    best, best_col = jnp.where(better, tile_max, best), jnp.where(better, tile_col, best_col)
    if spec.kind == "softmax":
      row_max, sum_exp = state
      new_max = jnp.maximum(row_max, tile_max)
      # A row's first tiles may be all -inf (its own column in a tile of one, or padding): a
      # finite shift keeps exp(-inf - -inf) out.
      shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
      sum_exp = (sum_exp * jnp.exp(row_max - shift)
                 + jnp.sum(jnp.exp(logits - shift[:, None]), axis=1))
      state = (new_max, sum_exp)
    else:
      signs = jnp.where(tile.is_pos(), 1.0, -1.0).astype(dtype)
      terms = jax.nn.log_sigmoid(signs * logits)          # padded columns: zeroed below
      if tile.padded:
        terms = jnp.where(tile.cols[None, :] < c, terms, 0.0)
      state = (state[0] - jnp.sum(terms, axis=1),)
    return pos_logit, best, best_col, state

  def hop_body(hop, carry):
    block, stats = carry

    def row_body(i, stats):
      rows = i * t + jnp.arange(t)
      a = _rows(anchors, i * t, t) * f        # scaled per tile: no scaled [m, D] copy
      mine = jax.tree.map(lambda x: _rows(x, i * t, t), stats)
      mine = jax.lax.fori_loop(
          0, num_ct, lambda j, s: tile_update(hop, block, rows, a, j, s), mine)
      return jax.tree.map(
          lambda x, y: jax.lax.dynamic_update_slice_in_dim(x, y, i * t, axis=0), stats, mine)

    stats = jax.lax.fori_loop(0, num_rt, row_body, stats)
    return _hop(block, axis, size), stats

  per_row = lambda value, dt=dtype: _varying(jnp.full((t * num_rt,), value, dt), axis)
  state = (per_row(-jnp.inf), per_row(0.0)) if spec.kind == "softmax" else (per_row(0.0),)
  stats = (per_row(0.0), per_row(-jnp.inf), per_row(0, jnp.int32), state)
  _, stats = jax.lax.fori_loop(0, size, hop_body, (keys, stats))
  pos_logit, _, best_col, state = jax.tree.map(lambda x: x[:m], stats)

  pos_local = (jnp.arange(m) + spec.pos_shift) % c
  pos_column = _global_columns(spec, me, pos_local, c, size)
  hit = (best_col == pos_column).astype(dtype)
  if spec.kind == "softmax":
    lse = state[0] + jnp.log(state[1])
    return lse - pos_logit, hit, lse
  return state[0], hit, jnp.zeros((m,), dtype)


def _ring_backward(spec: _RingSpec, residuals, cotangents):
  """Second ring pass: recompute each tile, accumulate dL/dA here and dL/dK in a buffer that
  travels with the block; after W hops block and buffer are back at the block's owner."""
  anchors, keys, scale, bias, lse = residuals
  g = cotangents[0]                                   # the hit output has no gradient
  axis, size = spec.axis_name, _ring_size(spec.axis_name)
  m, c = anchors.shape[0], keys.shape[0]
  dim = anchors.shape[1]
  dtype = anchors.dtype
  f, df = _factor(spec, scale)
  t, num_rt = _tiling(m, spec.tile)
  u, num_ct = _tiling(c, spec.tile)
  # Padded rows get g = 0 (and a finite lse), so they add nothing to any gradient.
  anchors_p = _pad_rows(anchors, t * num_rt)
  g, lse = _pad_rows(g, t * num_rt), _pad_rows(lse, t * num_rt)
  keys = _pad_rows(keys, u * num_ct)

  def tile_update(hop, block, rows, a, a_scaled, g_i, lse_i, j, carry):
    d_keys, d_a, d_bias = carry
    tile = _Tile(spec, hop, rows, j * u, u, c, u * num_ct != c)
    k = _rows(block, j * u, u)
    logits = _tile_logits(spec, a_scaled, k, bias)
    if spec.kind == "softmax":
      grad = jnp.exp(tile.mask(logits) - lse_i[:, None]) - tile.is_pos().astype(dtype)
    else:
      signs = jnp.where(tile.is_pos(), 1.0, -1.0).astype(dtype)
      grad = -signs * jax.nn.sigmoid(-signs * logits)
      if tile.padded:
        grad = jnp.where(tile.cols[None, :] < c, grad, 0.0)
    grad = g_i[:, None] * grad                                            # dL/dlogits [t, u]
    d_a = d_a + jnp.einsum("tu,ud->td", grad, k, precision=losses._HIGHEST)
    if spec.kind == "sigmoid":
      d_bias = d_bias + jnp.sum(grad)
    if spec.keys_grad:
      d_keys = _add_rows(d_keys, j * u,
                         jnp.einsum("tu,td->ud", grad, a, precision=losses._HIGHEST))
    return d_keys, d_a, d_bias

  zeros = lambda shape: _varying(jnp.zeros(shape, dtype), axis)

  def hop_body(hop, carry):
    block, d_keys, d_anchors, d_bias = carry

    def row_body(i, carry):
      d_keys, d_anchors, d_bias = carry
      rows = i * t + jnp.arange(t)
      a = _rows(anchors_p, i * t, t)
      a_scaled = a * f                        # per tile: no scaled [m, D] copy
      g_i, lse_i = _rows(g, i * t, t), _rows(lse, i * t, t)
      d_keys, d_a, d_bias = jax.lax.fori_loop(
          0, num_ct, lambda j, cr: tile_update(hop, block, rows, a, a_scaled, g_i, lse_i, j, cr),
          (d_keys, zeros((t, dim)), d_bias))
      return d_keys, _add_rows(d_anchors, i * t, d_a), d_bias

    d_keys, d_anchors, d_bias = jax.lax.fori_loop(
        0, num_rt, row_body, (d_keys, d_anchors, d_bias))
    if spec.keys_grad:
      block, d_keys = _hop((block, d_keys), axis, size)
    else:
      block = _hop(block, axis, size)
    return block, d_keys, d_anchors, d_bias

  d_keys = zeros(keys.shape if spec.keys_grad else (0,))
  carry = (keys, d_keys, zeros(anchors_p.shape), zeros(()))
  _, d_keys, d_anchors, d_bias = jax.lax.fori_loop(0, size, hop_body, carry)
  d_anchors = d_anchors[:m]
  d_keys = d_keys[:c] if spec.keys_grad else jnp.zeros_like(residuals[1])
  # sum_rc G_rc sim_rc = sum_r A_r . (sum_c G_rc K_c): the scale's gradient comes from the
  # accumulated d_anchors, so no tile of similarities is kept in the backward pass.
  d_scale = df * jnp.sum(anchors * d_anchors)
  return f * d_anchors, f * d_keys, d_scale.astype(scale.dtype), d_bias.astype(bias.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(spec: _RingSpec, anchors, keys, scale, bias):
  per_row, hit, _ = _ring_forward(spec, anchors, keys, scale, bias)
  return per_row, hit


def _ring_fwd(spec, anchors, keys, scale, bias):
  per_row, hit, lse = _ring_forward(spec, anchors, keys, scale, bias)
  return (per_row, hit), (anchors, keys, scale, bias, lse)


_ring.defvjp(_ring_fwd, _ring_backward)


def _run_ring(spec: _RingSpec, anchors, keys, scale, bias=0.0):
  """Per-row loss [m] and hit [m] of ``anchors`` against the ring of ``keys`` blocks."""
  dtype = anchors.dtype
  scale = _varying(jnp.asarray(scale, dtype), spec.axis_name)
  bias = _varying(jnp.asarray(bias, dtype), spec.axis_name)
  return _ring(spec, anchors, keys, scale, bias)


def _check_tile(tile: Any) -> int | None:
  """``None`` or 0 (no tiling) or a positive int; raised before anything is traced."""
  if isinstance(tile, bool) or not (tile is None or isinstance(tile, numbers.Integral)) or (
      tile is not None and tile < 0):
    raise ValueError(f"tile must be a positive int (rows and columns scored at once) or "
                     f"None/0 for whole blocks, got {tile!r}; e.g. set config.loss_tile=1024")
  return int(tile) if tile else None


def _spec(kind="softmax", *, divide, axis_name, tile, pos_shift=0, mask_self=False, halves=1,
          keys_grad=True) -> _RingSpec:
  return _RingSpec(kind=kind, divide=divide, pos_shift=pos_shift, mask_self=mask_self,
                   halves=halves, keys_grad=keys_grad, axis_name=axis_name,
                   tile=_check_tile(tile))


# ----------------------------------------------------------------------------- negative options
#
# With ``losses.NegativeOptions`` (debiased, hard, decoupled, multi-positive) or group ids the
# per-row loss is a function of per-row statistics, each a sum over the row's candidates
# (``losses.row_stats``: log-sum-exps over the positives and the negatives, the sum of the
# positives' logits, counts). The forward pass accumulates them tile by tile with the online
# log-sum-exp, exactly like the plain ring's single lse; the loss is then the all-gather form's
# own function of them (``losses.loss_from_stats``), differentiated by ordinary autodiff. The
# ring's custom VJP receives the cotangent of every statistic and recomputes each tile:
#
#   dL/dl_rc = c_r[pos_logit] [c in P_r]
#              + sum_k c_r[lse_k] w_k exp(w_k l_rc - lse_k,r) [c in S_k,r],
#
# with (w_k, S_k) = (1, positives) for "pos", (1, negatives) for "neg", (1 + beta, negatives)
# for "neg_hard" and (beta, negatives) for "neg_beta"; the counts and the diagnostics carry no
# gradient. dL/dA, dL/dK_b (the buffer travelling with the block), dL/ds and dL/db then follow
# from dL/dl exactly as in the plain ring above. SigLIP (multi-positive only) is additive: its
# statistic is the row's loss and ``dL/dl = -g z sigmoid(-z l)`` with z = +1 on every positive.
# Group ids travel with their key block. Memory and tiling are those of the plain ring.


def _used_lse(options: losses.NegativeOptions) -> tuple[str, ...]:
  """The log-sum-exp statistics ``losses.loss_from_stats`` reads for ``options`` (the others
  are neither computed nor differentiated)."""
  if options.reweighted:
    return ("neg_hard", "neg_beta")
  return ("neg",) if options.decoupled else ("pos", "neg")


def _option_masks(spec: _RingSpec, tile: _Tile, a_groups, k_groups):
  """[t, u] masks (positives, negatives, same-class negatives, negatives of labelled rows) of a
  tile; the anchor itself (NT-Xent) and padded columns are in none of them."""
  if spec.mask_self:
    self_mask = (tile.hop == 0) & (tile.cols[None, :] == tile.rows[:, None])
  else:
    self_mask = jnp.zeros((tile.rows.shape[0], tile.width), bool)
  masks = losses._group_masks(a_groups, k_groups, self_mask, tile.is_pos(), spec.options)
  if not tile.padded:
    return masks
  valid = tile.cols[None, :] < tile.num_cols
  return tuple(mask & valid for mask in masks)


def _stats_forward(spec: _RingSpec, anchors, keys, a_groups, k_groups, scale, bias):
  """The row statistics [m] of ``losses.row_stats`` over the whole ring (lse values for the
  log-sum-exps), or SigLIP's per-row loss, and the hit [m]."""
  axis, size = spec.axis_name, _ring_size(spec.axis_name)
  me = _my_index(axis)
  m, c = anchors.shape[0], keys.shape[0]
  dtype = anchors.dtype
  t, num_rt = _tiling(m, spec.tile)
  u, num_ct = _tiling(c, spec.tile)
  f = _factor(spec, scale)[0]
  beta = spec.options.hard_beta
  used = _used_lse(spec.options)
  anchors, a_groups = _pad_rows(anchors, t * num_rt), _pad_rows(a_groups + 1, t * num_rt) - 1
  keys, k_groups = _pad_rows(keys, u * num_ct), _pad_rows(k_groups + 1, u * num_ct) - 1

  def tile_update(hop, block, block_groups, rows, a, a_g, j, stats):
    tile = _Tile(spec, hop, rows, j * u, u, c, u * num_ct != c)
    logits = _tile_logits(spec, a, _rows(block, j * u, u), bias)               # [t, u]
    k_g = _rows(block_groups, j * u, u)
    # Running argmax with argmax's rule (the first maximal global column wins).
    masked = tile.mask(logits)
    tile_max = jnp.max(masked, axis=1)
    tile_col = _global_columns(spec, (me - hop) % size, tile.cols, c, size)[
        jnp.argmax(masked, axis=1)]
    best, best_col = stats["best"], stats["best_col"]
    better = (tile_max > best) | ((tile_max == best) & (tile_col < best_col))
    out = dict(stats, best=jnp.where(better, tile_max, best),
               best_col=jnp.where(better, tile_col, best_col))
    pos, neg, diag, diag_total = _option_masks(spec, tile, a_g, k_g)
    if spec.kind == "sigmoid":
      signs = jnp.where(pos, 1.0, -1.0).astype(dtype)
      terms = jax.nn.log_sigmoid(signs * logits)
      if tile.padded:
        terms = jnp.where(tile.cols[None, :] < c, terms, 0.0)
      out["sigmoid"] = stats["sigmoid"] - jnp.sum(terms, axis=1)
      return out
    count = lambda mask: jnp.sum(mask.astype(dtype), axis=1)
    lse_of = {"pos": (1.0, pos), "neg": (1.0, neg), "neg_hard": (1.0 + beta, neg),
              "neg_beta": (beta, neg)}
    for name in used:
      w, mask = lse_of[name]
      out[name] = losses.combine_lse(stats[name], losses._masked_lse_terms(w * logits, mask))
    out["pos_logit"] = stats["pos_logit"] + jnp.sum(jnp.where(pos, logits, 0.0), axis=1)
    out["num_pos"] = stats["num_pos"] + count(pos)
    out["num_neg"] = stats["num_neg"] + count(neg)
    out["diag_count"] = stats["diag_count"] + count(diag)
    out["diag_total"] = stats["diag_total"] + count(diag_total)
    out["diag_logit"] = stats["diag_logit"] + jnp.sum(jnp.where(diag, logits, 0.0), axis=1)
    return out

  def hop_body(hop, carry):
    block, block_groups, stats = carry

    def row_body(i, stats):
      rows = i * t + jnp.arange(t)
      a = _rows(anchors, i * t, t) * f        # scaled per tile: no scaled [m, D] copy
      a_g = _rows(a_groups, i * t, t)
      mine = jax.tree.map(lambda x: _rows(x, i * t, t), stats)
      mine = jax.lax.fori_loop(
          0, num_ct, lambda j, s: tile_update(hop, block, block_groups, rows, a, a_g, j, s),
          mine)
      return jax.tree.map(
          lambda x, y: jax.lax.dynamic_update_slice_in_dim(x, y, i * t, axis=0), stats, mine)

    stats = jax.lax.fori_loop(0, num_rt, row_body, stats)
    block, block_groups = _hop((block, block_groups), axis, size)
    return block, block_groups, stats

  full = lambda value, dt=dtype: _varying(jnp.full((t * num_rt,), value, dt), axis)
  stats = {"best": full(-jnp.inf), "best_col": full(0, jnp.int32)}
  if spec.kind == "sigmoid":
    stats["sigmoid"] = full(0.0)
  else:
    stats.update({k: (full(-jnp.inf), full(0.0)) for k in used})
    stats.update({k: full(0.0) for k in losses.SUM_STATS})
  _, _, stats = jax.lax.fori_loop(0, size, hop_body, (keys, k_groups, stats))
  stats = jax.tree.map(lambda x: x[:m], stats)

  pos_column = _global_columns(spec, me, (jnp.arange(m) + spec.pos_shift) % c, c, size)
  out = {"hit": (stats.pop("best_col") == pos_column).astype(dtype)}
  stats.pop("best")
  for name in losses.LSE_STATS if spec.kind == "softmax" else ():
    out[name] = losses.lse_value(stats.pop(name)) if name in used else jnp.full(
        (m,), -jnp.inf, dtype)
  out.update(stats)
  return out


def _stats_backward(spec: _RingSpec, residuals, cotangents):
  """Second ring pass: each tile's dL/dlogits from the statistics' cotangents (see above),
  then dL/dA here and dL/dK in the buffer that travels with the block, as ``_ring_backward``."""
  anchors, keys, a_groups, k_groups, scale, bias, lse = residuals
  axis, size = spec.axis_name, _ring_size(spec.axis_name)
  m, c = anchors.shape[0], keys.shape[0]
  dim = anchors.shape[1]
  dtype = anchors.dtype
  f, df = _factor(spec, scale)
  beta = spec.options.hard_beta
  t, num_rt = _tiling(m, spec.tile)
  u, num_ct = _tiling(c, spec.tile)
  weights = {"pos": 1.0, "neg": 1.0, "neg_hard": 1.0 + beta, "neg_beta": beta}
  # Cotangents of the statistics that carry a gradient; padded rows get 0 (and lse 0).
  names = ("sigmoid",) if spec.kind == "sigmoid" else (
      ("pos_logit",) + tuple(k for k in _used_lse(spec.options) if weights[k] != 0.0))
  pad = lambda x: _pad_rows(x, t * num_rt)
  ct = {k: pad(cotangents[k]) for k in names}
  lse = {k: pad(v) for k, v in lse.items()}
  anchors_p, a_groups = pad(anchors), pad(a_groups + 1) - 1
  keys, k_groups = _pad_rows(keys, u * num_ct), _pad_rows(k_groups + 1, u * num_ct) - 1

  def tile_grad(tile, logits, a_g, k_g, ct_i, lse_i):
    """dL/dlogits [t, u] of one tile."""
    pos, neg = _option_masks(spec, tile, a_g, k_g)[:2]
    if spec.kind == "sigmoid":
      signs = jnp.where(pos, 1.0, -1.0).astype(dtype)
      grad = -ct_i["sigmoid"][:, None] * signs * jax.nn.sigmoid(-signs * logits)
      return jnp.where(tile.cols[None, :] < c, grad, 0.0) if tile.padded else grad
    grad = ct_i["pos_logit"][:, None] * pos.astype(dtype)
    for name in names[1:]:
      w, mask = weights[name], pos if name == "pos" else neg
      # -inf before the exp: an empty set's lse is -inf and w l - lse would be +inf.
      p = jnp.exp(jnp.where(mask, w * logits - lse_i[name][:, None], -jnp.inf))
      grad = grad + (w * ct_i[name])[:, None] * p
    return grad

  def tile_update(hop, block, block_groups, rows, a, a_scaled, a_g, ct_i, lse_i, j, carry):
    d_keys, d_a, d_bias = carry
    tile = _Tile(spec, hop, rows, j * u, u, c, u * num_ct != c)
    k = _rows(block, j * u, u)
    logits = _tile_logits(spec, a_scaled, k, bias)
    grad = tile_grad(tile, logits, a_g, _rows(block_groups, j * u, u), ct_i, lse_i)
    d_a = d_a + jnp.einsum("tu,ud->td", grad, k, precision=losses._HIGHEST)
    if spec.kind == "sigmoid":
      d_bias = d_bias + jnp.sum(grad)
    d_keys = _add_rows(d_keys, j * u, jnp.einsum("tu,td->ud", grad, a, precision=losses._HIGHEST))
    return d_keys, d_a, d_bias

  zeros = lambda shape: _varying(jnp.zeros(shape, dtype), axis)

  def hop_body(hop, carry):
    block, block_groups, d_keys, d_anchors, d_bias = carry

    def row_body(i, carry):
      d_keys, d_anchors, d_bias = carry
      rows = i * t + jnp.arange(t)
      a = _rows(anchors_p, i * t, t)
      a_scaled = a * f
      a_g = _rows(a_groups, i * t, t)
      ct_i, lse_i = jax.tree.map(lambda x: _rows(x, i * t, t), (ct, lse))
      d_keys, d_a, d_bias = jax.lax.fori_loop(
          0, num_ct, lambda j, cr: tile_update(hop, block, block_groups, rows, a, a_scaled,
                                               a_g, ct_i, lse_i, j, cr),
          (d_keys, zeros((t, dim)), d_bias))
      return d_keys, _add_rows(d_anchors, i * t, d_a), d_bias

    d_keys, d_anchors, d_bias = jax.lax.fori_loop(
        0, num_rt, row_body, (d_keys, d_anchors, d_bias))
    block, block_groups, d_keys = _hop((block, block_groups, d_keys), axis, size)
    return block, block_groups, d_keys, d_anchors, d_bias

  carry = (keys, k_groups, zeros(keys.shape), zeros(anchors_p.shape), zeros(()))
  _, _, d_keys, d_anchors, d_bias = jax.lax.fori_loop(0, size, hop_body, carry)
  d_anchors, d_keys = d_anchors[:m], d_keys[:c]
  d_scale = df * jnp.sum(anchors * d_anchors)
  return (f * d_anchors, f * d_keys, None, None, d_scale.astype(scale.dtype),
          d_bias.astype(bias.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_stats(spec: _RingSpec, anchors, keys, a_groups, k_groups, scale, bias):
  return _stats_forward(spec, anchors, keys, a_groups, k_groups, scale, bias)


def _ring_stats_fwd(spec, anchors, keys, a_groups, k_groups, scale, bias):
  out = _stats_forward(spec, anchors, keys, a_groups, k_groups, scale, bias)
  lse = {k: out[k] for k in _used_lse(spec.options)} if spec.kind == "softmax" else {}
  return out, (anchors, keys, a_groups, k_groups, scale, bias, lse)


_ring_stats.defvjp(_ring_stats_fwd, _stats_backward)


def _ring_options(anchors, keys, a_groups, k_groups, scale, bias, *, axis_name, tile, divide,
                  pos_shift, mask_self, halves, kind, options: losses.NegativeOptions):
  """The ring with ``losses.NegativeOptions`` or group ids ([m] / [c] int, -1 unknown; None:
  none known): per-row loss [m], hit [m] and the row statistics (for ``losses.diagnostics``).
  ``kind``: "softmax" or "sigmoid" (SigLIP: multi-positive only)."""
  spec = _RingSpec(kind=kind, divide=divide, pos_shift=pos_shift, mask_self=mask_self,
                   halves=halves, keys_grad=True, axis_name=axis_name, tile=_check_tile(tile),
                   options=options)
  dtype = anchors.dtype
  unknown = lambda x: jnp.full((x.shape[0],), -1, jnp.int32)
  a_groups = unknown(anchors) if a_groups is None else a_groups.astype(jnp.int32)
  k_groups = unknown(keys) if k_groups is None else k_groups.astype(jnp.int32)
  scale = _varying(jnp.asarray(scale, dtype), axis_name)
  bias = _varying(jnp.asarray(bias, dtype), axis_name)
  out = _ring_stats(spec, anchors, keys, _varying(a_groups, axis_name),
                    _varying(k_groups, axis_name), scale, bias)
  hit = jax.lax.stop_gradient(out.pop("hit"))
  if kind == "sigmoid":
    return out["sigmoid"], hit, out
  # An lse as a (max, sum) pair: (lse, 1), or (-inf, 0) for an empty set.
  stats = {k: (out[k], jnp.isfinite(out[k]).astype(dtype)) for k in losses.LSE_STATS}
  stats.update({k: out[k] for k in losses.SUM_STATS})
  stats["diag_logit"] = jax.lax.stop_gradient(stats["diag_logit"])
  return losses.loss_from_stats(stats, options, -_factor(spec, scale)[0]), hit, stats

# ----------------------------------------------------------------------------- losses


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float | jax.Array,
            axis_name: str | None = None, *, return_metrics: bool = False,
            tile: int | None = None, groups: jax.Array | None = None,
            options: losses.NegativeOptions = losses.PLAIN):
  """SimCLR's NT-Xent over the global batch, ring form of ``losses.nt_xent`` (same value).

  Args:
    z1, z2: [n, D] this shard's projections of the two views. Any float dtype.
    temperature: scalar tau > 0.
    axis_name: ring axis inside ``shard_map``; ``None`` on one device.
    return_metrics: also return ``{"accuracy": ...}``.
    tile: score at most ``tile`` anchors x ``tile`` candidates at once (see ``get_loss``).

  Returns:
    Scalar float32 mean over the 2N anchors of ``-log softmax(sim / tau)[twin]``; the anchors
    are this shard's 2n views, each block of candidates is ``[z1_j; z2_j]`` [2n, D] of device
    j, and an anchor is masked out of its own block only.
  """
  _check_embeddings("z1", z1, "z2", z2)
  _check_positive("temperature", temperature)
  n = z1.shape[0]
  views = jnp.concatenate([_normalize(z1), _normalize(z2)], axis=0)     # [2n, D]
  if groups is not None or not options.plain:
    both = None
    if groups is not None:
      losses._check_groups(groups, n)
      both = jnp.concatenate([groups, groups])
    per_anchor, hit, stats = _ring_options(
        views, views, both, both, temperature, 0.0, axis_name=axis_name, tile=tile,
        divide=True, pos_shift=n, mask_self=True, halves=2, kind="softmax", options=options)
    metrics = {"accuracy": _global_mean(hit, axis_name)}
    if groups is not None:
      metrics.update(losses.diagnostics(stats, 1.0 / temperature, axis_name))
    return _out(_global_mean(per_anchor, axis_name), metrics, return_metrics)
  spec = _spec(divide=True, axis_name=axis_name, tile=tile, pos_shift=n, mask_self=True,
               halves=2)
  per_anchor, hit = _run_ring(spec, views, views, temperature)
  loss = _global_mean(per_anchor, axis_name)
  return _out(loss, {"accuracy": _global_mean(hit, axis_name)}, return_metrics)


def clip_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: float | jax.Array,
              axis_name: str | None = None, *, return_metrics: bool = False,
              tile: int | None = None, groups: jax.Array | None = None,
              options: losses.NegativeOptions = losses.PLAIN):
  """CLIP's symmetric InfoNCE, ring form of ``losses.clip_loss`` (same value and metrics).

  Args:
    image_emb, text_emb: [n, D] this shard's image and text embeddings (pair r matches).
    logit_scale: scalar multiplier of the cosine similarities, > 0.
    axis_name: ring axis inside ``shard_map``; ``None`` on one device.
    return_metrics: also return image->text, text->image and mean top-1 accuracy.
    tile: score at most ``tile`` anchors x ``tile`` candidates at once (see ``get_loss``).

  Returns:
    Scalar float32 ``(CE(image->text) + CE(text->image)) / 2`` over the global batch. Two ring
    passes: the text blocks travel past the images, then the image blocks past the texts.
  """
  _check_embeddings("image_emb", image_emb, "text_emb", text_emb)
  _check_positive("logit_scale", logit_scale)
  img, txt = _normalize(image_emb), _normalize(text_emb)
  if groups is not None or not options.plain:
    if groups is not None:
      losses._check_groups(groups, img.shape[0])
    run = lambda a, b: _ring_options(
        a, b, groups, groups, logit_scale, 0.0, axis_name=axis_name, tile=tile, divide=False,
        pos_shift=0, mask_self=False, halves=1, kind="softmax", options=options)[:2]
    (i2t, hit_i2t), (t2i, hit_t2i) = run(img, txt), run(txt, img)
  else:
    spec = _spec(divide=False, axis_name=axis_name, tile=tile)
    i2t, hit_i2t = _run_ring(spec, img, txt, logit_scale)
    t2i, hit_t2i = _run_ring(spec, txt, img, logit_scale)
  loss = 0.5 * (_global_mean(i2t, axis_name) + _global_mean(t2i, axis_name))
  acc_i2t, acc_t2i = _global_mean(hit_i2t, axis_name), _global_mean(hit_t2i, axis_name)
  metrics = {"accuracy": 0.5 * (acc_i2t + acc_t2i), "i2t_accuracy": acc_i2t,
             "t2i_accuracy": acc_t2i}
  return _out(loss, metrics, return_metrics)


def moco_v3_loss(q: jax.Array, k: jax.Array, temperature: float | jax.Array,
                 axis_name: str | None = None, *, return_metrics: bool = False,
                 tile: int | None = None):
  """MoCo v3's loss times ``2T``, ring form of ``losses.moco_v3_loss`` (same value).

  Args:
    q: [n, D] predictor outputs of one view (gradient flows).
    k: [n, D] momentum-encoder projections of the other view; no gradient (the ring's
      backward pass skips the key-gradient buffer altogether).
    temperature: scalar tau > 0.
    axis_name: ring axis inside ``shard_map``; ``None`` on one device.
    return_metrics: also return ``{"accuracy": ...}``.
    tile: score at most ``tile`` queries x ``tile`` keys at once (see ``get_loss``).

  Returns:
    Scalar float32 ``2 tau * mean_i CE(q_i . K^T / tau, i)`` over the global batch.
  """
  _check_embeddings("q", q, "k", k)
  _check_positive("temperature", temperature)
  q = _normalize(q)
  k = jax.lax.stop_gradient(_normalize(k))
  spec = _spec(divide=True, axis_name=axis_name, tile=tile, keys_grad=False)
  per_row, hit = _run_ring(spec, q, k, temperature)
  loss = 2.0 * temperature * _global_mean(per_row, axis_name)
  return _out(loss, {"accuracy": _global_mean(hit, axis_name)}, return_metrics)


def siglip_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: float | jax.Array,
                logit_bias: float | jax.Array, axis_name: str | None = None, *,
                return_metrics: bool = False, tile: int | None = None,
                groups: jax.Array | None = None,
                options: losses.NegativeOptions = losses.PLAIN):
  """SigLIP's sigmoid loss, ring form of ``losses.siglip_loss`` (same value and metrics).

  Args:
    image_emb, text_emb: [n, D] this shard's image and text embeddings (pair r matches).
    logit_scale: scalar multiplier t > 0.
    logit_bias: scalar b.
    axis_name: ring axis inside ``shard_map``; ``None`` on one device.
    return_metrics: also return ``{"accuracy": ...}``.
    tile: score at most ``tile`` images x ``tile`` texts at once (see ``get_loss``).

  Returns:
    Scalar float32 ``-(1/N) sum_ij log sigmoid(z_ij (t x_i.y_j + b))`` over the global batch;
    the text blocks travel past the images, each block's terms are added as it passes.
  """
  _check_embeddings("image_emb", image_emb, "text_emb", text_emb)
  _check_positive("logit_scale", logit_scale)
  if jnp.ndim(logit_bias) != 0:
    raise ValueError(f"logit_bias must be a scalar, got shape {jnp.shape(logit_bias)}")
  img, txt = _normalize(image_emb), _normalize(text_emb)
  if options.reweighted or options.decoupled:
    raise ValueError("SigLIP has no softmax denominator: debias_tau_plus, hard_beta and "
                     "decoupled do not apply (config.negatives); multi_positive does")
  if groups is not None and options.multi_positive:
    losses._check_groups(groups, img.shape[0])
    per_row, hit, _ = _ring_options(
        img, txt, groups, groups, logit_scale, logit_bias, axis_name=axis_name, tile=tile,
        divide=False, pos_shift=0, mask_self=False, halves=1, kind="sigmoid", options=options)
  else:
    spec = _spec("sigmoid", divide=False, axis_name=axis_name, tile=tile)
    per_row, hit = _run_ring(spec, img, txt, logit_scale, logit_bias)
  loss = _global_mean(per_row, axis_name)
  return _out(loss, {"accuracy": _global_mean(hit, axis_name)}, return_metrics)


# MoCo v2's negatives are the queue, not the batch: nothing is gathered, so its loss is the
# same function in both implementations.
RING_LOSSES: dict[str, Callable[..., Any]] = {
    "nt_xent": nt_xent,
    "clip": clip_loss,
    "moco": losses.moco_loss,
    "moco_v3": moco_v3_loss,
    "siglip": siglip_loss,
}

IMPLEMENTATIONS = ("all_gather", "ring")


def get_loss(name: str, impl: str = "all_gather", *, tile: int | None = None,
             options: losses.NegativeOptions | None = None) -> Callable[..., Any]:
  """The per-shard loss function ``name`` ("nt_xent", "clip", "moco", "moco_v3", "siglip").

  ``impl="all_gather"`` gives ``losses.LOSSES[name]`` (fastest while the [n, N] logits fit);
  ``impl="ring"`` the memory-bounded form here. Both have the same signature and values.

  ``tile`` (ring only; ``config.loss_tile``): score at most ``tile`` anchors x ``tile``
  candidates of a block at once, so the loss's temporary memory is O(n x D + tile^2) instead
  of O(n x n). ``None`` or 0 scores whole [n, n] blocks (the fastest while they fit). Local
  rows need not be divisible by ``tile``: the tiles are made as even as possible and the
  remainder is masked. MoCo v2's queue loss has no block to tile and ignores it.

  ``options`` (``losses.NegativeOptions``; ``config.negatives``): debiased, hard-negative,
  decoupled or multi-positive forms of nt_xent, clip and moco (siglip: multi-positive only;
  moco_v3: none), tiled or not.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"loss impl must be one of {IMPLEMENTATIONS}, got {impl!r}; "
                     "set config.loss_impl to 'all_gather' or 'ring'")
  table = losses.LOSSES if impl == "all_gather" else RING_LOSSES
  if name not in table:
    raise ValueError(f"unknown loss {name!r}; choose one of {sorted(table)}")
  tile = _check_tile(tile)
  fn = table[name]
  if options is not None and options != losses.PLAIN:
    if name == "moco_v3":
      raise ValueError("config.negatives options are not implemented for MoCo v3; use "
                       "SimCLR, MoCo v2 or CLIP/SigLIP, or reset config.negatives")
    fn = functools.partial(fn, options=options)
  if tile is None or name == "moco":
    return fn
  if impl != "ring":
    raise ValueError(f"tile={tile} applies to the ring loss only; set config.loss_impl='ring' "
                     "(or config.loss_tile=0 to keep the all-gather loss)")
  return functools.partial(fn, tile=tile)
