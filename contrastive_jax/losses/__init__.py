"""The contrastive losses: what every method calls (``get_loss``) and the public names.

Every loss is a pure per-shard function of per-device embeddings and an ``axis_name``
(``None``: the plain single-device loss; ``"data"``: inside ``jax.shard_map``, the candidates
are the global batch and the value is the mean over it). Two implementations, same signature,
values and gradients (``get_loss(name, impl)``):

* ``gathered`` (``impl="all_gather"``, the default): all-gather the candidates, ``[n, N]`` logits
  per device; the fastest while they fit.
* ``ring`` (``impl="ring"``): candidate blocks travel around the ring, ``[n, n]`` (or, with
  ``tile``, ``[tile, tile]``) logits per device (Inf-CL, Cheng et al. 2024).

The shared per-shard helpers and ``NegativeOptions`` live in ``common``; the ring's derivation
in docs/losses.md. Embeddings may be raw: each loss L2-normalises them itself.

Conventions (how the directions combine differs between the papers and their code):

* ``nt_xent`` (SimCLR, Chen et al. 2020, eq. 1): mean over all 2N anchors (the paper's L).
  The original TF code sums its two directions, i.e. reports twice this value.
* ``clip_loss`` (Radford et al. 2021, Fig. 3): mean of the image->text and text->image
  cross-entropies.
* ``moco_loss`` (He et al. 2020, eq. 1; MoCo v2): logits ``[q.k, q.queue^T] / T``, label 0.
* ``moco_v3_loss`` (Chen et al. 2021, Alg. 1): in-batch InfoNCE times ``2T``; MoCo v3 sums
  ``moco_v3_loss(q1, k2) + moco_v3_loss(q2, k1)``, which the method does.
* ``siglip_loss`` (Zhai et al. 2023, Alg. 1): ``-log sigmoid(z_ij (t x_i.y_j + b))`` summed over
  all N^2 pairs and divided by N (the number of rows), not by N^2.

Negatives that are not negatives (``NegativeOptions``; ``config.negatives``): nt_xent, clip and
moco take ``options`` (debiased, Chuang et al. 2020; hard-negative weights, Robinson et al.
2021; decoupled, Yeh et al. 2022; multi-positive / SupCon, Khosla et al. 2020), and nt_xent,
clip and siglip take ``groups`` [n] int ids (labels or caption ids; -1 unknown), gathered like
the embeddings.

With ``return_metrics=True`` each returns ``(loss, metrics)`` where ``metrics["accuracy"]`` is
the contrastive top-1 accuracy (the positive scores highest among the anchor's candidates),
averaged over the global batch like the loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from contrastive_jax.errors import require, require_one_of
from contrastive_jax.losses import gathered, ring
from contrastive_jax.losses.common import PLAIN, NegativeOptions, l2_normalize
from contrastive_jax.losses.gathered import (LOSSES, clip_loss, moco_loss, moco_v3_loss,
                                             nt_xent, siglip_loss)
from contrastive_jax.losses.ring_layout import check_tile

__all__ = ["IMPLEMENTATIONS", "LOSSES", "PLAIN", "NegativeOptions", "check_config", "clip_loss",
           "gathered", "get_loss", "l2_normalize", "moco_loss", "moco_v3_loss", "nt_xent", "ring",
           "sharded", "siglip_loss"]

IMPLEMENTATIONS = ("all_gather", "ring")


def check_config(config: Any) -> None:
  """``config.loss_impl`` and ``config.loss_tile`` (what ``get_loss`` receives as ``impl`` and
  ``tile``); a ``ConfigError`` naming the key, before anything is traced."""
  require_one_of("loss_impl", config.loss_impl, IMPLEMENTATIONS)
  tile = config.loss_tile
  require(isinstance(tile, int) and tile >= 0,
          f"config.loss_tile={tile!r} must be an integer >= 0 (0: whole blocks)")
  require(tile == 0 or config.loss_impl == "ring",
          f"config.loss_tile={tile} tiles the ring loss only; set config.loss_impl='ring' or "
          "config.loss_tile=0")


def get_loss(name: str, impl: str = "all_gather", *, tile: int | None = None,
             options: NegativeOptions | None = None) -> Callable[..., Any]:
  """The per-shard loss function ``name`` ("nt_xent", "clip", "moco", "moco_v3", "siglip").

  ``impl="all_gather"`` gives ``LOSSES[name]`` (fastest while the [n, N] logits fit);
  ``impl="ring"`` the memory-bounded form of ``ring``. Both have the same signature and values.

  ``tile`` (ring only; ``config.loss_tile``): score at most ``tile`` anchors x ``tile``
  candidates of a block at once, so the loss's temporary memory is O(n x D + tile^2) instead
  of O(n x n). ``None`` or 0 scores whole [n, n] blocks (the fastest while they fit). Local
  rows need not be divisible by ``tile``: the tiles are made as even as possible and the
  remainder is masked. MoCo v2's queue loss has no block to tile and ignores it.

  ``options`` (``NegativeOptions``; ``config.negatives``): debiased, hard-negative,
  decoupled or multi-positive forms of nt_xent, clip and moco (siglip: multi-positive only;
  moco_v3: none), tiled or not.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"loss impl must be one of {IMPLEMENTATIONS}, got {impl!r}; "
                     "set config.loss_impl to 'all_gather' or 'ring'")
  table = LOSSES if impl == "all_gather" else ring.RING_LOSSES
  if name not in table:
    raise ValueError(f"unknown loss {name!r}; choose one of {sorted(table)}")
  tile = check_tile(tile)
  fn = table[name]
  if options is not None and options != PLAIN:
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


def sharded(loss_fn: Callable[..., Any], mesh: jax.sharding.Mesh, *, axis_name: str = "data",
            num_batch_args: int = 2, return_metrics: bool = False) -> Callable[..., Any]:
  """Runs ``loss_fn`` on global arrays: batch-split over ``axis_name`` with ``shard_map``.

  The first ``num_batch_args`` positional arguments are [N, D] global batches, split over the
  mesh axis; the remaining ones (temperature, scale, bias, the MoCo queue) are replicated.
  Shapes are checked before anything is traced or compiled: a global batch that does not split
  evenly over the devices raises a ``ValueError`` naming the fix.

  Usable inside or outside ``jit``; differentiable with respect to every argument.
  """
  num_shards = mesh.shape[axis_name]

  def wrapped(*args, **batch_kwargs):
    # Keyword arrays (``groups``) are [N] batch arrays split like the embeddings; None: absent.
    batch_kwargs = {k: v for k, v in batch_kwargs.items() if v is not None}
    names = sorted(batch_kwargs)
    args = tuple(args) + tuple(batch_kwargs[k] for k in names)
    num_pos_args = len(args) - len(names)
    for i, x in enumerate(args[:num_batch_args] + args[num_pos_args:]):
      rows = jnp.shape(x)[0]
      if rows % num_shards:
        raise ValueError(
            f"global batch of {rows} rows (argument {i}) is not divisible by the "
            f"{num_shards} devices of mesh axis '{axis_name}'; use a global batch that is a "
            f"multiple of {num_shards}")
    # Python numbers stay static (so the loss validates them); arrays go through shard_map.
    is_batch = [i < num_batch_args or i >= num_pos_args for i in range(len(args))]
    is_static = [not b and isinstance(x, (int, float)) for x, b in zip(args, is_batch)]
    dynamic = [x for x, s in zip(args, is_static) if not s]

    def per_shard(*dyn):
      it = iter(dyn)
      full = [x if s else next(it) for x, s in zip(args, is_static)]
      kwargs = dict(zip(names, full[num_pos_args:]))
      return loss_fn(*full[:num_pos_args], axis_name=axis_name,
                     return_metrics=return_metrics, **kwargs)

    specs = tuple(P(axis_name) if b else P()
                  for b, s in zip(is_batch, is_static) if not s)
    return jax.shard_map(per_shard, mesh=mesh, in_specs=specs, out_specs=P())(*dynamic)

  return wrapped
