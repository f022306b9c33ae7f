"""MoCo v2 and MoCo v3: a query encoder trained against a momentum (EMA) key encoder.

MoCo v2 (He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation Learning",
Eq. 1-2, Sec. 3.2-3.3, Alg. 1; Chen et al. 2020, "Improved Baselines with Momentum Contrastive
Learning"): query encoder + 2-layer MLP head; the key encoder is the EMA of the query encoder and
head (``theta_k <- m theta_k + (1 - m) theta_q``, m = 0.999); the negatives of the InfoNCE loss
(T = 0.2) are a FIFO queue of K past keys; keys are computed with shuffle-BN.

MoCo v3 (Chen, Xie & He 2021, "An Empirical Study of Training Self-Supervised Vision
Transformers", Alg. 1): query encoder + projector + predictor; key encoder = EMA of encoder +
projector with the cosine momentum schedule ``m_t = 1 - (1 - m0)(cos(pi t / T) + 1) / 2``; no
queue; the symmetric loss ``ctr(q1, k2) + ctr(q2, k1)`` with the keys of the global batch as
candidates (``losses.moco_v3_loss``, each term scaled by 2 tau); sync BN.

Timing of the momentum update (MoCo, He et al. 2020, Algorithm 1). MoCo updates the key encoder at the start
of iteration t, from the query parameters left by the optimizer step of iteration t - 1, and
then computes the keys. Here ``post_update`` applies that same update right after the optimizer
step of iteration t - 1 (with the momentum of iteration t: ``m(state.step)`` where ``state.step``
is already t), so the keys of iteration t come from exactly the same key encoder. At t = 0 MoCo's
update is a no-op because the key encoder starts as a copy of the query encoder, which is how
``init_state`` initialises ``ema_params``.

Key-encoder BN statistics. Like the reference code (where only ``parameters()`` get the momentum
update and the key encoder runs in train mode), the key encoder normalises with its batch
statistics and keeps its own running statistics in ``ema_batch_stats``, updated by its forward
passes; they are never used by the evaluators (``encode`` uses the query encoder).

Several views (``_MoCo.project``). Each view gets its own BN statistics, as with the reference
code's separate forward calls. With per-device BN (shuffle-BN) the views go through one pass,
joined shard-major where they are (``base.join_views``: no image moves between devices), with a
BN group per device and view (``bn_groups = views x devices``). With sync BN (MoCo v3, MoCo v2
without shuffle-BN) the statistics of a view span the global batch, so each view has its own
pass (``base.apply_train_per_view``), as in the reference.

Shuffle-BN (MoCo Sec. 3.3, MoCo v2 option ``config.moco.shuffle_bn``, default True): the
reference trains with per-GPU BN, so each device's query statistics come from its own
sub-batch. Keys are computed on the global batch permuted at random (``shuffle_permutation``,
``shuffle``), with per-device statistics (``bn_groups = mesh.size``: group g is device g's
contiguous block of the shuffled batch), then put back in order (``unshuffle``). A query and its
positive key are then normalised with different sub-batches, which removes the BN "cheat". The
query encoder uses per-device BN as well, as in the reference. ``shuffle_bn=False`` uses sync BN
(statistics of the global batch per view) for queries and keys.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from contrastive_jax import losses, models
from contrastive_jax.methods import base
from contrastive_jax.train_state import TrainState, cosine_momentum, ema_update, enqueue, \
    init_queue


# ----------------------------------------------------------------------------- shuffle-BN


def shuffle_permutation(rng: jax.Array, batch: int) -> jax.Array:
  """A random permutation ``[B] int32`` of the global batch (drawn inside jit from the step key)."""
  return jax.random.permutation(rng, batch).astype(jnp.int32)


def shuffle(x: jax.Array, perm: jax.Array) -> jax.Array:
  """``x[perm]``: row ``i`` of the result is row ``perm[i]`` of ``x``. ``[B, ...] -> [B, ...]``.

  Under ``jit`` on a batch sharded over ``"data"`` this gather moves rows across devices, so
  device g's contiguous block (its BN group) holds the images ``perm[g n:(g + 1) n]``.
  """
  return jnp.take(x, perm, axis=0)


def unshuffle(y: jax.Array, perm: jax.Array) -> jax.Array:
  """Inverse of ``shuffle``: ``unshuffle(shuffle(x, perm), perm) == x``. ``[B, ...]``."""
  return jnp.take(y, jnp.argsort(perm), axis=0)


# ----------------------------------------------------------------------------- shared


def _copy(tree: Any) -> Any:
  # Distinct buffers: the state is donated to the step, and one buffer may not be donated twice.
  return jax.tree.map(jnp.copy, tree)


class _MoCo(base.Method):
  """What MoCo v2 and v3 share: Flax modules per BN grouping, the temperature.

  No gradient caching (``supports_grad_cache = False``): the keys come from the momentum
  encoder (whose BN groups, per view or shuffled per device, span the whole global batch) and,
  in v2, the queue, so the forward pass is not a row-wise map that micro-batches could split.
  """
  supports_grad_cache = False

  @property
  def temperature(self) -> float:
    return float(self.config.loss.temperature)

  def encoder(self, bn_groups: int) -> nn.Module:
    """The encoder; ``bn_groups`` reaches encoders with BN (read off the class, not built)."""
    cls = models.model_class(self.config.model.name)
    has_bn = any(f.name == "bn_groups" for f in dataclasses.fields(cls))
    return base.build_encoder(self.config, **({"bn_groups": bn_groups} if has_bn else {}))

  def project(self, params, batch_stats, views: list[jax.Array], rng: jax.Array, *,
              per_device_bn: bool, output: int = 1, **variant: Any
              ) -> tuple[list[jax.Array], Any]:
    """Output ``output`` of ``EncoderWithHeads`` (1: projection, 2: prediction) for each view
    ``[B, H, W, 3]``: ``(V x [B, E], new batch_stats)``; BN per view, per device when
    ``per_device_bn`` (module docstring: several views). ``variant``: more ``build_model``
    arguments (MoCo v3's ``predictor=False``)."""
    if per_device_bn or len(views) == 1:
      groups = len(views) * self.mesh.size if per_device_bn else 1
      out, stats = base.apply_train(self.variant(bn_groups=groups, **variant), params,
                                    batch_stats, base.join_views(views, self.mesh), rng=rng)
      return base.split_views(out[output], len(views), self.mesh), stats
    outs, stats = base.apply_train_per_view(self.variant(bn_groups=1, **variant), params,
                                            batch_stats, views, rng)
    return [out[output] for out in outs], stats

  def variant(self, **kwargs: Any) -> base.EncoderWithHeads:
    """``build_model(**kwargs)`` (e.g. ``bn_groups=2``), built once per distinct ``kwargs``;
    ``model`` is ``build_model()``: one BN group, for ``init_state`` and ``encode``."""
    cache = self.__dict__.setdefault("_variants", {})  # frozen dataclass: not a field
    key = tuple(sorted(kwargs.items()))
    if key not in cache:
      cache[key] = self.build_model(**kwargs)
    return cache[key]


# ----------------------------------------------------------------------------- MoCo v2


class MoCoV2(_MoCo):
  """MoCo v2 on the common method surface (see ``methods/base.py``).

  Config (``config.moco``): ``queue_size`` K (65,536), ``momentum`` m (0.999), ``shuffle_bn``
  (True), ``symmetric`` (False). ``config.loss.temperature`` (0.2), ``config.head``
  (``hidden_dim`` 2048, ``out_dim`` 128: the queue's dimension).

  ``symmetric=True`` (the MoCo CIFAR demo's variant): the loss is the SUM
  ``L(q1, k2) + L(q2, k1)`` (both against the same pre-step queue) and the keys of both views
  are enqueued (view 1's keys, then view 2's), so 2B keys a step and K must be a multiple of 2B.
  """
  extra_state_rngs = 1  # the random initial queue

  def __post_init__(self):
    moco = self.config.moco
    per_step = self.keys_per_step
    k = int(moco.queue_size)
    if k <= 0 or k % per_step:
      what = "2 x config.global_batch (config.moco.symmetric=True enqueues both views)" \
          if moco.symmetric else "config.global_batch"
      fix = max(1, round(k / per_step)) * per_step
      raise ValueError(
          f"config.moco.queue_size={k} must be a positive multiple of {what} = {per_step}, so "
          f"that the FIFO writes never straddle the end of the queue; set "
          f"config.moco.queue_size={fix} (or change config.global_batch)")
    if not 0.0 <= float(moco.momentum) <= 1.0:
      raise ValueError(f"config.moco.momentum={moco.momentum} must be in [0, 1] (0.999 in MoCo)")
    self.negative_options      # noqa: B018 -- checks config.negatives before compiling
    super().__post_init__()

  @property
  def negative_options(self):
    """Debiased / hard-negative / decoupled InfoNCE over the queue (``config.negatives``)."""
    return base.negative_options(self.config, reweight=True, multi_positive=())

  # -- settings
  @property
  def num_views(self) -> int:
    """Views forwarded per step through each encoder (2 when symmetric)."""
    return 2 if self.config.moco.symmetric else 1

  @property
  def keys_per_step(self) -> int:
    return self.num_views * int(self.config.global_batch)

  @property
  def shuffle_bn(self) -> bool:
    return bool(self.config.moco.shuffle_bn)

  def momentum(self, step: jax.Array | int) -> jax.Array:  # noqa: ARG002 -- fixed in MoCo v2
    return jnp.float32(self.config.moco.momentum)

  def build_model(self, bn_groups: int = 1) -> base.EncoderWithHeads:
    """Encoder + MoCo v2 head; ``bn_groups`` only changes how train-mode BN groups the batch."""
    head = models.mocov2_head(dtype=base.compute_dtype(self.config), bn_groups=bn_groups,
                              **dict(self.config.head))
    return base.EncoderWithHeads(encoder=self.encoder(bn_groups), head=head)

  # -- surface
  def extra_state(self, params, batch_stats, queue_rng):
    """The key encoder (a copy of the query encoder and head) and the random queue."""
    return dict(ema_params=_copy(params), ema_batch_stats=_copy(batch_stats),
                queue=init_queue(queue_rng, int(self.config.moco.queue_size),
                                 int(self.config.head.out_dim)),
                queue_ptr=jnp.zeros((), jnp.int32))

  def keys(self, state: TrainState, views: list[jax.Array], rng: jax.Array
           ) -> tuple[list[jax.Array], Any, list[jax.Array] | None]:
    """Key-encoder projections of ``views`` (each ``[B, H, W, 3]``), in the views' row order.

    Returns ``(keys [V x [B, D]] (raw, no gradient), new ema_batch_stats, permutations or
    None)``. With shuffle-BN each view is permuted with its own random permutation before the
    per-device-BN forward pass and unpermuted after.
    """
    shuffle_rng, dropout_rng = jax.random.split(rng)
    perms = None
    if self.shuffle_bn:
      perms = [shuffle_permutation(r, v.shape[0])
               for r, v in zip(jax.random.split(shuffle_rng, len(views)), views)]
      views = [shuffle(v, p) for v, p in zip(views, perms)]
    ks, new_stats = self.project(state.ema_params, state.ema_batch_stats, views, dropout_rng,
                                 per_device_bn=self.shuffle_bn)
    ks = [jax.lax.stop_gradient(k) for k in ks]
    if perms is not None:
      ks = [unshuffle(kv, p) for kv, p in zip(ks, perms)]
    return list(ks), new_stats, perms

  def embed(self, params, state, batch, rng):
    """Queries of ``batch["view1"]`` (and ``view2`` when symmetric) and the keys of the other
    view, each ``[B, D]``; ``updates``: ``batch_stats``, ``ema_batch_stats`` and ``keys``
    (``V x [B, D]``: the L2-normalised keys of the global batch to enqueue, in that order; no
    gradient)."""
    v1, v2 = batch["view1"], batch["view2"]
    query_views = [v1, v2] if self.num_views == 2 else [v1]
    key_views = [v2, v1] if self.num_views == 2 else [v2]   # the positive of q(v1) is k(v2)
    q_rng, k_rng = jax.random.split(rng)
    qs, new_stats = self.project(params, state.batch_stats, query_views, q_rng,
                                 per_device_bn=self.shuffle_bn)
    ks, new_ema_stats, _ = self.keys(state, key_views, k_rng)
    # Enqueue order: keys of view 1, then of view 2 (symmetric); just view 2's otherwise. One
    # array per view, enqueued one after the other: concatenating them along the sharded batch
    # would move them between devices for nothing.
    enqueue_keys = tuple(losses.l2_normalize(k) for k in (ks[::-1] if len(ks) == 2 else ks))
    updates = {"batch_stats": new_stats, "ema_batch_stats": new_ema_stats,
               "keys": enqueue_keys}
    return {"queries": list(qs), "keys": ks}, updates

  def loss_from_embeddings(self, params, embeddings, state):
    """InfoNCE of each query against its key and the queue as it was before this step
    (``state.queue``; ``post_update`` replaces it), summed over the query views."""
    qs, ks = embeddings["queries"], embeddings["keys"]
    loss_fn = base.global_loss(self.config, "moco", self.mesh, self.negative_options)
    loss, accuracy = 0.0, 0.0
    for qv, kv in zip(qs, ks):
      term, aux = loss_fn(qv, kv, state.queue, self.temperature)
      loss, accuracy = loss + term, accuracy + aux["accuracy"] / len(qs)
    metrics = {"loss": loss, "contrastive_accuracy": accuracy,
               "temperature": jnp.float32(self.temperature),
               "momentum": self.momentum(state.step + 1),
               **base.embedding_summaries(losses.l2_normalize(qs[0]),
                                          losses.l2_normalize(ks[0]))}
    return loss, metrics

  def post_update(self, state: TrainState, updates: dict[str, Any]) -> TrainState:
    """EMA of the key encoder from the just-updated query parameters, then FIFO enqueue."""
    m = self.momentum(state.step)
    queue, ptr = state.queue, state.queue_ptr
    for keys in updates["keys"]:
      queue, ptr = enqueue(queue, ptr, keys)
    return state.replace(batch_stats=updates["batch_stats"],
                         ema_params=ema_update(state.ema_params, state.params, m),
                         ema_batch_stats=updates["ema_batch_stats"],
                         queue=queue, queue_ptr=ptr)


# ----------------------------------------------------------------------------- MoCo v3


_KEY_PARTS = ("encoder", "head")  # what the momentum encoder mirrors (not the predictor)


def _key_part(tree: Any) -> dict[str, Any]:
  return {k: tree[k] for k in _KEY_PARTS if k in tree}


def schedule_steps(config: ml_collections.ConfigDict) -> int:
  """Total steps T of the momentum schedule: ``config.moco.schedule_steps`` or
  ``config.total_steps``."""
  steps = config.moco.schedule_steps or config.total_steps
  if not steps:
    raise ValueError(
        "MoCo v3's cosine momentum schedule needs the run length in steps: set "
        "config.total_steps, or config.moco.schedule_steps when the run is given in "
        "config.total_epochs")
  return int(steps)


class MoCoV3(_MoCo):
  """MoCo v3 on the common method surface (see ``methods/base.py``).

  Config: ``config.head`` (projector: ``num_layers`` 2 for ResNet / 3 for ViT, ``hidden_dim``
  4096, ``out_dim`` 256), ``config.predictor`` (``hidden_dim`` 4096, ``out_dim`` 256),
  ``config.moco.momentum`` (m0 = 0.99, cosine to 1 over ``schedule_steps``),
  ``config.loss.temperature`` (1.0 ResNet, 0.2 ViT). Sync BN throughout.
  """

  def __post_init__(self):
    schedule_steps(self.config)
    if not 0.0 <= float(self.config.moco.momentum) <= 1.0:
      raise ValueError(f"config.moco.momentum={self.config.moco.momentum} must be in [0, 1] "
                       "(0.99 in MoCo v3)")
    base.negative_options(self.config, reweight=False, multi_positive=())
    super().__post_init__()

  def momentum(self, step: jax.Array | int) -> jax.Array:
    """``m_t = 1 - (1 - m0)(cos(pi t / T) + 1) / 2`` ([] float32)."""
    return cosine_momentum(step, schedule_steps(self.config), float(self.config.moco.momentum))

  def build_model(self, bn_groups: int = 1, predictor: bool = True) -> base.EncoderWithHeads:
    """Encoder + projector (+ predictor). ``bn_groups`` = views per pass (per-view sync BN)."""
    dtype = base.compute_dtype(self.config)
    head = models.mocov3_projector(dtype=dtype, bn_groups=bn_groups, **dict(self.config.head))
    pred = models.mocov3_predictor(dtype=dtype, bn_groups=bn_groups,
                                   **dict(self.config.predictor)) if predictor else None
    return base.EncoderWithHeads(encoder=self.encoder(bn_groups), head=head, predictor=pred)

  def extra_state(self, params, batch_stats):
    """The key encoder: a copy of the query encoder and projector (not the predictor)."""
    return dict(ema_params=_copy(_key_part(params)),
                ema_batch_stats=_copy(_key_part(batch_stats)))

  def embed(self, params, state, batch, rng):
    """Both views (``batch["view1"]``, ``batch["view2"]``: [B, H, W, 3]), one pass per view and
    encoder with per-view (global, sync) BN statistics: predictions ``q1, q2`` and keys
    ``k1, k2`` [B, D] (no gradient); ``updates``: ``batch_stats``, ``ema_batch_stats``."""
    views = [batch["view1"], batch["view2"]]
    q_rng, k_rng = jax.random.split(rng)
    (q1, q2), new_stats = self.project(params, state.batch_stats, views, q_rng,
                                       per_device_bn=False, output=2)
    (k1, k2), new_ema_stats = self.project(state.ema_params, state.ema_batch_stats, views,
                                           k_rng, per_device_bn=False, predictor=False)
    k1, k2 = jax.lax.stop_gradient(k1), jax.lax.stop_gradient(k2)
    return ({"q1": q1, "q2": q2, "k1": k1, "k2": k2},
            {"batch_stats": new_stats, "ema_batch_stats": new_ema_stats})

  def loss_from_embeddings(self, params, embeddings, state):
    """``moco_v3_loss(q1, k2) + moco_v3_loss(q2, k1)`` over the global batch."""
    e = embeddings
    loss_fn = base.global_loss(self.config, "moco_v3", self.mesh)
    l12, a12 = loss_fn(e["q1"], e["k2"], self.temperature)
    l21, a21 = loss_fn(e["q2"], e["k1"], self.temperature)
    loss = l12 + l21
    metrics = {"loss": loss, "contrastive_accuracy": 0.5 * (a12["accuracy"] + a21["accuracy"]),
               "temperature": jnp.float32(self.temperature),
               "momentum": self.momentum(state.step + 1),
               **base.embedding_summaries(losses.l2_normalize(e["q1"]),
                                          losses.l2_normalize(e["k2"]))}
    return loss, metrics

  def post_update(self, state: TrainState, updates: dict[str, Any]) -> TrainState:
    """EMA of encoder + projector with ``m(state.step)`` (the next iteration's momentum)."""
    m = self.momentum(state.step)
    return state.replace(batch_stats=updates["batch_stats"],
                         ema_params=ema_update(state.ema_params, _key_part(state.params), m),
                         ema_batch_stats=updates["ema_batch_stats"])
