"""Evaluation by bag of features (docs/method.md section 6): the features (``features``), the linear probe and the
kNN on them (``probe``), and ``evaluate``, which runs both on a data set (``pipeline``)."""

from .features import extract_features
from .pipeline import evaluate
from .probe import LabelledFeatures, knn_classify, linear_probe

__all__ = ["LabelledFeatures", "evaluate", "extract_features", "knn_classify", "linear_probe"]
