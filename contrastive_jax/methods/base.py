"""The one surface every contrastive method has, and what the methods share.

A method is a frozen dataclass bound to ``(config, mesh)`` that subclasses ``Method``; the trainer
(``train.py``) only calls the surface below and never branches on the method's name.

What a method writes (everything else is here, once):

* ``input_mode`` (class attribute): ``"views"`` (batches ``view1``, ``view2`` ``[B, H, W, 3]``)
  or ``"image_text"`` (``image`` ``[B, H, W, 3]``, ``tokens`` ``[B, L] int32``);
* ``build_model() -> nn.Module``: the Flax module; ``Method.model`` builds it once and caches it;
* ``embed(params, state, batch, rng) -> (embeddings, updates)``: the train-mode forward pass.
  ``embeddings`` is a dict of ``[B, ...]`` arrays, row ``i`` from example ``i``; ``updates`` a
  dict of ``TrainState`` fields the pass produced (new BN statistics, keys to enqueue);
* ``loss_from_embeddings(params, embeddings, state) -> (loss [], metrics)``: the contrastive loss
  over the global batch (it may read parameters directly, e.g. CLIP's logit scale);
* optionally ``extra_state(params, batch_stats, *rngs)`` (momentum encoder, queue; asks for
  ``extra_state_rngs`` keys), ``post_update`` (EMA, queue, logit-scale clamp),
  ``features`` (what ``encode`` applies) and, for image-text methods, ``encode_image`` /
  ``encode_text`` (the joint embeddings the zero-shot and retrieval evaluators call).
  A method loads no data and runs no evaluation: ``evaluate/runner.py`` does.

What ``Method`` gives every method:

* ``init_state(rng, tx) -> TrainState``: ``model.init`` on ``example_inputs()`` (shapes only:
  usable under ``jax.eval_shape`` and ``jax.jit``) plus ``extra_state``;
* ``loss_fn(params, state, batch, rng) -> (loss, (metrics, updates))``: ``embed`` then
  ``loss_from_embeddings``;
* ``value_and_grad(params, state, batch, rng) -> ((loss, (metrics, updates)), grads)``: how the
  trainer differentiates ``loss_fn``, always. Plain autodiff, or, with
  ``config.grad_cache.micro_batches = M > 1``, gradient caching (Gao et al. 2021, "Scaling Deep
  Contrastive Learning Batch Size under Memory Limited Setup"; ``grad_cache.py``) over the two
  public steps: ``embed`` per micro-batch, ``loss_from_embeddings`` on the global batch. Only
  methods that declare ``supports_grad_cache = True`` accept M > 1 (SimCLR and CLIP: their
  embeddings are row-wise functions of the inputs and the loss reads nothing else);
* ``post_update(state, updates) -> state`` after the optimizer step (default: store the new BN
  statistics);
* ``encode(state, images) -> [B, F]``: frozen-encoder features for the evaluators (inference
  mode, ``features`` of ``model``).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from contrastive_jax import grad_cache, losses, models
from contrastive_jax.metrics import embedding as embedding_metrics
from contrastive_jax.train_state import TrainState

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
  name = config.dtype
  if name not in DTYPES:
    raise ValueError(f"config.dtype={name!r} is not supported; use one of {sorted(DTYPES)}")
  return DTYPES[name]


def build_encoder(config: ml_collections.ConfigDict, **extra: Any) -> nn.Module:
  """The image encoder named by ``config.model.name`` with ``config.model.kwargs``."""
  kwargs = dict(config.model.kwargs or {})
  kwargs.setdefault("dtype", compute_dtype(config))
  if config.remat:
    kwargs.setdefault("remat", True)
  kwargs.update(extra)
  return models.build_model(config.model.name, **kwargs)


class EncoderWithHeads(nn.Module):
  """``encoder`` followed by a projection head and, optionally, a predictor (MoCo v3).

  ``__call__(x [B,H,W,3], train) -> (h [B,F] features, z [B,E] projections, p [B,E] or None)``.
  """
  encoder: nn.Module
  head: nn.Module
  predictor: nn.Module | None = None

  def __call__(self, x, train: bool = True):
    h = self.encoder(x, train=train)
    z = self.head(h, train=train)
    p = self.predictor(z, train=train) if self.predictor is not None else None
    return h, z, p

  def features(self, x, train: bool = False):
    return self.encoder(x, train=train)


def apply_train(model: nn.Module, params, batch_stats, *inputs: jax.Array, rng: jax.Array):
  """Train-mode forward with dropout key ``rng``: ``(outputs, new batch_stats)`` (``{}`` without
  BN)."""
  out, new_vars = model.apply({"params": params, "batch_stats": batch_stats}, *inputs,
                              train=True, mutable=["batch_stats"], rngs={"dropout": rng})
  return out, new_vars.get("batch_stats", {})


# Several views in one forward pass. Concatenating V views ``[B, ...]`` along a batch that is
# split over the D devices of ``"data"`` would put view 1 on the first D / V devices and move
# every image across the mesh (XLA lowers the concatenation and the split after the pass to
# all-to-alls). Instead the views are stacked shard-major: device d's block of the ``[V B, ...]``
# batch holds its own rows of view 1, then of view 2, ... (``join_views``), so the images stay
# where the input pipeline put them. The row order differs from the concatenation's; what reads
# the rows must not care: BatchNorm over the whole batch (``bn_groups=1``: sync BN over all
# views) or over groups of one device and one view (``bn_groups = V D``: contiguous blocks of
# ``B / D`` rows, per-device BN of each view). Per-view statistics over the global batch
# (``bn_groups = V``) need one pass per view instead (``apply_train_per_view``).


def _constrain(x: jax.Array, mesh: Mesh | None) -> jax.Array:
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P("data")))


def join_views(views: list[jax.Array], mesh: Mesh | None) -> jax.Array:
  """``V x [B, ...]`` -> ``[V B, ...]``, shard-major: with ``D`` devices and ``n = B / D``, row
  ``d V n + v n + i`` is row ``d n + i`` of view ``v`` (one device's rows of every view form its
  block; no data moves between devices). Inverse: ``split_views``."""
  if len(views) == 1:
    return views[0]
  d = 1 if mesh is None else mesh.size
  b = views[0].shape[0]
  x = jnp.stack([v.reshape((d, b // d) + v.shape[1:]) for v in views], axis=1)
  return _constrain(x.reshape((len(views) * b,) + views[0].shape[1:]), mesh)


def split_views(x: jax.Array, num_views: int, mesh: Mesh | None) -> list[jax.Array]:
  """``[V B, ...]`` in ``join_views``'s order -> ``V x [B, ...]`` (row ``i`` from example ``i``)."""
  if num_views == 1:
    return [x]
  d = 1 if mesh is None else mesh.size
  b = x.shape[0] // num_views
  y = x.reshape((d, num_views, b // d) + x.shape[1:])
  return [_constrain(y[:, v].reshape((b,) + x.shape[1:]), mesh) for v in range(num_views)]


def apply_train_per_view(model: nn.Module, params, batch_stats, views: list[jax.Array],
                         rng: jax.Array):
  """One train-mode pass per view, each normalised with its own (global) batch statistics:
  ``([outputs of each view], new batch_stats)``. Every pass starts from ``batch_stats``; the new
  running statistics are the mean of the passes' (``m r + (1 - m) mean_v s_v``, the same update
  as one pass with a BN group per view). Dropout key of view ``v``: ``fold_in(rng, v)``."""
  outs, stats = [], []
  for v, x in enumerate(views):
    out, new_stats = apply_train(model, params, batch_stats, x, rng=jax.random.fold_in(rng, v))
    outs.append(out)
    stats.append(new_stats)
  return outs, jax.tree.map(lambda *s: sum(s) / len(s), *stats)


def embedding_summaries(z1: jax.Array, z2: jax.Array) -> dict[str, jax.Array]:
  """Alignment and uniformity (Wang & Isola 2020) of the L2-normalised positive pairs."""
  return {"alignment": embedding_metrics.alignment(z1, z2),
          "uniformity": 0.5 * (embedding_metrics.uniformity(z1) +
                                embedding_metrics.uniformity(z2))}


MULTI_POSITIVE = ("none", "labels", "captions")


def negative_options(config: ml_collections.ConfigDict, *, reweight: bool,
                     multi_positive: tuple[str, ...]) -> losses.NegativeOptions:
  """``losses.NegativeOptions`` from ``config.negatives``, checked against what the method
  supports (``reweight``: debiased / hard / decoupled; ``multi_positive``: the group kinds it
  has). Raises ``ValueError`` naming the key, before anything is compiled."""
  neg = config.negatives
  kind = neg.multi_positive
  if kind not in MULTI_POSITIVE:
    raise ValueError(f"config.negatives.multi_positive={kind!r}; use one of {MULTI_POSITIVE}")
  if kind != "none" and kind not in multi_positive:
    raise ValueError(f"config.negatives.multi_positive={kind!r} is not available for method "
                     f"{config.method!r}; it supports {('none',) + multi_positive}")
  tau, beta, decoupled = float(neg.debias_tau_plus), float(neg.hard_beta), bool(neg.decoupled)
  if not reweight and (tau or beta or decoupled):
    raise ValueError(f"config.negatives.debias_tau_plus / hard_beta / decoupled do not apply to "
                     f"method {config.method!r} (SimCLR, MoCo v2 and CLIP have them); reset "
                     "them to 0 / False")
  options = losses.NegativeOptions(debias_tau_plus=tau, hard_beta=beta, decoupled=decoupled,
                                   multi_positive=kind != "none")
  return options


def caption_ids(tokens: jax.Array) -> jax.Array:
  """[B, L] int tokens -> [B] int32 ids, equal for identical rows: a polynomial hash mod 2^32
  (two rows that differ collide with probability about 2^-32 per pair; the loss then treats
  them as the same caption). Non-negative, so that no caption reads as "unknown" (-1)."""
  length = tokens.shape[1]
  powers = np.ones(length, np.uint32)
  for j in range(1, length):
    powers[j] = np.uint32((int(powers[j - 1]) * 1_000_003) % 2**32)
  h = jnp.sum(tokens.astype(jnp.uint32) * jnp.asarray(powers)[None, :], axis=1,
              dtype=jnp.uint32)
  h = h ^ (h >> 16)
  return (h >> 1).astype(jnp.int32)


def global_loss(config: ml_collections.ConfigDict, name: str, mesh,
                options: losses.NegativeOptions | None = None):
  """The loss ``name`` over the global batch, ``(loss, metrics)``, as ``config.loss_impl`` says:
  ``"all_gather"`` (default; fastest while the [n, N] logits fit) or ``"ring"`` (memory-bounded,
  same values and gradients; see ``losses/ring.py``). ``options``: how negatives are treated
  (``config.negatives``; ``negative_options``). Group ids go in as ``groups=`` [N] int."""
  loss = losses.get_loss(name, config.loss_impl, tile=config.loss_tile or None,
                         options=options)
  return losses.sharded(loss, mesh, return_metrics=True)


# The batch entries each input mode feeds the model (``data.pipeline`` also yields labels etc.).
INPUTS = {"views": ("view1", "view2"), "image_text": ("image", "tokens")}


@dataclasses.dataclass(frozen=True)
class Method(abc.ABC):
  """A contrastive method bound to the config and the device mesh (the surface: module doc)."""
  config: ml_collections.ConfigDict
  mesh: Mesh

  input_mode: ClassVar[str] = "views"
  # True when ``embed`` maps each input row to its embedding rows independently of the other
  # rows given the parameters, and ``loss_from_embeddings`` reads only the embeddings and the
  # parameters: then GradCache may split the batch (BN is the documented approximation).
  supports_grad_cache: ClassVar[bool] = False
  # PRNG keys ``extra_state`` takes (MoCo v2: one, for the random initial queue).
  extra_state_rngs: ClassVar[int] = 0

  def __post_init__(self):
    m = grad_cache.micro_batches(self.config)
    if m > 1:
      if not self.supports_grad_cache:
        raise ValueError(f"config.grad_cache.micro_batches={m} but method "
                         f"{self.config.method!r} has no gradient caching (SimCLR and CLIP "
                         "do); set it to 1")
      if self.config.global_batch is not None:
        grad_cache.check_micro_batches(int(self.config.global_batch), m, self.mesh.size)

  # -- what a method defines
  @abc.abstractmethod
  def build_model(self) -> nn.Module:
    """The Flax module of the method (use ``model``, which builds it once)."""

  @abc.abstractmethod
  def embed(self, params, state: TrainState, batch: dict[str, jax.Array], rng: jax.Array
            ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train-mode forward pass: ``(embeddings, updates)`` (see the module docstring)."""

  @abc.abstractmethod
  def loss_from_embeddings(self, params, embeddings: dict[str, Any], state: TrainState
                           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(loss [], metrics)`` over the global batch's ``embeddings``."""

  def extra_state(self, params, batch_stats, *rngs: jax.Array) -> dict[str, Any]:
    """``TrainState`` fields beyond the common five (momentum encoder, queue); none here."""
    del params, batch_stats, rngs
    return {}

  @staticmethod
  def features(module: nn.Module, images: jax.Array) -> jax.Array:
    """What ``encode`` applies: the encoder's ``[B, F]`` features before the head."""
    return module.features(images, train=False)

  def example_inputs(self) -> tuple[jax.Array, ...]:
    """Dummy inputs for ``model.init`` (two images of ``config.data.image_size``)."""
    size = self.config.data.image_size
    return (jnp.zeros((2, size, size, 3), jnp.float32),)

  # -- shared
  @functools.cached_property
  def model(self) -> nn.Module:
    """``build_model()``, built on first use and kept."""
    return self.build_model()

  def init_state(self, rng: jax.Array, tx: Any) -> TrainState:
    """Fresh state: parameters from ``model.init``, ``tx``'s state, ``extra_state``."""
    init_rng, *extra_rngs, state_rng = jax.random.split(rng, 2 + self.extra_state_rngs)
    variables = self.model.init({"params": init_rng, "dropout": init_rng},
                                *self.example_inputs(), train=False)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params), rng=state_rng,
                      **self.extra_state(params, batch_stats, *extra_rngs))

  def group_ids(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Integer inputs of the loss read from the batch, not computed by the model (group ids:
    labels, caption ids), merged into ``embeddings`` before ``loss_from_embeddings``. They are
    not embeddings: GradCache passes them to the loss pass without differentiating them."""
    del batch
    return {}

  def loss_fn(self, params, state: TrainState, batch: dict[str, jax.Array], rng: jax.Array):
    """``(loss, (metrics, updates))`` of the global ``batch`` (``[B, ...]`` arrays)."""
    embeddings, updates = self.embed(params, state, batch, rng)
    embeddings = {**embeddings, **self.group_ids(batch)}
    loss, metrics = self.loss_from_embeddings(params, embeddings, state)
    return loss, (metrics, updates)

  def value_and_grad(self, params, state: TrainState, batch: dict[str, jax.Array],
                     rng: jax.Array):
    """``((loss, (metrics, updates)), grads)`` of ``loss_fn``: plain autodiff, or GradCache in
    ``config.grad_cache.micro_batches`` micro-batches (``updates`` then holds the mean of the
    micro-batches' BN statistics; see ``grad_cache.value_and_grad``)."""
    m = grad_cache.micro_batches(self.config)
    if m == 1:
      return jax.value_and_grad(self.loss_fn, has_aux=True)(params, state, batch, rng)
    inputs = {k: batch[k] for k in INPUTS[self.input_mode]}
    groups = self.group_ids(batch)
    return grad_cache.value_and_grad(
        lambda p, x, key: self.embed(p, state, x, key),
        lambda p, emb: self.loss_from_embeddings(p, {**emb, **groups}, state),
        params, inputs, rng, num_micro=m, mesh=self.mesh)

  def post_update(self, state: TrainState, updates: dict[str, Any]) -> TrainState:
    """After the optimizer step: stores the new BN statistics."""
    return state.replace(batch_stats=updates["batch_stats"])

  def variables(self, state: TrainState) -> dict[str, Any]:
    return {"params": state.params, "batch_stats": state.batch_stats}

  def encode(self, state: TrainState, images: jax.Array) -> jax.Array:
    """[B, H, W, 3] -> [B, F] features (``features``), inference mode."""
    return self.model.apply(self.variables(state), images, method=self.features)
