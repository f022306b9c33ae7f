"""What every method shares: the encoder + head module, dtype and model building from config.

A method is an object with a small common surface, so that ``train.py`` never branches on the
method's name:

* ``input_mode``: ``"views"`` (two augmented views) or ``"image_text"``;
* ``init_state(rng, tx) -> TrainState`` (shape-only friendly: called under ``jax.eval_shape``
  and ``jax.jit``);
* ``loss_fn(params, state, batch, rng) -> (loss, (metrics, updates))`` where ``updates`` is a
  dict of ``TrainState`` fields the forward pass produced (new BN statistics, keys to enqueue);
* ``post_update(state, updates) -> state`` after the optimizer step (EMA, queue; for SimCLR and
  CLIP it only stores the new BN statistics);
* ``encode(state, images) -> [B, F]`` frozen-encoder features for the evaluators;
* optional ``value_and_grad(params, state, batch, rng) -> ((loss, (metrics, updates)),
  grads)``: how the trainer differentiates ``loss_fn`` when the method defines it (SimCLR and
  CLIP: gradient caching over ``config.grad_cache.micro_batches``, see ``grad_cache.py``);
  without it the trainer uses ``jax.value_and_grad(loss_fn, has_aux=True)``;
* optional ``extra_evaluations(state, mesh, config) -> dict[str, float]``: evaluations only the
  method knows how to run (CLIP: zero-shot, retrieval); the trainer calls them through
  ``extra_evaluations`` below at the final evaluation.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from contrastive_jax import losses, models, ring_losses
from contrastive_jax.evaluate import embedding_metrics as em

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
  name = config.get("dtype", "float32")
  if name not in DTYPES:
    raise ValueError(f"config.dtype={name!r} is not supported; use one of {sorted(DTYPES)}")
  return DTYPES[name]


def build_encoder(config: ml_collections.ConfigDict, **extra: Any) -> nn.Module:
  """The image encoder named by ``config.model.name`` with ``config.model.kwargs``."""
  kwargs = dict(config.model.get("kwargs", {}) or {})
  kwargs.setdefault("dtype", compute_dtype(config))
  if config.get("remat", False):
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


def split_views(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[2B, ...] -> two [B, ...] halves (the views were concatenated along the batch)."""
  half = x.shape[0] // 2
  return x[:half], x[half:]


def embedding_summaries(z1: jax.Array, z2: jax.Array) -> dict[str, jax.Array]:
  """Alignment and uniformity (Wang & Isola 2020) of the L2-normalised positive pairs."""
  return {"alignment": em.alignment(z1, z2),
          "uniformity": 0.5 * (em.uniformity(z1) + em.uniformity(z2))}


def extra_evaluations(method: Any, state: Any, mesh: Any,
                      config: ml_collections.ConfigDict) -> dict[str, float]:
  """The method's own evaluations (``method.extra_evaluations``), ``{}`` when it has none."""
  fn = getattr(method, "extra_evaluations", None)
  return {} if fn is None else dict(fn(state, mesh, config))


def global_loss(config: ml_collections.ConfigDict, name: str, mesh):
  """The loss ``name`` over the global batch, ``(loss, metrics)``, as ``config.loss_impl`` says:
  ``"all_gather"`` (default; fastest while the [n, N] logits fit) or ``"ring"`` (memory-bounded,
  same values and gradients; see ``ring_losses.py``)."""
  impl = config.get("loss_impl", "all_gather")
  return losses.sharded(ring_losses.get_loss(name, impl), mesh, return_metrics=True)
