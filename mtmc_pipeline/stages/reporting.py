"""Reporting stages: evaluation, calibration and the cross-task leaderboard."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mtmc_pipeline import artifacts as af
from mtmc_pipeline.artifacts import MODEL_FILE, TaskArtifacts, stored_fingerprint
from mtmc_pipeline.config import CalibrationConfig, EvaluationConfig
from mtmc_pipeline.evaluation.calibrate import (
    CALIBRATOR_FILE,
    CHECK_SPLIT,
    RELIABILITY_PNG,
    calibrate,
)
from mtmc_pipeline.evaluation.multilabel_calibrate import calibrate_multilabel
from mtmc_pipeline.runtime import DeviceSettings
from mtmc_pipeline.stages.common import (
    CheckOutcome,
    Markdown,
    Png,
    StageResult,
    png_markdown,
    record_elapsed,
    stage_fingerprint,
    upstream_fingerprint,
)

_LOCAL_PNG = re.compile(r"!\[([^\]]*)\]\(([^()/\\]+\.png)\)")


def embed_pngs(markdown: str, directory: Path) -> str:
    """The report with its local ``![..](x.png)`` images inlined, for the UI (no file links)."""

    def inline(m: re.Match[str]) -> str:
        path = directory / m.group(2)
        return png_markdown(path.read_bytes(), m.group(1)) if path.is_file() else m.group(0)

    return _LOCAL_PNG.sub(inline, markdown)


def run_evaluation(
    task_dir: Path, art: TaskArtifacts, config: EvaluationConfig, device: DeviceSettings
) -> StageResult:
    """Evaluate the model, or reuse the stored results: torch is imported only to predict."""
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
        from mtmc_pipeline.evaluation.evaluate import evaluate_model
        from mtmc_pipeline.evaluation.multilabel_evaluate import evaluate_multilabel

        manifest = af.read_parquet(art.splits)
        multilabel = af.read_json(art.model_dir / MODEL_FILE).get("kind") == "multilabel"
        evaluate = evaluate_multilabel if multilabel else evaluate_model
        ev = evaluate(
            art.model_dir, manifest, task_dir, art.work_dir / "cache", device.resolve(), config
        )
        with af.atomic_dir(out) as tmp:
            af.write_json(tmp / "metrics.json", {**ev.metrics, "fingerprint": fp})
            af.write_parquet(tmp / "per_class.parquet", ev.per_class)
            af.write_parquet(tmp / "confusion.parquet", ev.confusion)
            af.write_parquet(tmp / "predictions.parquet", ev.predictions)
            for name, png in ev.pngs.items():
                af.write_bytes(tmp / name, png)
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
        "mAP": metrics["mAP"],
        "report": Markdown(embed_pngs((out / "report.md").read_text("utf-8"), out)),
        "per_class": per_class[per_class["split"] == split].drop(columns="split"),
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
            f"accuracy {metrics['accuracy']:.4f} on {metrics['split']} vs always-the-largest-"
            f"class {majority:.4f}",
            "error",
            {"accuracy": metrics["accuracy"], "majority_baseline": majority},
        )
    }
    if metrics.get("kind") == "multilabel":
        checks["beats_majority_baseline"] = multilabel_baseline_check(metrics, pc)
    if config.min_macro_f1 is not None:
        checks["macro_f1_floor"] = CheckOutcome(
            metrics["macro_f1"] >= config.min_macro_f1,
            f"macro F1 {metrics['macro_f1']:.4f}, floor {config.min_macro_f1} "
            "(evaluation.min_macro_f1)",
            "error",
        )
    return checks


def multilabel_baseline_check(metrics: dict[str, Any], pc: pd.DataFrame) -> CheckOutcome:
    """A model that ranks images at random has an expected AP of the class's prevalence."""
    chance = float(pc["support"].mean() / max(metrics["n"], 1))
    return CheckOutcome(
        metrics["mAP"] > chance,
        f"mAP {metrics['mAP']:.4f} on {metrics['split']} vs {chance:.4f} of a random ranking "
        "(mean class prevalence)",
        "error",
        {"mAP": metrics["mAP"], "random_ranking_map": chance},
    )


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
        model_fp = af.read_json(eval_dir / "metrics.json").get("model_fingerprint")
        fit = calibrate_multilabel if "labels" in preds.columns else calibrate
        try:
            cal = fit(preds, classes, config, model_fp)
        except ValueError as e:
            raise ValueError(f"{eval_dir / 'predictions.parquet'}: {e}") from e
        with af.atomic_dir(out) as tmp:
            af.write_parquet(tmp / "calibration.parquet", cal.table, fp)
            af.write_json(tmp / "temperature.json", {**cal.temperature, "fingerprint": fp})
            af.write_json(tmp / CALIBRATOR_FILE, {**cal.calibrator.to_json(), "fingerprint": fp})
            af.write_bytes(tmp / RELIABILITY_PNG, cal.reliability_png)
            af.write_text(tmp / "report.md", cal.report_md)
            if cal.realised is not None:
                af.write_parquet(tmp / "realised_precision.parquet", cal.realised)
    table = af.read_parquet(out / "calibration.parquet")
    temp = af.read_json(out / "temperature.json")
    realised_path = out / "realised_precision.parquet"
    realised = af.read_parquet(realised_path) if realised_path.exists() else None
    logit = table[table["score_kind"] == "logit"]
    md: dict[str, Any] = {
        "temperature": temp["temperature"],
        "ece_before": temp["ece_before"],
        "ece_after": temp["ece_after"],
        "nll_before": temp["nll_before"],
        "nll_after": temp["nll_after"],
        "reachable_levels": int(logit["reachable"].sum()),
        "report": Markdown(embed_pngs((out / "report.md").read_text("utf-8"), out)),
        "thresholds_at_0.9": logit[np.isclose(logit["level"], 0.9)][
            ["class_name", "threshold", "support", "recall", "precision_lower"]
        ],
        "reliability": Png((out / RELIABILITY_PNG).read_bytes()),
        "path": str(out),
    }
    if realised is not None:
        md["realised_precision_flagged"] = int(realised["flagged"].sum())
    record_elapsed(md, start)
    return StageResult(fp, reused, md, calibration_checks(table, realised, config))


def calibration_checks(
    table: pd.DataFrame, realised: pd.DataFrame | None, config: CalibrationConfig
) -> dict[str, CheckOutcome]:
    bad = []
    for (name, kind), part in table[table["reachable"]].groupby(["class_name", "score_kind"]):
        t = part.sort_values("level")["threshold"].to_numpy()
        if (np.diff(t) < 0).any():
            bad.append(f"{name}/{kind}")
    checks = {
        "thresholds_monotone": CheckOutcome(
            not bad,
            "thresholds never decrease as the precision level rises"
            if not bad
            else f"thresholds decrease as the precision level rises for (class/score) {bad}",
            "error",
            {"bad": bad},
        )
    }
    if realised is not None:
        checked = realised[realised["n"] > 0]
        short = checked[checked["flagged"]]
        checks["realised_precision_on_test"] = CheckOutcome(
            short.empty,
            f"{len(short)} of {len(checked)} (class, score, level) thresholds fall more than "
            f"{config.tolerance} (calibration.tolerance) below their level on the test split",
            "warn",
            {"checked": len(checked), "short": short.head(50)},
        )
    return checks


def leaderboard_row(art: TaskArtifacts) -> dict[str, Any]:
    """One task's summary, read from its latest artifacts.

    ECE is taken on the same split as the metrics: test when there is one (the temperature
    is fitted on val, so val ECE after scaling flatters it), else val.
    """
    integrity = af.read_parquet(art.integrity, columns=["status"])
    model = af.read_json(art.model_dir / MODEL_FILE)
    metrics = af.read_json(art.evaluation_dir / "metrics.json")
    temp = af.read_json(art.calibration_dir / "temperature.json")
    errors = temp.get(CHECK_SPLIT, temp) if metrics["split"] == CHECK_SPLIT else temp
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
        "mAP": metrics["mAP"],
        "temperature": temp["temperature"],
        "ece_before": errors["ece_before"],
        "ece_after": errors["ece_after"],
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
    md: dict[str, Any] = {"tasks": len(rows), "leaderboard": table, "path": str(path)}
    if missing:
        md["tasks_without_results"] = missing
    return StageResult(fp, reused, md)
