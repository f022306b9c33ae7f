"""Flax linen encoders, heads and the CLIP two-tower model, built by name from the registry.

All encoders: ``model.apply(variables, x, train=...) -> [B, F]``; BN models keep their running
statistics in the ``batch_stats`` collection (``mutable=["batch_stats"]`` when ``train=True``).
"""

from contrastive_jax.losses import l2_normalize
from contrastive_jax.models.clip import CLIP
from contrastive_jax.models.convnet import ConvNet
from contrastive_jax.models.heads import (
    ProjectionMLP,
    mocov2_head,
    mocov3_predictor,
    mocov3_projector,
    simclr_head,
)
from contrastive_jax.models.layers import (
    FROZEN_SUFFIX,
    BatchNorm,
    LayerNormF32,
    Transformer,
    TransformerBlock,
)
from contrastive_jax.models.registry import (
    CLIP_PRESETS,
    MODEL_NAMES,
    VIT_PRESETS,
    build_clip,
    build_clip_preset,
    build_model,
    feature_dim,
    model_class,
)
from contrastive_jax.models.resnet import ResNet
from contrastive_jax.models.text import TextTransformer
from contrastive_jax.models.vit import ViT, posemb_sincos_2d

__all__ = [
    "BatchNorm", "CLIP", "CLIP_PRESETS", "ConvNet", "FROZEN_SUFFIX", "LayerNormF32",
    "MODEL_NAMES", "ProjectionMLP", "ResNet", "TextTransformer", "Transformer",
    "TransformerBlock", "VIT_PRESETS", "ViT", "build_clip", "build_clip_preset", "build_model",
    "feature_dim", "l2_normalize", "mocov2_head", "mocov3_predictor", "mocov3_projector",
    "model_class", "posemb_sincos_2d", "simclr_head",
]
