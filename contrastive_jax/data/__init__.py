"""Input pipelines (tf.data on the host CPU): augmentation recipes, sources, tokenizer.

The data settings (``config.data``) and their defaults are declared once, in
``contrastive_jax.configs.common.data_config``.

TensorFlow only feeds data here. It must never claim an accelerator that JAX needs, so GPUs
are hidden from it as soon as this package is imported (as in flax's examples/imagenet).
"""

from __future__ import annotations

import tensorflow as tf

try:
  tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # already initialised, or no GPU support compiled in
  pass

from contrastive_jax.data.augment import AugmentConfig, recipe_config  # noqa: E402
from contrastive_jax.data.pipeline import (  # noqa: E402
    DataIterator, class_prompts, eval_arrays, eval_iterator, train_iterator)
from contrastive_jax.data.tokenizer import ByteTokenizer, make_tokenizer  # noqa: E402

__all__ = [
    "AugmentConfig", "ByteTokenizer", "DataIterator", "class_prompts", "eval_arrays",
    "eval_iterator", "make_tokenizer", "recipe_config", "train_iterator",
]
