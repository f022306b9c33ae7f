"""Array metrics of embeddings, below the methods (layer 1: arrays in, numbers out).

``methods/`` logs them every step on the global batch (``methods.base.embedding_summaries``),
so they cannot live in ``evaluate/`` (layer 3, which imports the methods' encoders): a method
importing them from there would import upwards. Like ``losses/``, nothing here knows a method,
a train state or the trainer.

* ``embedding``: alignment and uniformity on the hypersphere (Wang & Isola 2020, Sec. 4.1).
"""

from contrastive_jax.metrics.embedding import alignment, uniformity

__all__ = ["alignment", "uniformity"]
