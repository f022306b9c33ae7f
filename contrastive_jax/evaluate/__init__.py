"""Evaluators on frozen features: kNN monitor, linear and few-label probes, zero-shot
classification, image-text retrieval, and the alignment/uniformity embedding metrics.

Layer 1: these functions take arrays and functions (an ``encode_fn`` closing over parameters),
never a method or a train state. Accuracies and recalls are fractions in [0, 1]. The
orchestration (``evaluate/runner.py``: the evaluators a config declares, streamed per host, on a
method's encoders) is layer 3 and is not imported here.
"""

from contrastive_jax.evaluate.features import (
    extract_features, extract_features_from_iterator, map_row_chunks)
from contrastive_jax.evaluate.knn import knn_accuracy, knn_class_scores
from contrastive_jax.evaluate.linear_probe import (
    DEFAULT_L2_GRID, balanced_subset, few_label_probe, fit_logistic_regression, linear_probe,
    stratified_split)
from contrastive_jax.evaluate.retrieval import retrieval_recall
from contrastive_jax.evaluate.zero_shot import (
    class_text_embeddings, ensemble_class_embeddings, l2_normalize, top_k_hits,
    zero_shot_accuracy, zero_shot_hits)

__all__ = [
    "DEFAULT_L2_GRID", "balanced_subset", "class_text_embeddings",
    "ensemble_class_embeddings", "zero_shot_hits",
    "extract_features", "extract_features_from_iterator", "few_label_probe",
    "fit_logistic_regression", "knn_accuracy", "knn_class_scores", "l2_normalize", "linear_probe",
    "map_row_chunks", "retrieval_recall", "stratified_split", "top_k_hits",
    "zero_shot_accuracy",
]
