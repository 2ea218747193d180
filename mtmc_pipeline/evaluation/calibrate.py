"""Calibration: per-class precision-threshold tables, temperature scaling, ECE.

The MTMC practice: softmax confidence is not a precision. For each class c and each precision
level p, find on held-out data the lowest score threshold t such that "predict c when
score_c >= t" has precision >= p at t *and at every higher threshold*. A new image's score for
c then maps to the precision level it reaches, so two classes can both be confidently present
and a stored confidence means "this often right".

Levels that no threshold reaches are marked unreachable (threshold NaN), never invented.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import pairwise
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from scipy.stats import beta

from mtmc_pipeline.config import CalibrationConfig
from mtmc_pipeline.evaluation.metrics import (
    cross_entropy,
    last_of_runs,
    one_hot,
    ranked_counts,
    softmax,
)
from mtmc_pipeline.plots import reliability_png

TABLE_COLUMNS = [
    "class_name",
    "score_kind",
    "level",
    "threshold",
    "reachable",
    "support",
    "recall",
    "precision",
    "precision_lower",
]
SCORE_KINDS = ("logit", "softmax")
CALIBRATOR_FILE = "calibrator.json"
_EPS = 1e-12


def check_finite(logits: np.ndarray, where: str, names: Sequence[str] | None = None) -> None:
    """Refuse NaN or infinite logits (a diverged model): no threshold can be read from them.

    ``names`` (one per row, e.g. relpaths) lets the message name the first such image.
    """
    bad = ~np.isfinite(logits).all(axis=1)
    if bad.any():
        first = int(np.argmax(bad))
        which = f"`{names[first]}`" if names is not None else f"row {first}"
        raise ValueError(
            f"{where}: {int(bad.sum())} of {len(logits)} images have non-finite logits (first: "
            f"{which}); the model diverged: retrain it with a lower train.lr or in fp32"
        )


def precision_lower_bound(hits: np.ndarray, n: np.ndarray, confidence: float = 0.95) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound of a precision of ``hits`` out of ``n``.

    Shown beside each threshold: a level reached by 3 images of 3 is a far weaker promise than
    one reached by 300 of 306, and the bound says so.
    """
    hits, n = np.asarray(hits, dtype=np.float64), np.asarray(n, dtype=np.float64)
    out = np.zeros_like(hits)
    ok = hits > 0
    out[ok] = beta.ppf(1 - confidence, hits[ok], n[ok] - hits[ok] + 1)
    return out


def precision_upper_bound(hits: np.ndarray, n: np.ndarray, confidence: float = 0.95) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound of a precision of ``hits`` out of ``n`` (1 when
    ``hits == n``; NaN when ``n == 0``)."""
    hits, n = np.asarray(hits, dtype=np.float64), np.asarray(n, dtype=np.float64)
    out = np.ones_like(hits)
    out[n == 0] = np.nan
    ok = (hits < n) & (n > 0)
    out[ok] = beta.ppf(confidence, hits[ok] + 1, n[ok] - hits[ok])
    return out


def precision_thresholds(
    scores: np.ndarray,
    positive: np.ndarray,
    levels: list[float],
    min_support: int = 1,
    fit_confidence: float = 0.0,
) -> pd.DataFrame:
    """For one class: the threshold of each precision level, and what it keeps on this data.

    ``scores`` are that class's scores over the calibration set, ``positive`` marks the
    samples whose true class it is. Candidate thresholds are the distinct scores (tied samples
    are kept or dropped together) that keep at least ``min_support`` samples, so no level rests
    on a couple of images (with 1, one negative scored above every positive would make the
    class unreachable at any level). With ``fit_confidence`` c > 0, what must reach a level is
    the one-sided Clopper-Pearson lower bound of confidence c of the precision, not tp / n
    itself: a precision found on few images, or picked as the lowest threshold that reaches
    a level, would otherwise promise more than new images give.

    Level L's threshold is the lowest t at which that precision reaches L at t and at every
    higher threshold that keeps enough samples to show L: ``min_support``, and with c > 0
    also the n whose all-positive bound reaches L, ln(1 - c) / ln(L) (22 at 0.9, 114 at
    0.98). Without that second floor the top ``min_support`` samples would cap every level at
    what so few can prove (0.79 for 10 at c = 0.9). A threshold that qualifies for a higher
    level qualifies for every lower one too, so thresholds rise with the level.
    Columns: level, threshold (NaN when unreachable), reachable, support (samples scored
    >= t), recall, precision and its 95% lower bound at t.
    """
    thresholds, tp, n = ranked_counts(scores, positive)
    precision = tp / n
    lv = np.asarray(levels, dtype=np.float64)
    floor = np.full(len(lv), float(min_support))
    if fit_confidence > 0:
        precision = precision_lower_bound(tp, n, fit_confidence)
        with np.errstate(divide="ignore"):
            floor = np.maximum(floor, np.log(1 - fit_confidence) / np.log(np.clip(lv, _EPS, 1)))
    # per level (rows), thresholds from high to low (columns): the precision guaranteed at t
    # and above, a running minimum over the thresholds that keep at least that level's floor
    counted = n[None, :] >= floor[:, None] - _EPS
    guaranteed = np.minimum.accumulate(np.where(counted, precision[None, :], np.inf), axis=1)
    meets = counted & (guaranteed >= lv[:, None] - _EPS)
    order = np.argsort(-lv, kind="stable")  # what a higher level accepts, a lower one does too
    meets[order] = np.logical_or.accumulate(meets[order], axis=0)
    reachable = meets.any(axis=1)
    lowest = len(n) - 1 - np.argmax(meets[:, ::-1], axis=1) if len(n) else 0
    j = np.where(reachable, lowest, 0)
    n_pos = int(positive.sum())

    def at(values: np.ndarray, empty: float) -> np.ndarray:
        picked = values[j].astype(np.float64) if len(values) else np.zeros(len(lv))
        return np.where(reachable, picked, empty)

    support = at(n, 0).astype(np.int64)
    hits = at(tp, 0)
    return pd.DataFrame(
        {
            "level": lv,
            "threshold": at(thresholds, np.nan),
            "reachable": reachable,
            "support": support,
            "recall": hits / n_pos if n_pos else np.zeros(len(lv)),
            "precision": np.divide(hits, support, out=np.full(len(lv), np.nan), where=support > 0),
            "precision_lower": precision_lower_bound(hits, support),
        }
    )


def class_scores(logits: np.ndarray, kind: str) -> np.ndarray:
    """The per-class scores a threshold applies to: raw logits or softmax probabilities."""
    if kind == "logit":
        return logits
    if kind == "softmax":
        return softmax(logits)
    raise ValueError(f"unknown score kind {kind!r}: use one of {', '.join(SCORE_KINDS)}")


def threshold_table(
    logits: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    levels: list[float],
    min_support: int = 1,
    fit_confidence: float = 0.0,
) -> pd.DataFrame:
    """The calibration table for raw logits and for softmax probabilities."""
    check_finite(logits, "calibration split")
    parts = []
    for kind in SCORE_KINDS:
        scores = class_scores(logits, kind)
        for c, name in enumerate(class_names):
            t = precision_thresholds(scores[:, c], labels == c, levels, min_support, fit_confidence)
            t.insert(0, "score_kind", kind)
            t.insert(0, "class_name", name)
            parts.append(t)
    return pd.concat(parts, ignore_index=True)[TABLE_COLUMNS]


def realised_precision(
    table: pd.DataFrame,
    logits: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    tolerance: float,
) -> pd.DataFrame:
    """Precision each reachable threshold actually reaches on other held-out data (test).

    ``labels``: class indices, or the N x C indicator matrix of a multi-label task.

    ``n`` counts the images scored >= t (precision is NaN when there are none). ``allowed`` is
    how far the precision may fall short of its level: ``tolerance``, or the one-sided 95%
    Clopper-Pearson slack of ``n`` images (upper bound minus precision) when that is larger,
    since on a few images a short fall within it is sampling noise. ``flagged`` marks rows
    that fall short by more.
    """
    check_finite(logits, "test split")
    column = {name: c for c, name in enumerate(class_names)}
    parts = []
    for kind in SCORE_KINDS:
        scores = class_scores(logits, kind)
        mask = (table["score_kind"] == kind) & table["reachable"]
        part = table.loc[mask, ["class_name", "score_kind", "level", "threshold"]]
        part = part.reset_index(drop=True)
        th = part["threshold"].to_numpy()
        n, hits = np.zeros(len(part), dtype=np.int64), np.zeros(len(part), dtype=np.int64)
        for name, rows in part.groupby("class_name", sort=False).indices.items():
            c = column[name]
            kept = scores[:, c, None] >= th[None, rows]  # images x this class's levels
            n[rows], hits[rows] = kept.sum(0), kept[_positives(labels, c)].sum(0)
        part["n"] = n
        part["precision"] = np.divide(hits, n, out=np.full(len(n), np.nan), where=n > 0)
        slack = precision_upper_bound(hits, n) - part["precision"].to_numpy()
        part["allowed"] = np.maximum(tolerance, np.nan_to_num(slack))
        parts.append(part)
    out = pd.concat(parts, ignore_index=True)
    short = out["level"] - out["precision"]
    out["flagged"] = (out["n"] > 0) & (short > out["allowed"] + _EPS)
    return out


def _positives(labels: np.ndarray, c: int) -> np.ndarray:
    """Images of class c: ``labels`` are class indices (N,) or a multi-label indicator (N, C)."""
    return labels[:, c].astype(bool) if labels.ndim == 2 else labels == c


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T), within [0.05, 20].

    The NLL is convex in 1/T, so it has one minimum along log T and a bounded scalar search
    finds it. A temperature that does not lower the NLL is never returned: then T = 1.
    """
    if len(labels) == 0:
        return 1.0
    result = minimize_scalar(
        lambda log_t: cross_entropy(logits, labels, float(np.exp(log_t))),
        bounds=(np.log(0.05), np.log(20.0)),
        method="bounded",
    )
    best = float(np.exp(result.x))
    return best if cross_entropy(logits, labels, best) <= cross_entropy(logits, labels) else 1.0


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> pd.DataFrame:
    """Per equal-width bin of top-1 confidence: mean confidence, accuracy and count."""
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(which, conf, minlength=bins) / count
        accuracy = np.bincount(which, correct, minlength=bins) / count
    return pd.DataFrame(
        {
            "lower": edges[:-1],
            "upper": edges[1:],
            "confidence": confidence,
            "accuracy": accuracy,
            "count": count,
        }
    )


def calibration_errors(
    logits: np.ndarray,
    labels: np.ndarray,
    temperature: float = 1.0,
    bins: int = 15,
    reliability: pd.DataFrame | None = None,
) -> dict[str, float]:
    """ECE and MCE of top-1 confidence (equal-width bins), NLL and Brier of softmax(logits / T).

    The NLL comes from the log-softmax of the logits, as in the temperature fit: a clip of the
    probabilities would cap each very wrong image's term and understate it.
    ``reliability``: the :func:`reliability_bins` of these probabilities, when the caller
    already has them (for the reliability diagram); ``bins`` is then not used.
    """
    probs = softmax(logits, temperature)
    table = reliability_bins(probs, labels, bins) if reliability is None else reliability
    used = table[table["count"] > 0]
    gap = (used["accuracy"] - used["confidence"]).abs()
    n = max(len(labels), 1)
    return {
        "ece": float((gap * used["count"]).sum() / n),
        "mce": float(gap.max()) if len(gap) else 0.0,
        "nll": cross_entropy(logits, labels, temperature) if len(labels) else 0.0,
        "brier": float(((probs - one_hot(labels, probs.shape[1])) ** 2).sum(1).mean()),
    }


def step_curve(
    thresholds: Sequence[float | None], values: Sequence[float | None]
) -> tuple[np.ndarray, np.ndarray]:
    """(strictly increasing thresholds, the highest value of any row at or below each) of one
    class, for :func:`step_value`. Rows without a threshold (unreachable levels) are dropped.

    A score reaches the value of every row whose threshold it reaches, so "value(score) >= v"
    holds exactly when the score reaches the threshold of some row of value >= v: no ramp
    between thresholds, which would promise a level before its threshold is reached.
    """
    t = np.array([np.nan if v is None else v for v in thresholds], dtype=np.float64)
    v = np.array([np.nan if x is None else x for x in values], dtype=np.float64)
    ok = ~np.isnan(t) & ~np.isnan(v)
    order = np.argsort(t[ok], kind="stable")
    th, best = t[ok][order], np.maximum.accumulate(v[ok][order])
    last = last_of_runs(th)
    return th[last], best[last]


def step_value(scores: np.ndarray, th: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The :func:`step_curve` value each score reaches (0 below the lowest threshold)."""
    i = np.searchsorted(th, scores, side="right") - 1
    return np.where(i >= 0, values[np.maximum(i, 0)], 0.0) if len(th) else np.zeros(len(scores))


@dataclass
class Calibrator:
    """Maps a logit vector to calibrated confidences; stored as plain JSON (``calibrator.json``).

    ``thresholds[kind][c][i]`` is the threshold of ``levels[i]`` for class ``c`` on scores of
    ``kind`` (``logit`` or ``softmax``), None when unreachable; ``precision_lower`` has the
    same shape: the 95% lower bound of the precision each threshold keeps on the images it was
    fitted on. ``model_fingerprint`` ties it to the model it was fitted for.
    """

    class_names: list[str]
    temperature: float
    levels: list[float]
    thresholds: dict[str, list[list[float | None]]]
    model_fingerprint: str | None = None
    precision_lower: dict[str, list[list[float | None]]] | None = None

    def __post_init__(self) -> None:
        k, n_levels = len(self.class_names), len(self.levels)
        if list(self.levels) != sorted(self.levels):
            raise ValueError("levels must be increasing")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        for kind, per_class in self.thresholds.items():
            if kind not in SCORE_KINDS:
                raise ValueError(f"unknown score kind {kind!r}")
            if len(per_class) != k or any(len(row) != n_levels for row in per_class):
                raise ValueError(f"{kind} thresholds must be {k} classes x {n_levels} levels")
            for name, row in zip(self.class_names, per_class, strict=True):
                t = [v for v in row if v is not None]
                if any(b < a for a, b in pairwise(t)):
                    raise ValueError(f"{kind} thresholds of {name!r} decrease as the level rises")
        if self.precision_lower is not None:

            def shape(grid: dict[str, list[list[float | None]]]) -> dict[str, list[int]]:
                return {kind: [len(row) for row in rows] for kind, rows in grid.items()}

            if shape(self.precision_lower) != shape(self.thresholds):
                raise ValueError("precision_lower must have the shape of thresholds")

    @classmethod
    def from_table(
        cls,
        table: pd.DataFrame,
        class_names: list[str],
        temperature: float,
        model_fingerprint: str | None = None,
    ) -> Calibrator:
        levels = sorted(float(v) for v in table["level"].unique())

        def grid(column: str) -> dict[str, list[list[float | None]]]:
            out = {}
            for kind, part in table.groupby("score_kind"):
                per_class = []
                for name in class_names:
                    rows = part[part["class_name"] == name].set_index("level")
                    t, v = rows["threshold"], rows[column]
                    per_class.append([None if np.isnan(t[lv]) else float(v[lv]) for lv in levels])
                out[str(kind)] = per_class
            return out

        return cls(
            list(class_names),
            float(temperature),
            levels,
            grid("threshold"),
            model_fingerprint,
            grid("precision_lower"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "class_names": self.class_names,
            "temperature": self.temperature,
            "levels": self.levels,
            "thresholds": self.thresholds,
            "model_fingerprint": self.model_fingerprint,
            "precision_lower": self.precision_lower,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = CALIBRATOR_FILE) -> Calibrator:
        """Rebuild from :meth:`to_json` output; a malformed file is named in the error."""
        try:
            return cls(
                list(data["class_names"]),
                float(data["temperature"]),
                [float(v) for v in data["levels"]],
                data["thresholds"],
                data.get("model_fingerprint"),
                data.get("precision_lower"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: not a valid calibrator ({type(e).__name__}: {e})") from e

    @cached_property
    def _curves(self) -> dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]]:
        """:func:`step_curve` of every class, per (score kind, level or lower bound): built on
        first use, not per predicted batch (a Calibrator is never changed once built)."""
        curves = {}
        for kind, per_class in self.thresholds.items():
            curves[kind, "level"] = [step_curve(row, self.levels) for row in per_class]
            if self.precision_lower is not None:
                lower = self.precision_lower[kind]
                curves[kind, "lower"] = [
                    step_curve(row, bounds) for row, bounds in zip(per_class, lower, strict=True)
                ]
        return curves

    def _step(self, logits: np.ndarray, score_kind: str, value: str) -> np.ndarray:
        scores = class_scores(np.asarray(logits, dtype=np.float64), score_kind)
        out = np.zeros(scores.shape, dtype=np.float64)
        for c, (th, values) in enumerate(self._curves[score_kind, value]):
            out[:, c] = step_value(scores[:, c], th, values)
        return out

    def precision_confidence(self, logits: np.ndarray, score_kind: str = "logit") -> np.ndarray:
        """Per sample and class, the highest precision level whose threshold the score reaches
        (0 below the lowest reachable threshold): "confidence >= p" selects exactly the samples
        that "score >= threshold of p" selects."""
        return self._step(logits, score_kind, "level")

    def lower_bound_confidence(self, logits: np.ndarray, score_kind: str = "logit") -> np.ndarray:
        """Per sample and class, the highest ``precision_lower`` of a threshold the score
        reaches: "this >= p" asks for a 95% lower bound of p rather than a point estimate."""
        if self.precision_lower is None:
            raise ValueError(
                "this calibrator.json has no precision_lower: rerun the task's calibration"
            )
        return self._step(logits, score_kind, "lower")

    def temperature_probs(self, logits: np.ndarray) -> np.ndarray:
        return softmax(np.asarray(logits, dtype=np.float64), self.temperature)


REPORT_LEVELS = (0.5, 0.8, 0.9, 0.95)
FIT_SPLIT = "val"
CHECK_SPLIT = "test"
RELIABILITY_PNG = "reliability.png"


@dataclass
class Calibration:
    table: pd.DataFrame
    temperature: dict[str, Any]  # temperature.json: T and the errors before/after, per split
    calibrator: Calibrator
    realised: pd.DataFrame | None  # on the test split, when there is one
    reliability_png: bytes
    report_md: str


def _split_logits(preds: pd.DataFrame, split: str) -> tuple[np.ndarray, np.ndarray]:
    part = preds[preds["split"] == split]
    if part.empty:
        return np.zeros((0, 0)), np.zeros(0, dtype=np.int64)
    return np.stack(part["logits"].to_numpy()).astype(np.float64), part["label"].to_numpy()


def _errors(
    logits: np.ndarray, labels: np.ndarray, temperature: float
) -> tuple[dict[str, Any], list[pd.DataFrame]]:
    """The errors before and after temperature scaling, and the reliability bins (before,
    after) they were measured on."""
    errors: dict[str, Any] = {"n": len(labels)}
    bins = []
    for when, t in (("before", 1.0), ("after", temperature)):
        bins.append(reliability_bins(softmax(logits, t), labels))
        measured = calibration_errors(logits, labels, t, reliability=bins[-1])
        errors |= {f"{k}_{when}": v for k, v in measured.items()}
    return errors, bins


def calibrate(
    preds: pd.DataFrame,
    class_names: list[str],
    config: CalibrationConfig,
    model_fingerprint: str | None = None,
) -> Calibration:
    """Fit thresholds and temperature on val; measure both on test when there is one.

    ``preds`` is the evaluation's ``predictions.parquet`` (split, label, logits).
    """
    logits, labels = _split_logits(preds, FIT_SPLIT)
    if len(labels) == 0:
        raise ValueError("predictions.parquet has no val images: calibration is fitted on val")
    table = threshold_table(
        logits, labels, class_names, config.levels, config.min_support, config.fit_confidence
    )
    temperature = fit_temperature(logits, labels)
    errors, (before, after) = _errors(logits, labels, temperature)
    summary: dict[str, Any] = {"temperature": temperature, "split": FIT_SPLIT, **errors}
    test_logits, test_labels = _split_logits(preds, CHECK_SPLIT)
    summary["checked_on"] = CHECK_SPLIT if len(test_labels) else None
    realised = None
    if len(test_labels):
        realised = realised_precision(
            table, test_logits, test_labels, class_names, config.tolerance
        )
        summary[CHECK_SPLIT], _ = _errors(test_logits, test_labels, temperature)
    png = reliability_png(before, after, temperature)
    calibrator = Calibrator.from_table(table, class_names, temperature, model_fingerprint)
    relpaths = preds.loc[preds["split"] == FIT_SPLIT, "relpath"].tolist()
    notes = no_level_notes(table, logits, labels, relpaths, class_names)
    report = report_markdown(table, summary, realised, config.tolerance, notes)
    return Calibration(table, summary, calibrator, realised, png, report)


def no_level_notes(
    table: pd.DataFrame,
    logits: np.ndarray,
    labels: np.ndarray,
    relpaths: list[str],
    class_names: list[str],
) -> list[str]:
    """Why each class without any reachable logit level has none: usually its highest-scoring
    val image belongs to another class (a look at that image may find a wrong label)."""
    logit = table[table["score_kind"] == "logit"]
    reached = logit.groupby("class_name")["reachable"].any()
    notes = []
    for c, name in enumerate(class_names):
        if reached[name]:
            continue
        top = int(np.argmax(logits[:, c]))
        if not (labels == c).any():
            why = "no val image has this class"
        elif labels[top] != c:
            why = f"its highest-scoring val image, `{relpaths[top]}`, is {class_names[labels[top]]}"
        else:
            why = "no threshold keeps calibration.min_support val images at the lowest level"
        notes.append(f"- {name}: {why}")
    return notes


def _shown_levels(levels: np.ndarray) -> list[float]:
    shown = [lv for lv in levels if np.isclose(lv, REPORT_LEVELS).any()]
    return shown or list(levels[-3:])


def error_table(summary: dict[str, Any]) -> list[str]:
    """Markdown rows: ECE, MCE, NLL and Brier before and after calibration, on the fit split
    (``summary`` itself) and, when checked, the held-out one (``summary[CHECK_SPLIT]``)."""
    splits = [s for s in (FIT_SPLIT, CHECK_SPLIT) if s == FIT_SPLIT or s in summary]
    lines = ["| metric | " + " | ".join(f"{s} before | {s} after" for s in splits) + " |"]
    lines += ["|---|" + "---|---|" * len(splits)]
    for metric in ("ece", "mce", "nll", "brier"):
        cells = []
        for s in splits:
            errors = summary if s == FIT_SPLIT else summary[s]
            cells += [f"{errors[f'{metric}_before']:.4f}", f"{errors[f'{metric}_after']:.4f}"]
        lines.append(f"| {metric.upper()} | " + " | ".join(cells) + " |")
    return lines


def report_markdown(
    table: pd.DataFrame,
    summary: dict[str, Any],
    realised: pd.DataFrame | None,
    tolerance: float,
    notes: list[str],
) -> str:
    """Temperature and errors, the logit thresholds of a few levels, realised precision."""
    lines = [f"## Calibration on `{summary['split']}` ({summary['n']} images)", ""]
    seen = (
        f"checked on `{CHECK_SPLIT}` ({summary[CHECK_SPLIT]['n']} images that neither training, "
        "epoch selection nor calibration saw)"
        if summary.get("checked_on")
        else "not checked on held-out images: the task has no test split"
    )
    lines += [
        f"Thresholds and temperature fitted on `{FIT_SPLIT}` (which also picked the model's "
        f"best epoch); {seen}. Temperature {summary['temperature']:.3f} (fitted by NLL).",
        "",
    ]
    lines += error_table(summary)

    logit = table[table["score_kind"] == "logit"]
    shown = _shown_levels(np.sort(logit["level"].unique()))
    lines += ["", "### Logit thresholds", ""]
    lines += [
        "Threshold (recall, support) of each level: a logit at or above it is right that often "
        "on val. `—`: unreachable. Last column: the highest level reached, with the images "
        "kept and the 95% lower bound of their precision.",
        "",
        "| class | " + " | ".join(f"p ≥ {lv:g}" for lv in shown) + " | highest |",
        "|---|" + "---|" * (len(shown) + 1),
    ]
    for name, part in logit.groupby("class_name", sort=False):
        part = part.set_index("level")
        cells = []
        for lv in shown:
            r = part.loc[lv]
            cells.append(f"{r.threshold:.2f} ({r.recall:.2f}, {r.support})" if r.reachable else "—")
        reached = part[part["reachable"]]
        top = "none"
        if len(reached):
            r = reached.iloc[-1]
            top = f"{reached.index[-1]:g} ({r.support} images, ≥ {r.precision_lower:.2f})"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {top} |")
    if notes:
        lines += ["", "Classes that reach no level:", "", *notes]

    if realised is not None:
        checked = realised[(realised["score_kind"] == "logit") & (realised["n"] > 0)]
        flagged = checked[checked["flagged"]]
        lines += ["", "### Realised precision on `test`", ""]
        lines += [
            f"{len(checked)} (class, level) logit thresholds select test images; "
            f"{len(flagged)} fall short of their level by more than {tolerance} (or, on few "
            "images, more than the 95% Clopper-Pearson slack)."
        ]
        if len(flagged):
            lines += ["", "| class | level | threshold | test images | precision | allowed |"]
            lines += ["|---|---|---|---|---|---|"]
            lines += [
                f"| {r.class_name} | {r.level:g} | {r.threshold:.2f} | {r.n} | {r.precision:.3f} "
                f"| {r.allowed:.3f} |"
                for r in flagged.head(20).itertuples()
            ]
    lines += ["", f"![reliability diagram]({RELIABILITY_PNG})", ""]
    return "\n".join(lines)
