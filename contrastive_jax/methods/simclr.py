"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
Representations"; v2: Chen et al. 2020, "Big Self-Supervised Models are Strong Semi-Supervised
Learners").

Both augmented views of the global batch go through one encoder and projection head in a single
forward pass (BN statistics over all 2N views of the global batch: sync BN under ``jit``), and
NT-Xent (``losses.nt_xent``) runs per shard with every other view of the global batch as a
negative. No momentum state: ``post_update`` only stores the new BN statistics.

``config.grad_cache.micro_batches = M > 1`` computes the same loss and gradient in M
micro-batches by gradient caching (``grad_cache.py``): exact without BN (e.g. a ViT encoder with
``config.head.use_bn = False``); with BN each micro-batch uses its own statistics.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from contrastive_jax import grad_cache, models
from contrastive_jax.methods import base
from contrastive_jax.train_state import TrainState


@dataclasses.dataclass(frozen=True)
class SimCLR:
  """SimCLR on the common method surface (see ``methods/base.py``)."""
  config: ml_collections.ConfigDict
  mesh: Mesh
  input_mode: str = "views"

  def __post_init__(self):
    m = grad_cache.micro_batches(self.config)
    if m > 1 and self.config.get("global_batch") is not None:
      grad_cache.check_micro_batches(int(self.config.global_batch), m, self.mesh.size)

  @property
  def model(self) -> base.EncoderWithHeads:
    """Encoder + SimCLR head; ``config.head.use_bn=False`` gives the head of the same depth
    (v1: 2 layers, v2: 3) without BN, so that a BN-free encoder (ViT) makes the whole model
    free of batch coupling (GradCache is then exact)."""
    head_cfg = dict(self.config.head)
    version = head_cfg.pop("version", 2)
    dtype = base.compute_dtype(self.config)
    if head_cfg.pop("use_bn", True):
      head = models.simclr_head(version=version, dtype=dtype, **head_cfg)
    else:
      if version not in (1, 2):
        raise ValueError(f"config.head.version={version}; use 1 or 2")
      head = models.ProjectionMLP(num_layers=version + 1, use_bn=False, last_bn=False,
                                  dtype=dtype, **head_cfg)
    return base.EncoderWithHeads(encoder=base.build_encoder(self.config), head=head)

  @property
  def temperature(self) -> float:
    return float(self.config.loss.temperature)

  def init_state(self, rng: jax.Array, tx: Any) -> TrainState:
    size = self.config.data.image_size
    init_rng, state_rng = jax.random.split(rng)
    dummy = jnp.zeros((2, size, size, 3), jnp.float32)
    variables = self.model.init({"params": init_rng, "dropout": init_rng}, dummy, train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      rng=state_rng)

  def _forward(self, params, batch_stats, views: dict[str, jax.Array], rng: jax.Array):
    """Both views in one pass: ``({"z1": [b, E], "z2": [b, E]}, new batch_stats)``."""
    x = jnp.concatenate([views["view1"], views["view2"]], axis=0)
    (_, z, _), new_vars = self.model.apply(
        {"params": params, "batch_stats": batch_stats}, x, train=True,
        mutable=["batch_stats"], rngs={"dropout": rng})
    z1, z2 = base.split_views(z)
    return {"z1": z1, "z2": z2}, new_vars.get("batch_stats", {})

  def _loss(self, z1: jax.Array, z2: jax.Array):
    """NT-Xent over the global batch and the logged metrics."""
    loss, aux = base.global_loss(self.config, "nt_xent", self.mesh)(
        z1, z2, self.temperature)
    metrics = {"loss": loss, "contrastive_accuracy": aux["accuracy"],
               "temperature": jnp.float32(self.temperature), **base.embedding_summaries(z1, z2)}
    return loss, metrics

  def loss_fn(self, params, state: TrainState, batch: dict[str, jax.Array], rng: jax.Array):
    """Args: batch["view1"], batch["view2"]: [B, H, W, 3] float32 global batches."""
    z, batch_stats = self._forward(params, state.batch_stats, batch, rng)
    loss, metrics = self._loss(z["z1"], z["z2"])
    return loss, (metrics, {"batch_stats": batch_stats})

  def value_and_grad(self, params, state: TrainState, batch: dict[str, jax.Array],
                     rng: jax.Array):
    """``((loss, (metrics, updates)), grads)`` of ``loss_fn``: plain autodiff, or GradCache
    in ``config.grad_cache.micro_batches`` micro-batches (``grad_cache.value_and_grad``)."""
    m = grad_cache.micro_batches(self.config)
    if m == 1:
      return jax.value_and_grad(self.loss_fn, has_aux=True)(params, state, batch, rng)
    views = {"view1": batch["view1"], "view2": batch["view2"]}
    (loss, (metrics, batch_stats)), grads = grad_cache.value_and_grad(
        lambda p, x, key: self._forward(p, state.batch_stats, x, key),
        lambda p, z: self._loss(z["z1"], z["z2"]),
        params, views, rng, num_micro=m, mesh=self.mesh)
    return (loss, (metrics, {"batch_stats": batch_stats})), grads

  def post_update(self, state: TrainState, updates: dict[str, Any]) -> TrainState:
    return state.replace(batch_stats=updates["batch_stats"])

  def encode(self, state: TrainState, images: jax.Array) -> jax.Array:
    """[B, H, W, 3] -> [B, F] encoder features (before the head), BN in inference mode."""
    return self.model.apply({"params": state.params, "batch_stats": state.batch_stats},
                            images, train=False, method=base.EncoderWithHeads.features)
