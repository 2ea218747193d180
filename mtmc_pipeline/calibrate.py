"""Calibration: per-class precision-threshold tables, temperature scaling, ECE.

The MTMC practice: softmax confidence is not a precision. For each class c and each precision
level p, find on held-out data the lowest score threshold t such that "predict c when
score_c >= t" has precision >= p at t *and at every higher threshold*. A new image's score for
c then maps to the precision level it reaches, so two classes can both be confidently present
and a stored confidence means "this often right".

Levels that no threshold reaches are marked unreachable (threshold NaN), never invented.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar

from mtmc_pipeline.metrics import cross_entropy, softmax

TABLE_COLUMNS = ["class_name", "score_kind", "level", "threshold", "reachable", "support", "recall"]


def precision_thresholds(
    scores: np.ndarray, positive: np.ndarray, levels: list[float]
) -> pd.DataFrame:
    """For one class: threshold, support (n scored >= t) and recall at t, per level.

    ``scores`` are that class's scores over the calibration set, ``positive`` marks the
    samples whose true class it is.
    """
    order = np.argsort(-scores, kind="stable")
    s, pos = scores[order], positive[order].astype(np.int64)
    # candidate thresholds: each distinct score, taking every sample scored >= it
    last_of_value = np.r_[s[1:] != s[:-1], True]
    tp = np.cumsum(pos)[last_of_value]
    n = (np.arange(len(s)) + 1)[last_of_value]
    thresholds = s[last_of_value]
    precision = tp / n
    # precision guaranteed at t and every higher threshold: running minimum from the top
    guaranteed = np.minimum.accumulate(precision) if len(precision) else precision
    total_pos = max(int(pos.sum()), 1)
    rows = []
    for level in levels:
        ok = np.nonzero(guaranteed >= level - 1e-12)[0]
        if len(ok) == 0:
            rows.append((level, np.nan, False, 0, 0.0))
            continue
        i = ok[-1]  # the lowest threshold that still guarantees the level
        rows.append((level, float(thresholds[i]), True, int(n[i]), float(tp[i] / total_pos)))
    return pd.DataFrame(rows, columns=["level", "threshold", "reachable", "support", "recall"])


def threshold_table(
    logits: np.ndarray, labels: np.ndarray, class_names: list[str], levels: list[float]
) -> pd.DataFrame:
    """The calibration table for raw logits and for softmax probabilities."""
    probs = softmax(logits)
    parts = []
    for kind, scores in (("logit", logits), ("softmax", probs)):
        for c, name in enumerate(class_names):
            t = precision_thresholds(scores[:, c], labels == c, levels)
            t.insert(0, "score_kind", kind)
            t.insert(0, "class_name", name)
            parts.append(t)
    return pd.concat(parts, ignore_index=True)[TABLE_COLUMNS]


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T)."""
    if len(labels) == 0:
        return 1.0
    result = minimize_scalar(
        lambda log_t: cross_entropy(logits, labels, float(np.exp(log_t))),
        bounds=(np.log(0.05), np.log(20.0)),
        method="bounded",
    )
    best = float(np.exp(result.x))
    # never accept a temperature that is worse than leaving the logits alone
    return best if cross_entropy(logits, labels, best) <= cross_entropy(logits, labels) else 1.0


def calibration_errors(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict[str, float]:
    """ECE and MCE of top-1 confidence (equal-width bins), NLL and Brier score."""
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece, mce = 0.0, 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            gap = abs(correct[mask].mean() - conf[mask].mean())
            ece += mask.mean() * gap
            mce = max(mce, gap)
    onehot = np.eye(probs.shape[1])[labels]
    return {
        "ece": float(ece),
        "mce": float(mce),
        "nll": float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1)).mean()),
        "brier": float(((probs - onehot) ** 2).sum(1).mean()),
    }


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> pd.DataFrame:
    """Per confidence bin: mean confidence, accuracy and count (for the reliability diagram)."""
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    rows = []
    for b in range(bins):
        mask = which == b
        rows.append(
            {
                "lower": edges[b],
                "upper": edges[b + 1],
                "confidence": float(conf[mask].mean()) if mask.any() else np.nan,
                "accuracy": float(correct[mask].mean()) if mask.any() else np.nan,
                "count": int(mask.sum()),
            }
        )
    return pd.DataFrame(rows)


@dataclass
class Calibrator:
    """Maps a logit vector to calibrated confidences; serialisable as plain JSON."""

    class_names: list[str]
    temperature: float
    levels: list[float]
    thresholds: dict[str, list[list[float | None]]]  # score_kind -> [class][level]

    @classmethod
    def from_table(
        cls, table: pd.DataFrame, class_names: list[str], temperature: float
    ) -> Calibrator:
        levels = sorted(table["level"].unique().tolist())
        thresholds: dict[str, list[list[float | None]]] = {}
        for kind, part in table.groupby("score_kind"):
            per_class = []
            for name in class_names:
                rows = part[part["class_name"] == name].set_index("level")["threshold"]
                per_class.append([None if np.isnan(rows[lv]) else float(rows[lv]) for lv in levels])
            thresholds[str(kind)] = per_class
        return cls(list(class_names), float(temperature), levels, thresholds)

    def to_json(self) -> dict[str, Any]:
        return {
            "class_names": self.class_names,
            "temperature": self.temperature,
            "levels": self.levels,
            "thresholds": self.thresholds,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Calibrator:
        return cls(data["class_names"], data["temperature"], data["levels"], data["thresholds"])

    def precision_confidence(self, logits: np.ndarray, score_kind: str = "logit") -> np.ndarray:
        """Per sample and class, the precision level the score reaches (0 below the lowest).

        Between two reachable levels the confidence is interpolated linearly in the score.
        """
        scores = logits if score_kind == "logit" else softmax(logits)
        out = np.zeros(scores.shape, dtype=np.float64)
        levels = np.asarray(self.levels)
        for c, per_level in enumerate(self.thresholds[score_kind]):
            t = np.array([np.nan if v is None else v for v in per_level])
            ok = ~np.isnan(t)
            if not ok.any():
                continue
            lv, th = levels[ok], t[ok]
            s = scores[:, c]
            conf = np.interp(s, th, lv, left=0.0, right=lv[-1])
            conf[s < th[0]] = 0.0
            # equal thresholds for several levels: np.interp takes the last, which is right
            out[:, c] = conf
        return out

    def temperature_probs(self, logits: np.ndarray) -> np.ndarray:
        return softmax(logits, self.temperature)
