"""Multi-label metrics, as mmpretrain's ``MultiLabelMetric`` and ``AveragePrecision`` define
them (fractions rather than percent), on an N x C logit matrix and its N x C indicator truth.

A class is predicted for an image when its logit reaches the class's threshold: 0 on the logit
is probability 0.5; calibrated thresholds come from the per-class precision table.

- CP, CR, CF1: per-class precision, recall and F1 averaged over classes (a class with no
  predicted or no true image scores 0; CF1 is the mean of per-class F1, as in mmpretrain and
  scikit-learn's ``average="macro"``); OP, OR, OF1: every (image, class) decision pooled.
- AP per class and their mean, mAP (classes without a positive have AP 0, as in mmpretrain),
  ranked by logit: the ranking of the sigmoid without its float saturation ties.
- subset accuracy (the whole label set right), Hamming loss (share of wrong decisions).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mtmc_pipeline.evaluation.metrics import one_vs_rest, per_class_average_precision


def predicted_sets(logits: np.ndarray, thresholds: np.ndarray | float = 0.0) -> np.ndarray:
    """N x C booleans: logit >= that class's threshold (NaN: the class is never predicted)."""
    th = np.asarray(thresholds, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return logits >= np.where(np.isnan(th), np.inf, th)


def bce_loss(logits: np.ndarray, truth: np.ndarray) -> float:
    """Mean over images of the summed per-class binary cross-entropy."""
    x, y = logits.astype(np.float64), truth.astype(np.float64)
    per = np.logaddexp(0, x) - y * x  # -y log s(x) - (1 - y) log(1 - s(x))
    return float(per.sum(1).mean()) if len(x) else 0.0


def multilabel_metrics(
    logits: np.ndarray, truth: np.ndarray, thresholds: np.ndarray | float = 0.0
) -> dict[str, float]:
    """CP ... OF1, subset accuracy, Hamming loss at ``thresholds``; mAP; per-class balanced
    accuracy; BCE. Keys ``accuracy`` (subset accuracy) and ``macro_f1`` (CF1) are what the
    single-label reports and the training monitor read."""
    truth = truth.astype(bool)
    pred = predicted_sets(logits, thresholds)
    out = one_vs_rest(pred.astype(np.float64), truth, 0.5)
    tpr = (pred & truth).sum(0) / np.maximum(truth.sum(0), 1)
    tnr = (~pred & ~truth).sum(0) / np.maximum((~truth).sum(0), 1)
    out |= {
        "subset_accuracy": float((pred == truth).all(1).mean()) if len(pred) else 0.0,
        "hamming_loss": float((pred != truth).mean()) if pred.size else 0.0,
        "mAP": float(per_class_average_precision(logits, truth).mean()),
        "balanced_accuracy": float(((tpr + tnr) / 2).mean()),
        "log_loss": bce_loss(logits, truth),
    }
    out["accuracy"], out["macro_f1"] = out["subset_accuracy"], out["CF1"]
    return out


def multilabel_per_class(
    logits: np.ndarray,
    truth: np.ndarray,
    names: list[str],
    thresholds: np.ndarray | float = 0.0,
) -> pd.DataFrame:
    """Per class: precision, recall, F1, AP, support (true images) and predicted images."""
    truth = truth.astype(bool)
    pred = predicted_sets(logits, thresholds)
    tp = (pred & truth).sum(0).astype(np.float64)
    n_pred, support = pred.sum(0), truth.sum(0)
    precision = np.divide(tp, n_pred, out=np.zeros_like(tp), where=n_pred > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return pd.DataFrame(
        {
            "class_name": names,
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "average_precision": per_class_average_precision(logits, truth),
            "support": support.astype(np.int64),
            "predicted": n_pred.astype(np.int64),
        }
    )


def co_occurrence(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """C x C counts: row i, column j = images with true label i for which j is predicted.

    The diagonal holds each class's true positives; off the diagonal are the classes predicted
    alongside (or instead of) a true one: the multi-label form of a confusion matrix.
    """
    return truth.astype(np.int64).T @ pred.astype(np.int64)
