"""Evaluation on frozen features: kNN monitor, linear and few-label probes, zero-shot
classification, image-text retrieval.

The names exported here are the array math (layer 1): functions of arrays and of an
``encode_fn`` closing over parameters, never a method or a train state; accuracies and recalls
are fractions in [0, 1]. The orchestration is layer 3 and is not imported here:
``evaluate/runner.py`` (the evaluators ``config.eval`` declares, scheduled in the loop and by
``python -m contrastive_jax.evaluate``), ``evaluate/evaluators/`` (one module per evaluator
type, found by its name) and ``evaluate/streaming.py`` (host-sharded encoding and gathering).
The embedding metrics the methods log every step (alignment, uniformity) are
``contrastive_jax.metrics``, below the methods.
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
