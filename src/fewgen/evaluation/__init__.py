"""Evaluation: the episode protocol, frozen-feature classifiers, generative metrics."""

from fewgen.evaluation.classifiers import (
    CLASSIFIERS,
    LogisticRegression,
    PrototypeClassifier,
    create_classifier,
)
from fewgen.evaluation.features import extract_features
from fewgen.evaluation.protocol import episode_accuracies, mean_ci95, summary_row

__all__ = [
    "CLASSIFIERS", "LogisticRegression", "PrototypeClassifier", "create_classifier", "episode_accuracies",
    "extract_features", "mean_ci95", "summary_row",
]
