"""Classification metrics from one confusion matrix, and one-vs-rest metrics from scores.

Everything is computed with ``labels = range(num_classes)`` so a class that is absent from a
split or never predicted still has its row (with zeros, never NaN).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts, rows = true class, columns = predicted class."""
    idx = y_true.astype(np.int64) * num_classes + y_pred.astype(np.int64)
    return np.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b > 0)


def per_class(cm: np.ndarray) -> pd.DataFrame:
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(1).astype(np.float64)
    predicted = cm.sum(0).astype(np.float64)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    return pd.DataFrame(
        {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": support.astype(np.int64),
            "predicted": predicted.astype(np.int64),
        }
    )


def summary_metrics(cm: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro/micro/weighted precision, recall and F1."""
    pc = per_class(cm)
    n = cm.sum()
    support = pc["support"].to_numpy(dtype=np.float64)
    present = support > 0
    out: dict[str, float] = {
        "accuracy": float(np.trace(cm) / n) if n else 0.0,
        "balanced_accuracy": float(pc["recall"][present].mean()) if present.any() else 0.0,
    }
    for name in ("precision", "recall", "f1"):
        values = pc[name].to_numpy()
        out[f"macro_{name}"] = float(values.mean())
        out[f"weighted_{name}"] = float((values * support).sum() / n) if n else 0.0
    # single-label: micro precision = micro recall = micro F1 = accuracy
    for name in ("precision", "recall", "f1"):
        out[f"micro_{name}"] = out["accuracy"]
    return out


def top_k_accuracy(y_true: np.ndarray, scores: np.ndarray, k: int) -> float:
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((top == y_true[:, None]).any(1).mean()) if len(y_true) else 0.0


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def cross_entropy(logits: np.ndarray, y_true: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true class."""
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y_true)), y_true].mean())
