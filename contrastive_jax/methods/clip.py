"""CLIP and SigLIP: image and text towers trained to agree on matching pairs.

CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision", Fig. 3): symmetric cross-entropy over the cosine similarities of the global batch,
scaled by a learned ``exp(t)``, ``t`` initialised at ``log(1 / 0.07)``. SigLIP (Zhai et al. 2023,
"Sigmoid Loss for Language Image Pre-Training", Alg. 1): the pairwise sigmoid loss with a learned
scale (``t`` initialised at ``log 10``) and bias (initialised at -10). ``config.clip.loss``
picks ``"clip"`` or ``"siglip"``; the towers come from ``models.build_clip``.

The logit scale is clipped where it is used: the loss multiplies the similarities by
``exp(min(t, log(max_logit_scale)))`` with ``config.clip.max_logit_scale = 100`` (CLIP Sec. 2.5;
``None`` turns the clip off). Above the cap the scale gets no gradient, so
``post_update`` also clamps the parameter itself into ``[0, log(max_logit_scale)]`` after each
optimizer step, as open_clip does, so that it can come back below the cap.

Weight decay (AdamW, wd 0.2 in the recipe) skips gains, biases, embeddings and the logit
scale/bias: ``optim.weight_decay_mask`` excludes them by name and rank (checked in
tests/test_methods.py on the CLIP parameter tree).

``config.grad_cache.micro_batches = M > 1`` computes the same loss and gradient (towers, logit
scale and bias) in M micro-batches by gradient caching (``grad_cache.py``): exact for the
BN-free ViT towers; a ResNet image tower normalises each micro-batch with its own statistics.

Evaluation: ``encode`` gives the image tower's features (before the projection) for kNN and
linear probes; ``encode_image`` / ``encode_text`` give the L2-normalised joint embeddings that
the zero-shot and retrieval evaluators of ``evaluate/runner.py`` call.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from contrastive_jax import models
from contrastive_jax.data import pipeline
from contrastive_jax.data import tokenizer as tok_lib
from contrastive_jax.methods import base
from contrastive_jax.train_state import TrainState

LOSS_NAMES = ("clip", "siglip")


def clipped_logit_scale(log_scale: jax.Array, max_scale: float | None) -> jax.Array:
  """``exp(min(log_scale, log(max_scale)))`` ([] float32); no clip when ``max_scale`` is None."""
  log_scale = jnp.asarray(log_scale, jnp.float32)
  if max_scale is not None:
    log_scale = jnp.minimum(log_scale, math.log(max_scale))
  return jnp.exp(log_scale)


class CLIP(base.Method):
  """CLIP / SigLIP on the common method surface (see ``methods/base.py``).

  Config: ``config.model`` (image tower: ``name`` and ``kwargs``), ``config.text.kwargs``
  (``TextTransformer`` fields; ``vocab_size``, ``context_length`` and ``eot_id`` default to the
  data tokenizer's), ``config.clip``: ``loss`` ("clip" | "siglip"), ``embed_dim``,
  ``max_logit_scale`` (100), ``logit_scale_init`` / ``logit_bias_init`` (None: the paper's).
  """
  input_mode = "image_text"
  supports_grad_cache = True  # the logit scale and bias get their gradient from the loss pass

  def __post_init__(self):
    name = self.loss_name
    if name not in LOSS_NAMES:
      raise ValueError(f"config.clip.loss={name!r} is unknown; use one of {LOSS_NAMES}")
    if self.config.method == "siglip" and name != "siglip":
      raise ValueError("config.method='siglip' needs config.clip.loss='siglip' (or use "
                       "config.method='clip' for the softmax CLIP loss)")
    max_scale = self.max_logit_scale
    if max_scale is not None and max_scale <= 1.0:
      raise ValueError(f"config.clip.max_logit_scale={max_scale} must be > 1 (100 in CLIP) "
                       "or None for no clip")
    self.negative_options      # noqa: B018 -- checks config.negatives before compiling
    super().__post_init__()

  @property
  def negative_options(self):
    """``config.negatives``: ``multi_positive="captions"`` makes every pair of identical
    captions (same tokens) a positive, in both directions (CLIP) or with label +1 (SigLIP);
    CLIP also takes the debiased / hard / decoupled options."""
    return base.negative_options(self.config, reweight=self.loss_name == "clip",
                                 multi_positive=("captions",))

  def group_ids(self, batch):
    """``{"groups": caption ids}`` (``base.caption_ids`` of the tokens) for multi-positive."""
    if self.negative_options.multi_positive:
      return {"groups": base.caption_ids(batch["tokens"])}
    return {}

  @property
  def loss_name(self) -> str:
    return self.config.clip.loss

  @property
  def max_logit_scale(self) -> float | None:
    value = self.config.clip.max_logit_scale
    return None if value is None else float(value)

  def build_model(self) -> models.CLIP:
    data = self.config.data
    text_kwargs = dict(self.config.text.kwargs or {})
    if "vocab_size" not in text_kwargs:
      text_kwargs["vocab_size"] = pipeline.make_tokenizer(data).vocab_size
    text_kwargs.setdefault("context_length", int(data.context_length))
    text_kwargs.setdefault("eot_id", tok_lib.EOT_ID)  # our EOT is not the largest id
    clip_cfg = self.config.clip
    extra = {k: clip_cfg[k] for k in ("logit_scale_init", "logit_bias_init", "lock_image")
             if clip_cfg[k] is not None}
    return models.build_clip(
        self.config.model.name, image_kwargs=dict(self.config.model.kwargs or {}),
        text_kwargs=text_kwargs, embed_dim=int(clip_cfg.embed_dim),
        siglip=self.loss_name == "siglip", dtype=base.compute_dtype(self.config),
        remat=bool(self.config.remat), **extra)

  def example_inputs(self) -> tuple[jax.Array, ...]:
    (images,) = super().example_inputs()
    return images, jnp.zeros((2, int(self.config.data.context_length)), jnp.int32)

  def embed(self, params, state, batch, rng):
    """Both towers on ``batch["image"]`` [B, H, W, 3] float32 and ``batch["tokens"]`` [B, L]
    int32: ``({"zimg": [B, E], "ztxt": [B, E]}, {"batch_stats": new statistics})``."""
    out, batch_stats = base.apply_train(self.model, params, state.batch_stats, batch["image"],
                                        batch["tokens"], rng=rng)
    return {"zimg": out["zimg"], "ztxt": out["ztxt"]}, {"batch_stats": batch_stats}

  def loss_from_embeddings(self, params, embeddings, state):
    """The CLIP or SigLIP loss over the global batch, with the (clipped) scale and the bias
    read from ``params`` (the model's ``logit_scale``/``logit_bias`` outputs are these
    parameters cast to float32), and the logged metrics."""
    zimg, ztxt = embeddings["zimg"], embeddings["ztxt"]
    scale = clipped_logit_scale(params["logit_scale"], self.max_logit_scale)
    if self.loss_name == "siglip":
      bias = jnp.asarray(params["logit_bias"], jnp.float32)
      loss, aux = base.global_loss(self.config, "siglip", self.mesh, self.negative_options)(
          zimg, ztxt, scale, bias, groups=embeddings.get("groups"))
    else:
      loss, aux = base.global_loss(self.config, "clip", self.mesh, self.negative_options)(
          zimg, ztxt, scale, groups=embeddings.get("groups"))
    metrics = {"loss": loss, "contrastive_accuracy": aux["accuracy"], "logit_scale": scale,
               **base.embedding_summaries(zimg, ztxt)}
    if self.loss_name == "siglip":
      metrics["logit_bias"] = bias
    return loss, metrics

  def post_update(self, state: TrainState, updates: dict[str, Any]) -> TrainState:
    """Stores the BN statistics (ResNet towers) and clamps the log-scale into [0, log max]."""
    params = state.params
    if self.max_logit_scale is not None:
      params = dict(params)
      params["logit_scale"] = jnp.clip(params["logit_scale"], 0.0,
                                       math.log(self.max_logit_scale))
    return state.replace(params=params, batch_stats=updates["batch_stats"])

  # -- evaluation
  @staticmethod
  def features(module, images):
    """``encode``: the image tower's features (before the projection)."""
    return module.image_encoder(images, train=False)

  def encode_image(self, state: TrainState, images: jax.Array) -> jax.Array:
    """[B, H, W, 3] -> [B, E] float32 L2-normalised joint image embeddings."""
    return self.model.apply(self.variables(state), images, train=False,
                            method=models.CLIP.encode_image)

  def encode_text(self, state: TrainState, tokens: jax.Array) -> jax.Array:
    """[B, L] int32 -> [B, E] float32 L2-normalised joint text embeddings."""
    return self.model.apply(self.variables(state), tokens, train=False,
                            method=models.CLIP.encode_text)
