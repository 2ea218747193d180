"""Reporting stages: evaluation, calibration and the cross-task leaderboard."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mtmc_pipeline import artifacts as af
from mtmc_pipeline.artifacts import TaskArtifacts, stored_fingerprint
from mtmc_pipeline.calibrate import (
    Calibrator,
    calibration_errors,
    fit_temperature,
    reliability_bins,
    threshold_table,
)
from mtmc_pipeline.config import CalibrationConfig, EvaluationConfig
from mtmc_pipeline.evaluate import evaluate_model
from mtmc_pipeline.metrics import softmax
from mtmc_pipeline.models import MODEL_FILE
from mtmc_pipeline.plots import reliability_png
from mtmc_pipeline.runtime import Runtime
from mtmc_pipeline.stages.common import (
    CheckOutcome,
    Markdown,
    Png,
    StageResult,
    record_elapsed,
    stage_fingerprint,
    upstream_fingerprint,
)


def run_evaluation(
    task_dir: Path, art: TaskArtifacts, config: EvaluationConfig, runtime: Runtime
) -> StageResult:
    start = time.perf_counter()
    fp = stage_fingerprint(
        "evaluation",
        upstream_fingerprint(art.model_dir / MODEL_FILE, "model"),
        upstream_fingerprint(art.splits, "splits"),
        config.model_dump(),
    )
    out = art.evaluation_dir
    reused = stored_fingerprint(out / "metrics.json") == fp
    if not reused:
        manifest = af.read_parquet(art.splits)
        ev = evaluate_model(
            art.model_dir, manifest, task_dir, art.work_dir / "cache", runtime, config
        )
        with af.atomic_dir(out) as tmp:
            af.write_json(tmp / "metrics.json", {**ev.metrics, "fingerprint": fp})
            af.write_parquet(tmp / "per_class.parquet", ev.per_class)
            af.write_parquet(tmp / "confusion.parquet", ev.confusion)
            af.write_parquet(tmp / "predictions.parquet", ev.predictions)
            af.write_bytes(tmp / "confusion.png", ev.confusion_png)
            af.write_text(tmp / "report.md", ev.report_md)
    metrics = af.read_json(out / "metrics.json")
    per_class = af.read_parquet(out / "per_class.parquet")
    split = metrics["split"]
    md = {
        "split": split,
        "n": metrics["n"],
        "accuracy": metrics["accuracy"],
        "balanced_accuracy": metrics["balanced_accuracy"],
        "macro_f1": metrics["macro_f1"],
        "per_class": per_class[per_class["split"] == split].drop(columns="split"),
        "report": Markdown((out / "report.md").read_text("utf-8")),
        "confusion_matrix": Png((out / "confusion.png").read_bytes()),
        "path": str(out),
    }
    record_elapsed(md, start)
    return StageResult(fp, reused, md, evaluation_checks(metrics, per_class, config))


def evaluation_checks(
    metrics: dict[str, Any], per_class: pd.DataFrame, config: EvaluationConfig
) -> dict[str, CheckOutcome]:
    pc = per_class[per_class["split"] == metrics["split"]]
    majority = float(pc["support"].max() / max(pc["support"].sum(), 1))
    checks = {
        "beats_majority_baseline": CheckOutcome(
            metrics["accuracy"] > majority,
            f"accuracy {metrics['accuracy']:.4f} vs always-the-largest-class {majority:.4f}",
            "error",
            {"accuracy": metrics["accuracy"], "majority_baseline": majority},
        )
    }
    if config.min_macro_f1 is not None:
        checks["macro_f1_floor"] = CheckOutcome(
            metrics["macro_f1"] >= config.min_macro_f1,
            f"macro F1 {metrics['macro_f1']:.4f}, floor {config.min_macro_f1} "
            "(evaluation.min_macro_f1)",
            "error",
        )
    return checks


def run_calibration(art: TaskArtifacts, config: CalibrationConfig) -> StageResult:
    start = time.perf_counter()
    eval_dir = art.evaluation_dir
    fp = stage_fingerprint(
        "calibration",
        upstream_fingerprint(eval_dir / "metrics.json", "evaluation"),
        config.model_dump(),
    )
    out = art.calibration_dir
    reused = stored_fingerprint(out / "temperature.json") == fp
    if not reused:
        preds = af.read_parquet(eval_dir / "predictions.parquet")
        classes = af.read_json(art.model_dir / MODEL_FILE)["class_names"]
        result = calibrate_predictions(preds, classes, config)
        with af.atomic_dir(out) as tmp:
            af.write_parquet(tmp / "calibration.parquet", result["table"], fp)
            af.write_json(tmp / "temperature.json", {**result["temperature"], "fingerprint": fp})
            af.write_json(tmp / "calibrator.json", {**result["calibrator"], "fingerprint": fp})
            af.write_bytes(tmp / "reliability.png", result["reliability_png"])
            if result["realised"] is not None:
                af.write_parquet(tmp / "realised_precision.parquet", result["realised"])
    table = af.read_parquet(out / "calibration.parquet")
    temp = af.read_json(out / "temperature.json")
    realised_path = out / "realised_precision.parquet"
    realised = af.read_parquet(realised_path) if realised_path.exists() else None
    logit = table[table["score_kind"] == "logit"]
    md = {
        "temperature": temp["temperature"],
        "ece_before": temp["ece_before"],
        "ece_after": temp["ece_after"],
        "nll_before": temp["nll_before"],
        "nll_after": temp["nll_after"],
        "reachable_levels": int(logit["reachable"].sum()),
        "thresholds_at_0.9": logit[np.isclose(logit["level"], 0.9)][
            ["class_name", "threshold", "support", "recall"]
        ],
        "reliability": Png((out / "reliability.png").read_bytes()),
        "path": str(out),
    }
    record_elapsed(md, start)
    return StageResult(fp, reused, md, calibration_checks(table, realised, config))


def calibrate_predictions(
    preds: pd.DataFrame, classes: list[str], config: CalibrationConfig
) -> dict[str, Any]:
    """Fit the threshold table and temperature on val; measure realised precision on test."""
    val = preds[preds["split"] == "val"]
    logits = np.stack(val["logits"].to_numpy()).astype(np.float64)
    labels = val["label"].to_numpy()
    table = threshold_table(logits, labels, classes, config.levels)
    temperature = fit_temperature(logits, labels)
    before = calibration_errors(softmax(logits), labels)
    after = calibration_errors(softmax(logits, temperature), labels)
    calibrator = Calibrator.from_table(table, classes, temperature)
    realised = None
    test = preds[preds["split"] == "test"]
    if not test.empty:
        realised = realised_precision(
            table, np.stack(test["logits"].to_numpy()), test["label"].to_numpy(), classes
        )
    png = reliability_png(
        reliability_bins(softmax(logits), labels),
        reliability_bins(softmax(logits, temperature), labels),
        temperature,
    )
    return {
        "table": table,
        "temperature": {
            "temperature": temperature,
            "split": "val",
            "n": len(labels),
            **{f"{k}_before": v for k, v in before.items()},
            **{f"{k}_after": v for k, v in after.items()},
        },
        "calibrator": calibrator.to_json(),
        "reliability_png": png,
        "realised": realised,
    }


def realised_precision(
    table: pd.DataFrame, logits: np.ndarray, labels: np.ndarray, classes: list[str]
) -> pd.DataFrame:
    """Precision actually reached on held-out data at each reachable logit threshold."""
    rows = []
    logit = table[(table["score_kind"] == "logit") & table["reachable"]]
    for r in logit.itertuples():
        c = classes.index(r.class_name)
        hit = logits[:, c] >= r.threshold
        n = int(hit.sum())
        prec = float((labels[hit] == c).mean()) if n else float("nan")
        rows.append((r.class_name, r.level, r.threshold, n, prec))
    return pd.DataFrame(rows, columns=["class_name", "level", "threshold", "n", "precision"])


def calibration_checks(
    table: pd.DataFrame, realised: pd.DataFrame | None, config: CalibrationConfig
) -> dict[str, CheckOutcome]:
    bad = []
    for (name, kind), part in table[table["reachable"]].groupby(["class_name", "score_kind"]):
        t = part.sort_values("level")["threshold"].to_numpy()
        if (np.diff(t) < -1e-12).any():
            bad.append(f"{name}/{kind}")
    checks = {
        "thresholds_monotone": CheckOutcome(
            not bad, "thresholds never decrease as the precision level rises", "error", {"bad": bad}
        )
    }
    if realised is not None:
        short = realised[realised["n"] > 0]
        short = short[short["precision"] < short["level"] - config.tolerance]
        checks["realised_precision_on_test"] = CheckOutcome(
            short.empty,
            f"{len(short)} (class, level) pairs fall more than {config.tolerance} below their "
            "level on the test split",
            "warn",
            {"short": short.head(20).to_dict("records")},
        )
    return checks


def leaderboard_row(art: TaskArtifacts) -> dict[str, Any]:
    """One task's summary, read from its latest artifacts."""
    integrity = af.read_parquet(art.integrity)
    model = af.read_json(art.model_dir / MODEL_FILE)
    metrics = af.read_json(art.evaluation_dir / "metrics.json")
    temp = af.read_json(art.calibration_dir / "temperature.json")
    return {
        "task": art.task,
        "images": len(integrity),
        "usable_images": int((integrity["status"] != "error").sum()),
        "classes": len(model["class_names"]),
        "issues": int((integrity["status"] != "ok").sum()),
        "model": model["arch"],
        "split": metrics["split"],
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "ece_after": temp["ece_after"],
        "trained_at": model["trained_at"],
        "fingerprint": model["fingerprint"],
    }


def run_leaderboard(root: Path, tasks: list[str]) -> StageResult:
    rows, missing = [], []
    for task in tasks:
        art = TaskArtifacts(root, task)
        try:
            rows.append(leaderboard_row(art))
        except FileNotFoundError:
            missing.append(task)
    table = pd.DataFrame(rows)
    fp = stage_fingerprint("leaderboard", rows)
    path = af.leaderboard_path(root)
    reused = stored_fingerprint(path) == fp
    if not reused:
        af.write_parquet(path, table, fp)
    md = {"tasks": len(rows), "leaderboard": table, "path": str(path)}
    if missing:
        md["tasks_without_results"] = missing
    return StageResult(fp, reused, md)
