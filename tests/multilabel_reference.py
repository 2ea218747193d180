"""The multi-label figures as scikit-learn computes them: the independent reference."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    hamming_loss,
    precision_score,
    recall_score,
)


def sklearn_metrics(truth: np.ndarray, pred: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """CP ... OF1 (macro and micro averages), subset accuracy, Hamming loss and mAP."""
    kw = {"zero_division": 0}
    return {
        "CP": precision_score(truth, pred, average="macro", **kw),
        "CR": recall_score(truth, pred, average="macro", **kw),
        "CF1": f1_score(truth, pred, average="macro", **kw),
        "OP": precision_score(truth, pred, average="micro", **kw),
        "OR": recall_score(truth, pred, average="micro", **kw),
        "OF1": f1_score(truth, pred, average="micro", **kw),
        "subset_accuracy": accuracy_score(truth, pred),
        "hamming_loss": hamming_loss(truth, pred),
        "mAP": float(np.mean(per_class_ap(truth, logits))),
    }


def per_class_ap(truth: np.ndarray, logits: np.ndarray) -> list[float]:
    return [average_precision_score(truth[:, c], logits[:, c]) for c in range(truth.shape[1])]
