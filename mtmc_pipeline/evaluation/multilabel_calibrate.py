"""Calibration of multi-label tasks: the per-class precision-threshold table on the sigmoid
logit, and per-class Platt scaling of the sigmoid probability.

The table is the single-label one (:func:`precision_thresholds`), with "positive" meaning that
the image carries the class: each class's logit threshold of each precision level is fitted
on val and checked on test (:func:`realised_precision`), so a label predicted at level p is
right that often on images nothing was fitted on. Only ``score_kind = logit`` rows exist: the
sigmoid is monotone in the logit, so its thresholds would be the same levels.

Platt scaling (Platt 1999): per class, ``sigmoid(a * logit + b)`` with (a, b) fitted by NLL on
val; a fit that does not lower that class's NLL is not kept (a = 1, b = 0).
Multi-label ``temperature.json`` holds the Platt parameters, the errors of the pooled
(image, class) decisions before and after (:func:`decisions`), and ``at_levels``: the
multi-label metrics when each class is predicted at its threshold of a level, measured on test
(else val).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from mtmc_pipeline.config import CalibrationConfig
from mtmc_pipeline.data.multilabel_splits import indicator
from mtmc_pipeline.evaluation.calibrate import (
    CALIBRATOR_FILE,
    CHECK_SPLIT,
    FIT_SPLIT,
    REPORT_LEVELS,
    TABLE_COLUMNS,
    Calibration,
    Calibrator,
    calibration_errors,
    check_finite,
    error_table,
    precision_thresholds,
    realised_precision,
    reliability_bins,
)
from mtmc_pipeline.evaluation.metrics import sigmoid
from mtmc_pipeline.evaluation.multilabel_metrics import multilabel_metrics
from mtmc_pipeline.plots import reliability_png


def multilabel_table(
    logits: np.ndarray,
    truth: np.ndarray,
    names: list[str],
    levels: list[float],
    min_support: int,
    fit_confidence: float = 0.0,
) -> pd.DataFrame:
    """Per class and level: the logit threshold, as :func:`precision_thresholds` fits it
    (with ``fit_confidence``, the precision's lower confidence bound must reach the level)."""
    check_finite(logits, "calibration split")
    parts = []
    for c, name in enumerate(names):
        t = precision_thresholds(logits[:, c], truth[:, c], levels, min_support, fit_confidence)
        t.insert(0, "score_kind", "logit")
        t.insert(0, "class_name", name)
        parts.append(t)
    return pd.concat(parts, ignore_index=True)[TABLE_COLUMNS]


def fit_platt(logits: np.ndarray, positive: np.ndarray) -> tuple[float, float]:
    """(a, b) minimising the NLL of ``sigmoid(a * logit + b)``; (1, 0) when it does not help."""
    y = positive.astype(np.float64)
    if len(y) == 0 or y.min() == y.max():
        return 1.0, 0.0  # one-sided data: the fit would run to infinity

    def nll(ab: np.ndarray) -> float:
        z = ab[0] * logits + ab[1]
        return float((np.logaddexp(0, z) - y * z).mean())

    result = minimize(nll, np.array([1.0, 0.0]), method="L-BFGS-B")
    a, b = (float(v) for v in result.x)
    return (a, b) if result.success and nll(result.x) <= nll(np.array([1.0, 0.0])) else (1.0, 0.0)


def platt_probs(logits: np.ndarray, platt: list[list[float]]) -> np.ndarray:
    ab = np.asarray(platt, dtype=np.float64)
    return sigmoid(logits * ab[:, 0] + ab[:, 1])


@dataclass
class MultiLabelCalibrator(Calibrator):
    """The threshold table's calibrator (logit levels only) plus one Platt (a, b) per class;
    ``calibrator.json`` says ``kind: multilabel``."""

    platt: list[list[float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.platt) != len(self.class_names) or any(len(ab) != 2 for ab in self.platt):
            raise ValueError(f"platt must hold one (a, b) pair per class ({len(self.class_names)})")

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "kind": "multilabel", "platt": self.platt}

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = CALIBRATOR_FILE) -> MultiLabelCalibrator:
        base = Calibrator.from_json(data, source)
        try:
            return cls(**vars(base), platt=[[float(v) for v in ab] for ab in data["platt"]])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: not a valid calibrator ({type(e).__name__}: {e})") from e

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Per-class Platt-scaled probabilities."""
        return platt_probs(np.asarray(logits, dtype=np.float64), self.platt)


def decisions(p: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (image, class) pair as a two-way decision: [1 - p, p] and whether it is present,
    so the single-label reliability bins and errors apply (ECE on the decision's confidence,
    NLL of the true side; the Brier score counts both sides, twice the binary one)."""
    return np.stack([1 - p.ravel(), p.ravel()], axis=1), truth.ravel().astype(np.int64)


def _split(preds: pd.DataFrame, split: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    part = preds[preds["split"] == split]
    if part.empty:
        return np.zeros((0, k)), np.zeros((0, k), dtype=bool)
    return np.stack(part["logits"].to_numpy()).astype(np.float64), indicator(part["labels"], k)


def _errors(
    logits: np.ndarray, truth: np.ndarray, platt: list[list[float]]
) -> tuple[dict[str, Any], list[pd.DataFrame]]:
    errors: dict[str, Any] = {"n": len(truth)}
    bins = []
    for when, p in (("before", sigmoid(logits)), ("after", platt_probs(logits, platt))):
        probs, present = decisions(p, truth)
        bins.append(reliability_bins(probs, present))
        measured = calibration_errors(probs, present, reliability=bins[-1])
        errors |= {f"{k}_{when}": v for k, v in measured.items()}
    return errors, bins


def level_thresholds(table: pd.DataFrame, names: list[str], level: float) -> np.ndarray:
    """Each class's logit threshold of ``level`` (NaN where unreachable), in class order."""
    at = table[np.isclose(table["level"], level)].set_index("class_name")["threshold"]
    return at.reindex(names).to_numpy(dtype=np.float64)


def calibrate_multilabel(
    preds: pd.DataFrame,
    class_names: list[str],
    config: CalibrationConfig,
    model_fingerprint: str | None = None,
) -> Calibration:
    """Fit the per-class thresholds and Platt scaling on val; check both on test."""
    k = len(class_names)
    logits, truth = _split(preds, FIT_SPLIT, k)
    if len(truth) == 0:
        raise ValueError("predictions.parquet has no val images: calibration is fitted on val")
    table = multilabel_table(
        logits, truth, class_names, config.levels, config.min_support, config.fit_confidence
    )
    platt = [list(fit_platt(logits[:, c], truth[:, c])) for c in range(k)]
    errors, (before, after) = _errors(logits, truth, platt)
    summary: dict[str, Any] = {
        "kind": "multilabel",
        "temperature": None,  # one Platt (a, b) per class instead
        "platt": dict(zip(class_names, platt, strict=True)),
        "split": FIT_SPLIT,
        **errors,
    }
    realised = None
    test_logits, test_truth = _split(preds, CHECK_SPLIT, k)
    check_logits, check_truth, check_split = logits, truth, FIT_SPLIT
    if len(test_truth):
        realised = realised_precision(table, test_logits, test_truth, class_names, config.tolerance)
        summary[CHECK_SPLIT], _ = _errors(test_logits, test_truth, platt)
        check_logits, check_truth, check_split = test_logits, test_truth, CHECK_SPLIT
    shown = [lv for lv in config.levels if np.isclose(lv, REPORT_LEVELS).any()]
    summary["at_levels"] = {
        "split": check_split,
        **{
            f"{lv:g}": multilabel_metrics(
                check_logits, check_truth, level_thresholds(table, class_names, lv)
            )
            for lv in shown
        },
    }
    names = ("sigmoid", "Platt scaling (per class)", "confidence of each (image, class) decision")
    png = reliability_png(before, after, 1.0, names)
    base = Calibrator.from_table(table, class_names, 1.0, model_fingerprint)
    calibrator = MultiLabelCalibrator(**vars(base), platt=platt)
    report = report_markdown(table, summary, realised, config.tolerance)
    return Calibration(table, summary, calibrator, realised, png, report)


def report_markdown(
    table: pd.DataFrame, summary: dict[str, Any], realised: pd.DataFrame | None, tolerance: float
) -> str:
    """Errors before/after Platt, metrics at calibrated levels, thresholds, realised precision."""
    lines = [f"## Multi-label calibration on `{summary['split']}` ({summary['n']} images)", ""]
    lines += ["Per-class Platt scaling fitted by NLL on val; errors over (image, class) pairs.", ""]
    lines += error_table(summary)
    at = summary["at_levels"]
    keys = ("CP", "CR", "CF1", "OP", "OR", "OF1", "subset_accuracy", "hamming_loss")
    lines += ["", f"### Metrics at the calibrated thresholds (`{at['split']}`)", ""]
    lines += ["| level | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for level, m in at.items():
        if level != "split":
            lines.append(f"| {level} | " + " | ".join(f"{m[key]:.4f}" for key in keys) + " |")
    lines += ["", "### Logit thresholds (recall, support on val)", ""]
    shown = [lv for lv in sorted(table["level"].unique()) if np.isclose(lv, REPORT_LEVELS).any()]
    lines += ["| class | " + " | ".join(f"p ≥ {lv:g}" for lv in shown) + " |"]
    lines += ["|---|" + "---|" * len(shown)]
    for name, part in table.groupby("class_name", sort=False):
        part = part.set_index("level")
        cells = [
            f"{r.threshold:.2f} ({r.recall:.2f}, {r.support})" if r.reachable else "—"
            for r in (part.loc[lv] for lv in shown)
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if realised is not None:
        checked = realised[realised["n"] > 0]
        flagged = checked[checked["flagged"]]
        lines += ["", "### Realised precision on `test`", ""]
        lines += [
            f"{len(checked)} (class, level) thresholds select test images; {len(flagged)} fall "
            f"more than {tolerance} below their level."
        ]
    lines += ["", "![reliability diagram](reliability.png)", ""]
    return "\n".join(lines)
