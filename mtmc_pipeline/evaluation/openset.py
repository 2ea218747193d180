"""Open-set rejection: an "unknown" score for images of no known class, and its threshold.

A softmax probability says which known class an image resembles most, not whether it belongs
to any: images of unseen kinds often get 0.95+ probabilities. The scores here use the logits'
magnitude instead (Hendrycks et al. 2022 "max logit"; Liu et al. 2020 "energy"), or distance to
the training images in feature space (Sun et al. 2022, kNN). Higher means "more likely unknown".
The threshold is fitted on held-out images of known classes at a chosen false-reject rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy.special import logsumexp
from sklearn.metrics import roc_auc_score

UnknownScore = Literal["energy", "max_logit"]
OPENSET_FILE = "openset.json"


def unknown_scores(logits: np.ndarray, kind: str) -> np.ndarray:
    """Per image, how unlike every known class it is (higher: more likely unknown).

    ``energy``: -logsumexp(logits); ``max_logit``: -max(logits).
    """
    z = np.asarray(logits, dtype=np.float64)
    if kind == "energy":
        return -logsumexp(z, axis=1)
    if kind == "max_logit":
        return -z.max(axis=1)
    raise ValueError(f"unknown score kind {kind!r}: use energy or max_logit")


def knn_scores(bank: np.ndarray, features: np.ndarray, k: int = 5) -> np.ndarray:
    """Distance to the k-th nearest training feature, after L2 normalisation (higher: unknown)."""

    def unit(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    sims = unit(features) @ unit(bank).T
    k = min(k, sims.shape[1])
    kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1]
    return 1.0 - kth


def auroc(known_scores: np.ndarray, unknown: np.ndarray) -> float:
    """Area under the ROC curve of telling unknown images (positives) from known ones."""
    y = np.r_[np.zeros(len(known_scores)), np.ones(len(unknown))]
    return float(roc_auc_score(y, np.r_[known_scores, unknown]))


def threshold_at(known_scores: np.ndarray, false_reject_rate: float) -> float:
    """The score above which at most ``false_reject_rate`` of the known images lie."""
    if len(known_scores) == 0:
        raise ValueError("no held-out images of known classes to fit the unknown threshold on")
    return float(np.quantile(np.asarray(known_scores, dtype=np.float64), 1 - false_reject_rate))


@dataclass(frozen=True)
class OpenSet:
    """A fitted rejector: ``score > threshold`` flags an image as unknown."""

    kind: str
    threshold: float
    false_reject_rate: float
    fitted_on: str  # which images the threshold came from, e.g. "val (120 images)"

    @classmethod
    def fit(
        cls, known_logits: np.ndarray, kind: str, false_reject_rate: float, fitted_on: str
    ) -> OpenSet:
        scores = unknown_scores(known_logits, kind)
        return cls(kind, threshold_at(scores, false_reject_rate), false_reject_rate, fitted_on)

    @classmethod
    def from_predictions(
        cls, predictions: pd.DataFrame, kind: str, false_reject_rate: float, source: str
    ) -> OpenSet:
        """Fitted on the val rows of an evaluation's ``predictions.parquet`` (at ``source``)."""
        val = predictions[predictions["split"] == "val"]
        if val.empty:
            raise ValueError(f"{source}: no val images to fit the unknown threshold on")
        logits = np.stack(val["logits"].to_numpy())
        fitted_on = f"val ({len(val)} images of known classes)"
        return cls.fit(logits, kind, false_reject_rate, fitted_on)

    def scores(self, logits: np.ndarray) -> np.ndarray:
        return unknown_scores(logits, self.kind)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "threshold": self.threshold,
            "false_reject_rate": self.false_reject_rate,
            "fitted_on": self.fitted_on,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = OPENSET_FILE) -> OpenSet:
        try:
            out = cls(
                str(data["kind"]),
                float(data["threshold"]),
                float(data["false_reject_rate"]),
                str(data.get("fitted_on", "")),
            )
            unknown_scores(np.zeros((1, 1)), out.kind)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: not a valid open-set rejector ({e})") from e
        return out
