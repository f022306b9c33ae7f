"""Gradient caching: the full-batch contrastive gradient in memory-bounded micro-batches.

GradCache (Gao, Zhang, Han and Callan 2021, "Scaling Deep Contrastive Learning Batch Size under
Memory Limited Setup", Sec. 3.2). A contrastive loss ``L(f(x_1), ..., f(x_B))`` couples every
example of the global batch, so plain gradient accumulation over micro-batches would shrink the
set of negatives (GradCache, Sec. 1). The chain rule splits the gradient instead:

  ``dL/dtheta = sum_i  (d f(s_i) / d theta)^T  (dL / d f(s_i))``          (GradCache, Eq. 4-5)

over micro-batches ``s_1, ..., s_M``. ``value_and_grad`` below runs three passes:

1. **Embedding pass**: the forward of each micro-batch under ``stop_gradient`` in a
   ``jax.lax.map`` (nothing is differentiated, so no activation is kept beyond one
   micro-batch); the embeddings of the whole global batch are gathered back in batch order.
2. **Loss pass**: the contrastive loss on the full global batch (per shard under
   ``shard_map``, as ``methods/base.global_loss`` does) and its gradient with respect to the
   embeddings (the "representation gradient cache") and to the parameters the loss reads
   directly (CLIP's logit scale and bias).
3. **Replay pass**: a ``jax.lax.scan`` re-runs each micro-batch forward under ``jax.vjp`` with
   the same random key as in pass 1 and pulls back its slice of the cached embedding gradient;
   the parameter gradients are summed over micro-batches.

Peak activation memory is one micro-batch's forward and backward (``B / M`` rows) plus the
``[B, E]`` embeddings and their gradient; the price is one extra forward (about 4/3 of the
compute of a plain step).

**Exactness.** For models without batch-coupled layers (ViT, the CLIP towers, a head without
BN) the loss and the update equal the full-batch ones up to float32 rounding. With BatchNorm
each micro-batch is normalised by its own statistics, not the global batch's: the standard
GradCache caveat, the same as training at batch ``B / M`` as far as BN sees it. The new running
statistics are the **mean over micro-batches** of each micro-batch's update (identical in
passes 1 and 3: same inputs, parameters and keys; they are read from pass 1). Averaging gives
the full batch's mean exactly and the within-micro-batch part of its variance, a better
estimate than the last micro-batch alone.

**Random state.** The dropout key of micro-batch ``i`` is ``micro_batch_keys(rng, M)[i] =
fold_in(rng, i)`` in both passes, so the replay draws the same masks as the embedding pass.
(The masks differ from those of an ``M = 1`` step with ``rng``: with dropout, ``M > 1`` is a
different but equally valid draw.) Augmentation happens upstream in tf.data, fixed per example.

**Sharding.** The global batch ``[B, ...]`` is sharded over the ``D`` devices of the
``"data"`` axis; a contiguous slice of it would live on ``D / M`` devices only. Micro-batch
``i`` is instead the ``i``-th chunk of every device's local rows: view the batch as
``[D, M, n / M, ...]`` (``n = B / D`` local rows) and take ``[:, i]``. Each micro-batch then
spans all devices (``B / (M D)`` rows on each), BN statistics inside it are global (sync BN),
and the split and its inverse are local reshapes with no communication. This needs
``B % (M * D) == 0`` (``check_micro_batches``).

**Use.** ``methods.base.Method.value_and_grad`` calls ``value_and_grad`` below with the method's
two public steps, ``embed`` as ``forward`` (its ``updates``, the new BN statistics, as the model
state) and ``loss_from_embeddings`` as ``loss``, for every method that sets
``supports_grad_cache``; the trainer does not know which differentiation ran.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from contrastive_jax import distributed

PyTree = Any


def micro_batches(config: ml_collections.ConfigDict) -> int:
  """``config.grad_cache.micro_batches``, checked (declared in ``configs/common.py``)."""
  value = config.grad_cache.micro_batches
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"config.grad_cache.micro_batches={value!r} must be an integer >= 1 "
                     "(1 turns gradient caching off)")
  return value


def check_micro_batches(global_batch: int, num_micro: int, num_devices: int) -> int:
  """Rows per device per micro-batch; a ValueError naming the fix when they do not divide."""
  if num_micro < 1:
    raise ValueError(f"config.grad_cache.micro_batches={num_micro} must be >= 1")
  if global_batch % (num_micro * num_devices):
    fixed_batch = max(1, global_batch // (num_micro * num_devices)) * num_micro * num_devices
    raise ValueError(
        f"config.global_batch={global_batch} must be divisible by "
        f"config.grad_cache.micro_batches={num_micro} x {num_devices} devices "
        f"= {num_micro * num_devices} (each micro-batch takes an equal share of every "
        f"device's rows); use config.global_batch={fixed_batch} or a micro_batches that "
        f"divides {global_batch // num_devices}")
  return global_batch // (num_micro * num_devices)


def micro_batch_keys(rng: jax.Array, num_micro: int) -> jax.Array:
  """``[M]`` keys, ``fold_in(rng, i)`` for micro-batch ``i``: the same in both passes."""
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(num_micro))


def _constrain(x: jax.Array, mesh: Mesh | None, spec: P) -> jax.Array:
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def split(tree: PyTree, num_micro: int, num_shards: int, mesh: Mesh | None = None) -> PyTree:
  """``[B, ...]`` leaves -> ``[M, B / M, ...]``: micro-batch ``i`` holds rows
  ``d * n + i * n / M + j`` (``j < n / M``) of every shard ``d`` (``n = B / num_shards``)."""
  def one(x):
    b = x.shape[0]
    k = b // (num_shards * num_micro)
    y = x.reshape((num_shards, num_micro, k) + x.shape[1:])
    y = jnp.swapaxes(y, 0, 1).reshape((num_micro, num_shards * k) + x.shape[1:])
    return _constrain(y, mesh, P(None, distributed.DATA_AXIS))
  return jax.tree.map(one, tree)


def merge(tree: PyTree, num_shards: int, mesh: Mesh | None = None) -> PyTree:
  """Inverse of ``split``: ``[M, B / M, ...]`` leaves -> ``[B, ...]`` in the batch's order."""
  def one(y):
    m, bm = y.shape[:2]
    k = bm // num_shards
    x = y.reshape((m, num_shards, k) + y.shape[2:])
    x = jnp.swapaxes(x, 0, 1).reshape((m * bm,) + y.shape[2:])
    return _constrain(x, mesh, P(distributed.DATA_AXIS))
  return jax.tree.map(one, tree)


def value_and_grad(
    forward: Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, PyTree]],
    loss: Callable[[PyTree, PyTree], tuple[jax.Array, Any]],
    params: PyTree, inputs: PyTree, rng: jax.Array, *, num_micro: int,
    mesh: Mesh | None = None) -> tuple[tuple[jax.Array, tuple[Any, PyTree]], PyTree]:
  """The value and parameter gradient of ``loss(params, forward(params, inputs))`` by GradCache.

  Args:
    forward: ``(params, micro_inputs, key) -> (embeddings, model_state)``. ``embeddings`` is a
      pytree of ``[b, ...]`` arrays whose rows follow the rows of ``micro_inputs`` (e.g.
      ``{"z1": [b, E], "z2": [b, E]}``); ``model_state`` a pytree of float arrays (the new BN
      statistics, ``{}`` without BN). Must draw all its randomness from ``key``.
    loss: ``(params, embeddings of the global batch) -> (loss [] float32, aux)``; may read
      parameters directly (CLIP's logit scale), whose gradient is added.
    params: the parameters to differentiate.
    inputs: pytree of ``[B, ...]`` global-batch arrays, sharded over ``mesh``'s ``"data"``.
    rng: the step key; micro-batch ``i`` uses ``micro_batch_keys(rng, M)[i]``.
    num_micro: M, the number of micro-batches; ``B`` must be divisible by ``M`` x devices.
    mesh: the ``("data",)`` mesh (``None``: one device, no sharding constraints).

  Returns:
    ``((loss, (aux, model_state)), grads)`` like ``jax.value_and_grad(..., has_aux=True)``;
    ``model_state`` is the mean over micro-batches of each micro-batch's ``model_state``.
  """
  num_shards = 1 if mesh is None else mesh.shape[distributed.DATA_AXIS]
  batch = jax.tree.leaves(inputs)[0].shape[0]
  check_micro_batches(batch, num_micro, num_shards)
  micro_inputs = split(inputs, num_micro, num_shards, mesh)
  keys = micro_batch_keys(rng, num_micro)

  # Pass 1: embeddings only. Nothing here is differentiated, so lax.map keeps no residuals.
  frozen = jax.lax.stop_gradient(params)
  emb, model_state = jax.lax.map(lambda args: forward(frozen, *args), (micro_inputs, keys))
  emb = jax.lax.stop_gradient(merge(emb, num_shards, mesh))
  model_state = jax.tree.map(lambda s: jnp.mean(s, axis=0), model_state)

  # Pass 2: the loss on the global batch; its gradient w.r.t. the embeddings is the cache.
  (value, aux), (loss_grads, emb_grads) = jax.value_and_grad(
      loss, argnums=(0, 1), has_aux=True)(params, emb)
  emb_grads = split(emb_grads, num_micro, num_shards, mesh)

  # Pass 3: replay each micro-batch with its key and pull back its slice of the cache.
  def replay(acc, args):
    x, key, cotangent = args
    _, pullback, _ = jax.vjp(lambda p: forward(p, x, key), params, has_aux=True)
    (grads,) = pullback(cotangent)
    return jax.tree.map(jnp.add, acc, grads), None

  grads, _ = jax.lax.scan(replay, loss_grads, (micro_inputs, keys, emb_grads))
  return (value, (aux, model_state)), grads
