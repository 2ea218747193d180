"""Safe promotion: a retrained model replaces the served one only if it does not regress.

Both models are scored on the same, newest held-out images (the current manifest's test split,
or val when there is none). The candidate is promoted when its macro F1 is at most
``macro_f1_tolerance`` below the served model's and no class's recall drops by more than
``recall_tolerance``. A class the served model does not know counts as recall 0 for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score, recall_score


@dataclass
class Promotion:
    promoted: bool
    reason: str
    table: pd.DataFrame = field(default_factory=pd.DataFrame)  # per class recall, both models
    summary: dict[str, Any] = field(default_factory=dict)


def map_predictions(pred: np.ndarray, from_names: list[str], to_names: list[str]) -> np.ndarray:
    """Predicted class indices of one class list in another's (-1: a class it lacks)."""
    index = {name: i for i, name in enumerate(to_names)}
    lookup = np.array([index.get(n, -1) for n in from_names], dtype=np.int64)
    return lookup[np.asarray(pred, dtype=np.int64)]


def _scores(labels: np.ndarray, pred: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    classes = list(range(k))
    macro = f1_score(labels, pred, labels=classes, average="macro", zero_division=0)
    recall = recall_score(labels, pred, labels=classes, average=None, zero_division=0)
    return float(macro), np.asarray(recall, dtype=np.float64)


def compare(
    labels: np.ndarray,
    candidate_pred: np.ndarray,
    served_pred: np.ndarray,
    class_names: list[str],
    macro_f1_tolerance: float,
    recall_tolerance: float,
    images: str,
) -> Promotion:
    """Decide on the candidate; all predictions are indices into ``class_names``."""
    k = len(class_names)
    present = np.bincount(labels, minlength=k) > 0
    cand_f1, cand_recall = _scores(labels, candidate_pred, k)
    served_f1, served_recall = _scores(labels, served_pred, k)
    drop = served_recall - cand_recall
    table = pd.DataFrame(
        {
            "class_name": class_names,
            "support": np.bincount(labels, minlength=k),
            "served_recall": served_recall,
            "candidate_recall": cand_recall,
            "recall_drop": drop,
        }
    )
    problems = []
    if cand_f1 < served_f1 - macro_f1_tolerance:
        problems.append(
            f"macro F1 {cand_f1:.4f} < served {served_f1:.4f} - {macro_f1_tolerance} "
            "(promotion.macro_f1_tolerance)"
        )
    worse = [class_names[c] for c in np.nonzero(present & (drop > recall_tolerance))[0]]
    if worse:
        problems.append(
            f"recall drops by more than {recall_tolerance} (promotion.recall_tolerance) for "
            f"{', '.join(worse)}"
        )
    summary = {
        "images": images,
        "candidate_macro_f1": cand_f1,
        "served_macro_f1": served_f1,
        "max_recall_drop": float(drop[present].max()) if present.any() else 0.0,
        "classes_worse": worse,
    }
    if problems:
        return Promotion(False, f"on {images}: " + "; ".join(problems), table, summary)
    reason = f"on {images}: macro F1 {cand_f1:.4f} vs served {served_f1:.4f}, no recall regression"
    return Promotion(True, reason, table, summary)
