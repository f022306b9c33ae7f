"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
Representations"; v2: Chen et al. 2020, "Big Self-Supervised Models are Strong Semi-Supervised
Learners").

Both augmented views of the global batch go through one encoder and projection head in a single
forward pass (BN statistics over all 2N views of the global batch: sync BN under ``jit``; each
device's two views are joined where they are, ``base.join_views``), and
NT-Xent (``losses.nt_xent``) runs per shard with every other view of the global batch as a
negative. No momentum state: ``post_update`` only stores the new BN statistics.

``config.grad_cache.micro_batches = M > 1`` computes the same loss and gradient in M
micro-batches by gradient caching (``grad_cache.py``): exact without BN (e.g. a ViT encoder with
``config.head.use_bn = False``); with BN each micro-batch uses its own statistics.
"""

from __future__ import annotations

import jax.numpy as jnp

from contrastive_jax import models
from contrastive_jax.methods import base


class SimCLR(base.Method):
  """SimCLR on the common method surface (see ``methods/base.py``).

  ``config.negatives``: debiased (``debias_tau_plus``), hard-negative (``hard_beta``) and
  decoupled NT-Xent, or ``multi_positive="labels"``: supervised contrastive learning (Khosla et
  al. 2020, L_out) over the batch's ``label`` (-1: unknown, only the other view is positive).
  When the batch has labels, the same-class negative diagnostics are logged
  (``same_class_negative_fraction`` / ``_similarity``; all-gather loss or any option only: the
  tiled or plain ring skips them to keep its memory bound).
  """
  supports_grad_cache = True

  def __post_init__(self):
    self.negative_options      # noqa: B018 -- checks config.negatives before compiling
    super().__post_init__()

  @property
  def negative_options(self):
    return base.negative_options(self.config, reweight=True, multi_positive=("labels",))

  def group_ids(self, batch):
    """``{"groups": batch["label"]}`` when the options or the diagnostics use it."""
    options = self.negative_options
    wants = options.multi_positive or (
        self.config.negatives.diagnostics and (self.config.loss_impl == "all_gather"
                                               or not options.plain))
    return {"groups": batch["label"].astype(jnp.int32)} if wants and "label" in batch else {}

  def build_model(self) -> base.EncoderWithHeads:
    """Encoder + SimCLR head; ``config.head.use_bn=False`` gives the head of the same depth
    (v1: 2 layers, v2: 3) without BN, so that a BN-free encoder (ViT) makes the whole model
    free of batch coupling (GradCache is then exact)."""
    head_cfg = dict(self.config.head)
    version = head_cfg.pop("version")
    dtype = base.compute_dtype(self.config)
    if head_cfg.pop("use_bn"):
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

  def embed(self, params, state, batch, rng):
    """Both views (``batch["view1"]``, ``batch["view2"]``: [B, H, W, 3]) in one pass, joined
    without moving images between devices (``base.join_views``; BN statistics over all 2B
    views whatever their order): ``({"z1": [B, E], "z2": [B, E]}, {"batch_stats": ...})``."""
    x = base.join_views([batch["view1"], batch["view2"]], self.mesh)
    (_, z, _), batch_stats = base.apply_train(self.model, params, state.batch_stats, x, rng=rng)
    z1, z2 = base.split_views(z, 2, self.mesh)
    return {"z1": z1, "z2": z2}, {"batch_stats": batch_stats}

  def loss_from_embeddings(self, params, embeddings, state):
    """NT-Xent over the global batch and the logged metrics."""
    z1, z2 = embeddings["z1"], embeddings["z2"]
    options = self.negative_options
    if options.multi_positive and "groups" not in embeddings:
      raise ValueError("config.negatives.multi_positive='labels' needs batches with 'label'")
    loss, aux = base.global_loss(self.config, "nt_xent", self.mesh, options)(
        z1, z2, self.temperature, groups=embeddings.get("groups"))
    diagnostics = {k: v for k, v in aux.items() if k.startswith("same_class")}
    metrics = {"loss": loss, "contrastive_accuracy": aux["accuracy"], **diagnostics,
               "temperature": jnp.float32(self.temperature), **base.embedding_summaries(z1, z2)}
    return loss, metrics
