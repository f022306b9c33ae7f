"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
Representations"; v2: Chen et al. 2020, "Big Self-Supervised Models are Strong Semi-Supervised
Learners").

Both augmented views of the global batch go through one encoder and projection head in a single
forward pass (BN statistics over all 2N views of the global batch: sync BN under ``jit``), and
NT-Xent (``losses.nt_xent``) runs per shard with every other view of the global batch as a
negative. No momentum state: ``post_update`` only stores the new BN statistics.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from contrastive_jax import models
from contrastive_jax.methods import base
from contrastive_jax.train_state import TrainState


@dataclasses.dataclass(frozen=True)
class SimCLR:
  """SimCLR on the common method surface (see ``methods/base.py``)."""
  config: ml_collections.ConfigDict
  mesh: Mesh
  input_mode: str = "views"

  @property
  def model(self) -> base.EncoderWithHeads:
    head_cfg = dict(self.config.head)
    version = head_cfg.pop("version", 2)
    head = models.simclr_head(version=version, dtype=base.compute_dtype(self.config), **head_cfg)
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

  def loss_fn(self, params, state: TrainState, batch: dict[str, jax.Array], rng: jax.Array):
    """Args: batch["view1"], batch["view2"]: [B, H, W, 3] float32 global batches."""
    x = jnp.concatenate([batch["view1"], batch["view2"]], axis=0)
    (_, z, _), new_vars = self.model.apply(
        {"params": params, "batch_stats": state.batch_stats}, x, train=True,
        mutable=["batch_stats"], rngs={"dropout": rng})
    z1, z2 = base.split_views(z)
    loss, aux = base.global_loss(self.config, "nt_xent", self.mesh)(
        z1, z2, self.temperature)
    metrics = {"loss": loss, "contrastive_accuracy": aux["accuracy"],
               "temperature": jnp.float32(self.temperature), **base.embedding_summaries(z1, z2)}
    return loss, (metrics, {"batch_stats": new_vars["batch_stats"]})

  def post_update(self, state: TrainState, updates: dict[str, Any]) -> TrainState:
    return state.replace(batch_stats=updates["batch_stats"])

  def encode(self, state: TrainState, images: jax.Array) -> jax.Array:
    """[B, H, W, 3] -> [B, F] encoder features (before the head), BN in inference mode."""
    return self.model.apply({"params": state.params, "batch_stats": state.batch_stats},
                            images, train=False, method=base.EncoderWithHeads.features)
