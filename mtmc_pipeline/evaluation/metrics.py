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


def row_fractions(cm: np.ndarray) -> np.ndarray:
    """Each row of a confusion matrix as fractions of its true class (0 for an empty row)."""
    return _safe_div(cm, cm.sum(1, keepdims=True))


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


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Boolean N x C indicator matrix of single labels (the multi-label form of a target)."""
    return np.arange(num_classes)[None, :] == np.asarray(labels).reshape(-1, 1)


def one_vs_rest(scores: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """CP, CR, CF1, OP, OR, OF1 with "class c present when score_c >= threshold".

    As mmpretrain's ``MultiLabelMetric`` defines them, as fractions rather than percent:
    C averages per-class precision, recall and F1 over all classes (a class with no predicted
    or no true sample scores 0), O pools every (sample, class) decision into one count.
    ``truth`` is the N x C indicator matrix (:func:`one_hot` for single labels). Several
    classes, or none, may be present for one image: that is what a per-class threshold means.
    """
    predicted = scores >= threshold
    truth = truth.astype(bool)
    tp = (predicted & truth).sum(0).astype(np.float64)
    n_pred = predicted.sum(0).astype(np.float64)
    n_true = truth.sum(0).astype(np.float64)
    precision = _safe_div(tp, n_pred)
    recall = _safe_div(tp, n_true)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    op = float(tp.sum() / n_pred.sum()) if n_pred.sum() else 0.0
    orr = float(tp.sum() / n_true.sum()) if n_true.sum() else 0.0
    return {
        "CP": float(precision.mean()),
        "CR": float(recall.mean()),
        "CF1": float(f1.mean()),
        "OP": op,
        "OR": orr,
        "OF1": 2 * op * orr / (op + orr) if op + orr else 0.0,
    }


def last_of_runs(values: np.ndarray) -> np.ndarray:
    """Mask keeping the last of each run of equal neighbours (of sorted values: each distinct
    value once, at its last position)."""
    return np.r_[values[1:] != values[:-1], True] if len(values) else np.zeros(0, dtype=bool)


def ranked_counts(
    scores: np.ndarray, positive: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each distinct score t from high to low, with the positives and the samples scored >= t.

    Samples with equal scores share one threshold: a threshold cannot split a tie.
    """
    order = np.argsort(-scores, kind="stable")
    s, pos = scores[order], positive[order].astype(np.int64)
    last = last_of_runs(s)
    return s[last], np.cumsum(pos)[last], (np.arange(len(s)) + 1)[last]


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the step precision-recall curve: sum over thresholds of (R_n - R_n-1) P_n.

    Tied samples share one threshold, so the result does not depend on how ties are ordered
    (mmpretrain ranks tied samples in sort order; both agree without ties, and scikit-learn's
    ``average_precision_score`` agrees in every case). A class with no positive sample has
    AP 0, as in both references.
    """
    n_pos = int(positive.sum())
    if n_pos == 0:
        return 0.0
    _, tp, n = ranked_counts(scores, positive)
    recall_gain = np.diff(np.r_[0, tp]) / n_pos
    return float((recall_gain * tp / n).sum())


def per_class_average_precision(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """AP of every class (column of ``scores``) against its column of the indicator ``truth``;
    their mean is mmpretrain's mAP."""
    return np.array([average_precision(scores[:, c], truth[:, c]) for c in range(scores.shape[1])])


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * logits))  # overflow-free for any logit


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """log softmax(logits / T), exact where the probability itself would underflow to 0."""
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def cross_entropy(logits: np.ndarray, y_true: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true class."""
    logp = log_softmax(logits, temperature)
    return float(-logp[np.arange(len(y_true)), y_true].mean())
