"""The explicit training state and the pure updates of the momentum methods.

Every quantity that a step reads and writes is a named field of one pytree, so that a single
orbax item checkpoints all of it and ``jax.jit(step, donate_argnums=0)`` can reuse its buffers:

* ``step, params, batch_stats, opt_state, rng`` for every method;
* ``ema_params, ema_batch_stats`` (the momentum/key encoder) and ``queue [K, D], queue_ptr``
  (the MoCo memory of negatives) for the momentum methods; ``None`` (absent) otherwise.

Updates implemented here (pure, jit-safe):

* ``ema_update``: the momentum (key) encoder of MoCo (He et al. 2020, Eq. 2):
  ``theta_k <- m * theta_k + (1 - m) * theta_q``, applied to parameters and BN statistics.
* ``enqueue``: MoCo's FIFO dictionary (He et al. 2020, Sec. 3.2): the keys of the current
  global batch replace the oldest ``B`` entries.
* ``cosine_momentum``: MoCo v3's schedule (Chen, Xie & He 2021, following BYOL, Grill et al.
  2020, Sec. 3.2): ``m_t = 1 - (1 - m0) * (cos(pi * t / T) + 1) / 2``, from ``m0`` to 1.

PRNG keys: ``rng`` holds a new-style typed key (``jax.random.key``, dtype ``key<fry>``).
orbax-checkpoint 0.12.8 saves and restores typed keys through ``StandardSave`` (checked in
tests/test_checkpoint.py, also across device counts). Raw ``uint32[2]`` keys from
``jax.random.PRNGKey`` also work everywhere in this module and checkpoint the same way.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

PyTree = Any


@struct.dataclass
class TrainState:
  """All state of a run; a pytree (``flax.struct.dataclass``), updated with ``.replace``.

  Attributes:
    step: [] int32, number of optimizer steps taken.
    params: the trainable parameters (online / query encoder, heads, logit scale).
    batch_stats: BatchNorm running statistics (``{}`` for models without BN).
    opt_state: the optax state of ``params``.
    rng: [] typed PRNG key (``jax.random.key``); fold in ``step`` inside jit for per-step keys.
    ema_params: momentum (key) encoder parameters, same tree as the part of ``params`` it
      mirrors; ``None`` for SimCLR/CLIP/SigLIP.
    ema_batch_stats: BN statistics of the momentum encoder; ``None`` when absent.
    queue: [K, D] float32 MoCo v2 dictionary of L2-normalised keys; ``None`` when absent.
    queue_ptr: [] int32 next row of ``queue`` to overwrite; ``None`` when absent.
  """
  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  rng: jax.Array
  ema_params: PyTree = None
  ema_batch_stats: PyTree = None
  queue: jax.Array | None = None
  queue_ptr: jax.Array | None = None


def ema_update(ema: PyTree, online: PyTree, momentum: float | jax.Array) -> PyTree:
  """``m * ema + (1 - m) * online`` leaf-wise (MoCo Eq. 2); works for params and BN stats.

  Args:
    ema: the momentum tree (e.g. key-encoder params or batch_stats).
    online: a tree of the same structure (query encoder), read only.
    momentum: scalar ``m`` in [0, 1]; a Python float or a traced scalar (schedules under jit).

  Returns:
    The new momentum tree, each leaf in its own dtype (bf16 statistics stay bf16).
  """
  def update(e, o):
    m = jnp.asarray(momentum, dtype=jnp.float32)
    # Mix in float32 so that m close to 1 (0.999) is not rounded away in low precision.
    new = m * e.astype(jnp.float32) + (1.0 - m) * o.astype(jnp.float32)
    return new.astype(e.dtype)
  return jax.tree.map(update, ema, online)


def enqueue(queue: jax.Array, ptr: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  """FIFO write of ``keys`` into ``queue`` at rows ``[ptr, ptr + B)``; ``ptr`` advances by B mod K.

  Args:
    queue: [K, D] float32, the dictionary of negatives.
    ptr: [] int32, the oldest row (next to overwrite).
    keys: [B, D] the (global-batch, L2-normalised) keys of this step; cast to the queue dtype.

  Returns:
    ``(queue, ptr)`` updated. Because ``K % B == 0`` and ``ptr`` is always a multiple of ``B``,
    a write never straddles the end of the queue.

  Raises:
    ValueError: at trace time when ``K % B != 0`` or the feature sizes differ.
  """
  num_rows, dim = queue.shape
  batch, key_dim = keys.shape
  if key_dim != dim:
    raise ValueError(f"keys have dimension {key_dim} but the queue stores {dim}; set the "
                     "queue dimension (moco.queue_dim / embedding size) to the key dimension")
  if num_rows % batch:
    raise ValueError(
        f"queue size K={num_rows} is not divisible by the global batch B={batch}; set the "
        f"queue size to a multiple of the global batch (e.g. {max(1, num_rows // batch) * batch})")
  ptr = jnp.asarray(ptr, jnp.int32)
  queue = jax.lax.dynamic_update_slice(queue, keys.astype(queue.dtype), (ptr, jnp.int32(0)))
  return queue, (ptr + batch) % num_rows


def cosine_momentum(step: int | jax.Array, total_steps: int,
                    base_momentum: float | jax.Array) -> jax.Array:
  """MoCo v3 / BYOL momentum: ``1 - (1 - m0) * (cos(pi * t / T) + 1) / 2``, ``t`` clamped to T.

  Returns ``m0`` at ``t = 0``, ``(1 + m0) / 2`` at ``t = T / 2`` and 1 for ``t >= T``.
  Returns a [] float32 array (traceable in ``step``).
  """
  if total_steps <= 0:
    raise ValueError(f"total_steps={total_steps} must be positive for the momentum schedule")
  t = jnp.minimum(jnp.asarray(step, jnp.float32), float(total_steps))
  cos = jnp.cos(math.pi * t / total_steps)
  return 1.0 - (1.0 - jnp.asarray(base_momentum, jnp.float32)) * (cos + 1.0) / 2.0


def init_queue(rng: jax.Array, num_rows: int, dim: int) -> jax.Array:
  """[K, D] float32 random unit vectors, as MoCo initialises its queue (pointer starts at 0).

  Raises:
    ValueError: when ``num_rows`` or ``dim`` is not positive.
  """
  if num_rows <= 0 or dim <= 0:
    raise ValueError(f"queue shape ({num_rows}, {dim}) must be positive; set the queue size "
                     "and the embedding dimension to positive integers")
  queue = jax.random.normal(rng, (num_rows, dim), jnp.float32)
  return queue / jnp.linalg.norm(queue, axis=1, keepdims=True)
