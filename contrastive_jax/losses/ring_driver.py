"""The one ring driver of the in-batch losses and its custom VJP (``run_ring``).

The all-gather losses hold ``[n, N]`` logits per device (``n`` local rows, ``N`` global
candidates). Here the candidate (key) blocks ``[n, D]`` travel around the ring of the
``"data"`` axis instead (``jax.lax.ppermute``, device ``i`` sends to ``i + 1 mod W``; after
``k`` hops device ``i`` holds the block of device ``i - k mod W``), and each device scores its
anchors against one block at a time, in tiles (``ring_layout``; Inf-CL, Cheng et al. 2024),
keeping per-row running statistics: the online log-sum-exp of Milakov & Gimelshein 2018, as in
ring attention (Liu et al. 2023) and the chunked SigLIP loss (Zhai et al. 2023, Sec. 3.3). An
anchor's positive (and, for NT-Xent, the anchor itself, masked with ``-inf``) lives in its own
block, the one held at hop 0.

One driver, one custom VJP (``_ring``): the forward pass runs the hop, row-tile and
column-tile loops once, keeps the running argmax (top-1 accuracy, ties to the smaller global
column as ``jnp.argmax`` over the gathered row) and hands each tile to an accumulator of
per-row statistics; the backward pass runs the same loops again, asks the accumulator for the
tile's ``G = dL/dlogits`` (recomputed, nothing per tile is stored) and, with
``logits = f(s) A K^T (+ b)`` (``f(s) = 1/T`` or ``s``):

  dL/dA   = f(s) sum_b G_b K_b              accumulated where the anchors live;
  dL/dK_b = f(s) G_b^T A                    a buffer that travels *with* block b and is back
                                            at its owner after W hops;
  dL/ds   = f'(s) sum_r A_r . (sum_b G_b K_b)_r,   dL/db = sum G   (SigLIP).

The accumulators (the loss's cases): ``_InfoNCE`` (plain InfoNCE: one online log-sum-exp,
``G = g (softmax - onehot)``), ``_RowStats`` (``NegativeOptions`` or group ids: the statistics
of ``common.row_stats``, ``G`` from their cotangents; Chuang et al. 2020, Robinson et al. 2021,
Yeh et al. 2022, Khosla et al. 2020) and ``_Sigmoid`` (SigLIP, additive over blocks:
``G = -g z sigmoid(-z l)``). The derivation in full: docs/losses.md.

Peak temporary memory: one tile of logits (O(t^2), or O(n^2) untiled) plus O(n x D) for the
blocks and gradient buffers in flight, in both passes. Each hop is one iteration of a
``fori_loop`` with the same body, so the compiler cannot overlap two blocks; the forward
pass's last hop only brings the blocks home, which keeps the body free of special cases.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from contrastive_jax.losses.common import (HIGHEST, LSE_STATS, PLAIN, SUM_STATS, combine_lse,
                                           group_masks, loss_from_stats, lse_value,
                                           masked_lse_terms, similarity)
from contrastive_jax.losses.ring_layout import (Layout, RingSpec, Tile, add_to_rows,
                                                check_tile, global_columns, pass_on, row_slice,
                                                varying)


def _factor(spec: RingSpec, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``f(s)`` and ``f'(s)`` of ``logits = f(s) * sim (+ bias)``."""
  if spec.divide:
    return 1.0 / scale, -1.0 / (scale * scale)
  return scale, jnp.ones_like(scale)


def _tile_logits(spec: RingSpec, anchors, tile_keys, bias):
  """[t, D] pre-scaled anchors x [u, D] keys -> [t, u] float32 logits ``f(s) A.K^T (+ b)``.

  The factor ``f(s)`` scales the anchors before the matmul, so the matmul's output is the
  logits tile itself: scaling the [t, u] product instead costs a second [t, u] buffer (XLA on
  CPU does not fuse the scaling into the dot). Values equal ``gathered`` up to float32
  rounding (one multiplication moved before the sum).
  """
  logits = similarity(anchors, tile_keys)
  if spec.kind == "sigmoid":
    logits = logits + bias
  return logits


def _tile_masks(spec: RingSpec, tile: Tile, a_groups, k_groups):
  """[t, u] masks (positives, negatives, same-class negatives, negatives of labelled rows) of a
  tile (``common.group_masks``); the anchor itself (NT-Xent) and padded columns are in none."""
  if spec.mask_self:
    self_mask = (tile.hop == 0) & (tile.cols[None, :] == tile.rows[:, None])
  else:
    self_mask = jnp.zeros((tile.rows.shape[0], tile.width), bool)
  masks = group_masks(a_groups, k_groups, self_mask, tile.is_pos(), spec.options)
  if not tile.padded:
    return masks
  valid = tile.cols[None, :] < tile.num_cols
  return tuple(mask & valid for mask in masks)


# ----------------------------------------------------------------------------- accumulators
#
# An accumulator is the loss's case of the ring: the per-row state it keeps (``init``), the new
# values of that state after a tile of logits (``update``), the per-row outputs and backward
# residuals it ends with (``finish``), the outputs that carry a gradient (``grad_outputs``) and
# a tile's dL/dlogits from their cotangents (``grad``). ``logits`` are a tile's raw logits,
# ``masked`` the same with -inf at the anchor itself and at padded columns.


class _InfoNCE:
  """Plain InfoNCE: ``loss_r = lse_r - l_r,pos`` with one online log-sum-exp over the row,
  ``m <- max(m, max_c l_c)``, ``s <- s exp(m_old - m) + sum_c exp(l_c - m)``."""

  @staticmethod
  def init(spec, full):
    return {"pos_logit": full(0.0), "row_max": full(-jnp.inf), "sum_exp": full(0.0)}

  @staticmethod
  def update(spec, tile, logits, masked, tile_max, a_g, k_g, state):
    pos = tile.pos_local()
    # A gather of t entries, not a masked [t, u] sum (which XLA materialises on CPU).
    picked = jnp.take_along_axis(masked, jnp.maximum(pos, 0)[:, None], axis=1)[:, 0]
    new_max = jnp.maximum(state["row_max"], tile_max)
    # A row's first tiles may be all -inf (its own column in a tile of one, or padding): a
    # finite shift keeps exp(-inf - -inf) out.
    shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
    sum_exp = (state["sum_exp"] * jnp.exp(state["row_max"] - shift)
               + jnp.sum(jnp.exp(masked - shift[:, None]), axis=1))
    return {"pos_logit": state["pos_logit"] + jnp.where(pos >= 0, picked, 0.0),
            "row_max": new_max, "sum_exp": sum_exp}

  @staticmethod
  def finish(spec, state, dtype):
    lse = state["row_max"] + jnp.log(state["sum_exp"])
    return {"loss": lse - state["pos_logit"]}, {"lse": lse}

  @staticmethod
  def grad_outputs(spec):
    return ("loss",)

  @staticmethod
  def grad(spec, tile, logits, a_g, k_g, ct, res):
    dtype = logits.dtype
    grad = jnp.exp(tile.mask(logits) - res["lse"][:, None]) - tile.is_pos().astype(dtype)
    return ct["loss"][:, None] * grad


class _Sigmoid:
  """SigLIP, additive over blocks: ``loss_r = -sum_c log sigmoid(z_rc l_rc)``, ``z = +1`` on the
  positive (with group ids and ``multi_positive``: on every positive)."""

  @staticmethod
  def _signs(spec, tile, a_g, k_g, dtype):
    pos = tile.is_pos() if a_g is None else _tile_masks(spec, tile, a_g, k_g)[0]
    return jnp.where(pos, 1.0, -1.0).astype(dtype)

  @staticmethod
  def init(spec, full):
    return {"loss": full(0.0)}

  @staticmethod
  def update(spec, tile, logits, masked, tile_max, a_g, k_g, state):
    terms = jax.nn.log_sigmoid(_Sigmoid._signs(spec, tile, a_g, k_g, logits.dtype) * logits)
    if tile.padded:
      terms = jnp.where(tile.cols[None, :] < tile.num_cols, terms, 0.0)
    return {"loss": state["loss"] - jnp.sum(terms, axis=1)}

  @staticmethod
  def finish(spec, state, dtype):
    return {"loss": state["loss"]}, {}

  @staticmethod
  def grad_outputs(spec):
    return ("loss",)

  @staticmethod
  def grad(spec, tile, logits, a_g, k_g, ct, res):
    signs = _Sigmoid._signs(spec, tile, a_g, k_g, logits.dtype)
    grad = -ct["loss"][:, None] * signs * jax.nn.sigmoid(-signs * logits)
    return jnp.where(tile.cols[None, :] < tile.num_cols, grad, 0.0) if tile.padded else grad


class _RowStats:
  """``NegativeOptions`` or group ids: the statistics of ``common.row_stats`` (log-sum-exps as
  online ``(max, sum)`` pairs, sums, counts); ``loss_from_stats`` turns them into the loss.
  With ``c_k`` the cotangent of statistic k and ``(w_k, S_k)`` its weight and set,
  ``dL/dl_rc = c_pos_logit [c in P_r] + sum_k c_k w_k exp(w_k l_rc - lse_k,r) [c in S_k,r]``."""

  @staticmethod
  def _lse_of(spec):
    """The log-sum-exps ``loss_from_stats`` reads: name -> (weight, index of the mask)."""
    beta, options = spec.options.hard_beta, spec.options
    if options.reweighted:
      return {"neg_hard": (1.0 + beta, 1), "neg_beta": (beta, 1)}
    return {"neg": (1.0, 1)} if options.decoupled else {"pos": (1.0, 0), "neg": (1.0, 1)}

  @staticmethod
  def init(spec, full):
    state = {k: (full(-jnp.inf), full(0.0)) for k in _RowStats._lse_of(spec)}
    state.update({k: full(0.0) for k in SUM_STATS})
    return state

  @staticmethod
  def update(spec, tile, logits, masked, tile_max, a_g, k_g, state):
    masks = pos, neg, diag, diag_total = _tile_masks(spec, tile, a_g, k_g)
    count = lambda mask: jnp.sum(mask.astype(logits.dtype), axis=1)
    out = {name: combine_lse(state[name], masked_lse_terms(w * logits, masks[i]))
           for name, (w, i) in _RowStats._lse_of(spec).items()}
    out["pos_logit"] = state["pos_logit"] + jnp.sum(jnp.where(pos, logits, 0.0), axis=1)
    out["num_pos"] = state["num_pos"] + count(pos)
    out["num_neg"] = state["num_neg"] + count(neg)
    out["diag_count"] = state["diag_count"] + count(diag)
    out["diag_total"] = state["diag_total"] + count(diag_total)
    out["diag_logit"] = state["diag_logit"] + jnp.sum(jnp.where(diag, logits, 0.0), axis=1)
    return out

  @staticmethod
  def finish(spec, state, dtype):
    used = _RowStats._lse_of(spec)
    out = {k: state[k] for k in SUM_STATS}
    for name in LSE_STATS:
      out[name] = lse_value(state[name]) if name in used else jnp.full(
          state["num_pos"].shape, -jnp.inf, dtype)
    return out, {k: out[k] for k in used}

  @staticmethod
  def grad_outputs(spec):
    # Counts and diagnostics carry no gradient, nor a log-sum-exp of weight 0 (beta = 0).
    return ("pos_logit",) + tuple(k for k, (w, _) in _RowStats._lse_of(spec).items() if w != 0)

  @staticmethod
  def grad(spec, tile, logits, a_g, k_g, ct, res):
    masks = _tile_masks(spec, tile, a_g, k_g)
    lse_of = _RowStats._lse_of(spec)
    grad = ct["pos_logit"][:, None] * masks[0].astype(logits.dtype)
    for name in _RowStats.grad_outputs(spec)[1:]:
      w, i = lse_of[name]
      # -inf before the exp: an empty set's lse is -inf and w l - lse would be +inf.
      p = jnp.exp(jnp.where(masks[i], w * logits - res[name][:, None], -jnp.inf))
      grad = grad + (w * ct[name])[:, None] * p
    return grad


_ACCUMULATORS = {"infonce": _InfoNCE, "sigmoid": _Sigmoid, "stats": _RowStats}


# ----------------------------------------------------------------------------- the driver


def _forward(spec: RingSpec, anchors, keys, a_groups, k_groups, scale, bias):
  """Per-row outputs [m] (the accumulator's and the hit) and the backward pass's residuals.

  One loop of W identical hops (score the block held, then pass it on): the scheduler never
  overlaps two iterations, so the peak is one tile's logits whatever W is. Inside a hop, a loop
  over row tiles and, inside that, a loop over column tiles updates the per-row state of the
  tile's rows. The last hop brings every block home again; it is one [c, D] message and keeps
  the body free of special cases.
  """
  acc, ring = _ACCUMULATORS[spec.kind], Layout.of(spec, anchors, keys)
  t, u, dtype = ring.t, ring.u, anchors.dtype
  f = _factor(spec, scale)[0]
  anchors, a_groups = (ring.pad(x, t * ring.num_rt) for x in (anchors, a_groups))
  keys, k_groups = (ring.pad(x, u * ring.num_ct) for x in (keys, k_groups))

  def tile_update(hop, block, block_groups, rows, a, a_g, j, state):
    tile = ring.tile(hop, rows, j)
    logits = _tile_logits(spec, a, row_slice(block, j * u, u), bias)              # [t, u]
    masked = tile.mask(logits)
    k_g = None if block_groups is None else row_slice(block_groups, j * u, u)
    tile_max = jnp.max(masked, axis=1)
    state = {**state, **acc.update(spec, tile, logits, masked, tile_max, a_g, k_g, state)}
    # Running argmax with argmax's rule: the first maximal global column wins.
    tile_col = global_columns(spec, (ring.me - hop) % ring.size, tile.cols, ring.c,
                              ring.size)[jnp.argmax(masked, axis=1)]
    best, best_col = state["best"], state["best_col"]
    better = (tile_max > best) | ((tile_max == best) & (tile_col < best_col))
    return dict(state, best=jnp.where(better, tile_max, best),
                best_col=jnp.where(better, tile_col, best_col))

  def hop_body(hop, carry):
    block, block_groups, state = carry

    def row_body(i, state):
      rows = i * t + jnp.arange(t)
      a = row_slice(anchors, i * t, t) * f        # scaled per tile: no scaled [m, D] copy
      a_g, mine = jax.tree.map(lambda x: row_slice(x, i * t, t), (a_groups, state))
      mine = jax.lax.fori_loop(
          0, ring.num_ct,
          lambda j, s: tile_update(hop, block, block_groups, rows, a, a_g, j, s), mine)
      return jax.tree.map(
          lambda x, y: jax.lax.dynamic_update_slice_in_dim(x, y, i * t, axis=0), state, mine)

    state = jax.lax.fori_loop(0, ring.num_rt, row_body, state)
    block, block_groups = pass_on((block, block_groups), spec.axis_name, ring.size)
    return block, block_groups, state

  full = lambda value, dt=dtype: varying(jnp.full((t * ring.num_rt,), value, dt),
                                         spec.axis_name)
  state = {"best": full(-jnp.inf), "best_col": full(0, jnp.int32), **acc.init(spec, full)}
  _, _, state = jax.lax.fori_loop(0, ring.size, hop_body, (keys, k_groups, state))
  state = jax.tree.map(lambda x: x[:ring.m], state)
  pos_local = (jnp.arange(ring.m) + spec.pos_shift) % ring.c
  pos_column = global_columns(spec, ring.me, pos_local, ring.c, ring.size)
  hit = (state.pop("best_col") == pos_column).astype(dtype)
  out, residuals = acc.finish(spec, state, dtype)
  return dict(out, hit=hit), residuals


def _backward(spec: RingSpec, residuals, cotangents):
  """Second ring pass: recompute each tile, accumulate dL/dA here and dL/dK in a buffer that
  travels with the block; after W hops block and buffer are back at the block's owner."""
  anchors, keys, a_groups, k_groups, scale, bias, saved = residuals
  acc, ring = _ACCUMULATORS[spec.kind], Layout.of(spec, anchors, keys)
  axis, t, u = spec.axis_name, ring.t, ring.u
  dim, dtype = anchors.shape[1], anchors.dtype
  f, df = _factor(spec, scale)
  # Padded rows get zero cotangents (and finite residuals), so they add to no gradient.
  pad = lambda x: ring.pad(x, t * ring.num_rt)
  ct = {k: pad(cotangents[k]) for k in acc.grad_outputs(spec)}
  saved = {k: pad(v) for k, v in saved.items()}
  anchors_p, a_groups = pad(anchors), pad(a_groups)
  keys, k_groups = (ring.pad(x, u * ring.num_ct) for x in (keys, k_groups))

  def tile_update(hop, block, block_groups, rows, a, a_scaled, row_data, j, carry):
    d_keys, d_a, d_bias = carry
    tile = ring.tile(hop, rows, j)
    k = row_slice(block, j * u, u)
    k_g = None if block_groups is None else row_slice(block_groups, j * u, u)
    logits = _tile_logits(spec, a_scaled, k, bias)
    grad = acc.grad(spec, tile, logits, row_data[0], k_g, *row_data[1:])   # dL/dlogits [t, u]
    d_a = d_a + jnp.einsum("tu,ud->td", grad, k, precision=HIGHEST)
    if spec.kind == "sigmoid":
      d_bias = d_bias + jnp.sum(grad)
    if spec.keys_grad:
      d_keys = add_to_rows(d_keys, j * u, jnp.einsum("tu,td->ud", grad, a, precision=HIGHEST))
    return d_keys, d_a, d_bias

  zeros = lambda shape: varying(jnp.zeros(shape, dtype), axis)

  def hop_body(hop, carry):
    block, block_groups, d_keys, d_anchors, d_bias = carry

    def row_body(i, carry):
      d_keys, d_anchors, d_bias = carry
      rows = i * t + jnp.arange(t)
      a = row_slice(anchors_p, i * t, t)
      a_scaled = a * f                        # per tile: no scaled [m, D] copy
      row_data = jax.tree.map(lambda x: row_slice(x, i * t, t), (a_groups, ct, saved))
      d_keys, d_a, d_bias = jax.lax.fori_loop(
          0, ring.num_ct,
          lambda j, cr: tile_update(hop, block, block_groups, rows, a, a_scaled, row_data, j,
                                    cr),
          (d_keys, zeros((t, dim)), d_bias))
      return d_keys, add_to_rows(d_anchors, i * t, d_a), d_bias

    d_keys, d_anchors, d_bias = jax.lax.fori_loop(
        0, ring.num_rt, row_body, (d_keys, d_anchors, d_bias))
    if spec.keys_grad:
      block, block_groups, d_keys = pass_on((block, block_groups, d_keys), axis, ring.size)
    else:
      block, block_groups = pass_on((block, block_groups), axis, ring.size)
    return block, block_groups, d_keys, d_anchors, d_bias

  d_keys = zeros(keys.shape if spec.keys_grad else (0,))
  carry = (keys, k_groups, d_keys, zeros(anchors_p.shape), zeros(()))
  _, _, d_keys, d_anchors, d_bias = jax.lax.fori_loop(0, ring.size, hop_body, carry)
  d_anchors = d_anchors[:ring.m]
  d_keys = d_keys[:ring.c] if spec.keys_grad else jnp.zeros_like(residuals[1])
  # sum_rc G_rc sim_rc = sum_r A_r . (sum_c G_rc K_c): the scale's gradient comes from the
  # accumulated d_anchors, so no tile of similarities is kept in the backward pass.
  d_scale = df * jnp.sum(anchors * d_anchors)
  return (f * d_anchors, f * d_keys, None, None, d_scale.astype(scale.dtype),
          d_bias.astype(bias.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(spec: RingSpec, anchors, keys, a_groups, k_groups, scale, bias):
  return _forward(spec, anchors, keys, a_groups, k_groups, scale, bias)[0]


def _ring_fwd(spec, anchors, keys, a_groups, k_groups, scale, bias):
  out, saved = _forward(spec, anchors, keys, a_groups, k_groups, scale, bias)
  return out, (anchors, keys, a_groups, k_groups, scale, bias, saved)


_ring.defvjp(_ring_fwd, _backward)


def run_ring(spec: RingSpec, anchors, keys, scale, bias=0.0, groups=None):
  """Per-row loss [m], hit [m] and outputs of ``anchors`` [m, D] against the ring of ``keys``
  [c, D] blocks; ``groups``: optional ``(anchor ids [m], key ids [c])`` (int, -1 unknown).
  With kind "stats" the outputs are the row statistics (for ``common.diagnostics``)."""
  dtype, axis = anchors.dtype, spec.axis_name
  scale = varying(jnp.asarray(scale, dtype), axis)
  bias = varying(jnp.asarray(bias, dtype), axis)
  a_groups, k_groups = (None, None) if groups is None else (
      varying(g.astype(jnp.int32), axis) for g in groups)
  out = _ring(spec, anchors, keys, a_groups, k_groups, scale, bias)
  hit = jax.lax.stop_gradient(out.pop("hit"))
  if spec.kind != "stats":
    return out["loss"], hit, out
  # An lse as a (max, sum) pair: (lse, 1), or (-inf, 0) for an empty set.
  stats = {k: (out[k], jnp.isfinite(out[k]).astype(dtype)) for k in LSE_STATS}
  stats.update({k: out[k] for k in SUM_STATS})
  stats["diag_logit"] = jax.lax.stop_gradient(stats["diag_logit"])
  return loss_from_stats(stats, spec.options, -_factor(spec, scale)[0]), hit, stats


def make_spec(kind, *, divide, axis_name, tile, pos_shift=0, mask_self=False, halves=1,
              keys_grad=True, options=PLAIN) -> RingSpec:
  """A ``RingSpec`` with ``tile`` checked (see ``RingSpec`` for the fields)."""
  return RingSpec(kind=kind, divide=divide, pos_shift=pos_shift, mask_self=mask_self,
                  halves=halves, keys_grad=keys_grad, axis_name=axis_name,
                  tile=check_tile(tile), options=options)
