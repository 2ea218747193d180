"""The pipeline's stages as plain functions: read inputs from the artifact root, reuse or
recompute, write outputs atomically, and report what a person wants to see.

Every stage computes an *input fingerprint* from its upstream outputs' fingerprints, its
resolved configuration and its code version. If the stored output was made from the same
fingerprint it is reused (no decoding, no training) and the result says so. The fingerprint
is also the stage's data version in Dagster, so an unchanged input never makes a downstream
stage stale.

This module knows nothing of Dagster; ``assets/`` wraps one function of it per asset.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from mtmc_pipeline import artifacts as af
from mtmc_pipeline.artifacts import TaskArtifacts, fingerprint, stored_fingerprint
from mtmc_pipeline.calibrate import (
    Calibrator,
    calibration_errors,
    fit_temperature,
    reliability_bins,
    threshold_table,
)
from mtmc_pipeline.config import (
    CalibrationConfig,
    EvaluationConfig,
    IntegrityConfig,
    SamplingConfig,
    ScanConfig,
    SplitConfig,
    TrainConfig,
)
from mtmc_pipeline.evaluate import evaluate_model
from mtmc_pipeline.integrity import check_integrity, usable_rows
from mtmc_pipeline.layout import listing_fingerprint, scan_task
from mtmc_pipeline.metrics import softmax
from mtmc_pipeline.models import MODEL_FILE, save_bundle
from mtmc_pipeline.plots import bar_png, history_png, reliability_png
from mtmc_pipeline.runtime import Runtime
from mtmc_pipeline.sampling import sampling_weights
from mtmc_pipeline.splits import (
    TaskDataError,
    class_names_from_schema,
    class_split_counts,
    leaking_hashes,
    make_splits,
    splits_schema,
)
from mtmc_pipeline.train import train_model

# Bump a stage's version whenever its logic changes what it writes: its output and everything
# downstream then count as stale (Dagster shows it, and fingerprints stop matching).
CODE_VERSIONS: dict[str, str] = {
    "raw_images": "1",
    "inventory": "1",
    "integrity": "1",
    "splits": "1",
    "sampling_weights": "1",
    "model": "1",
    "evaluation": "1",
    "calibration": "1",
    "leaderboard": "1",
}


@dataclass(frozen=True)
class Markdown:
    text: str


@dataclass(frozen=True)
class Png:
    data: bytes


@dataclass(frozen=True)
class CheckOutcome:
    passed: bool
    description: str
    severity: str = "error"  # "error" or "warn"
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageResult:
    """What a stage produced: its data version, whether it was reused, what to show."""

    fingerprint: str
    reused: bool
    metadata: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, CheckOutcome] = field(default_factory=dict)


def _upstream(path: Path, stage: str) -> str:
    fp = stored_fingerprint(path)
    if fp is None:
        raise FileNotFoundError(f"{path} is missing: materialize the {stage!r} stage first")
    return fp


def _fp(stage: str, *inputs: Any) -> str:
    return fingerprint(stage, CODE_VERSIONS[stage], *inputs)


def _timed(
    metadata: dict[str, Any], start: float, count: int | None = None, unit: str = ""
) -> None:
    seconds = time.perf_counter() - start
    metadata["elapsed_s"] = round(seconds, 3)
    if count is not None and seconds > 0:
        metadata[f"{unit}_per_s"] = round(count / seconds, 1)


# --------------------------------------------------------------------------- raw + inventory


def observe_raw(task_dir: Path, config: ScanConfig | None = None) -> tuple[str, dict[str, Any]]:
    """The raw folder's data version (listing fingerprint) and a few counts, without decoding."""
    scan = scan_task(task_dir, config)
    inv = scan.inventory
    return listing_fingerprint(task_dir, inv), {
        "files": len(inv),
        "bytes": int(inv["bytes"].clip(0).sum()),
    }


def run_inventory(task_dir: Path, art: TaskArtifacts, config: ScanConfig) -> StageResult:
    start = time.perf_counter()
    scan = scan_task(task_dir, config)
    inv = scan.inventory
    if inv.empty:
        raise TaskDataError(
            f"task folder {task_dir} has no image files "
            f"(extensions {', '.join(config.extensions)}); skipped: {dict(scan.skipped) or 'none'}"
        )
    fp = _fp("inventory", listing_fingerprint(task_dir, inv), config.model_dump())
    reused = stored_fingerprint(art.inventory) == fp
    if not reused:
        af.write_parquet(art.inventory, inv, fp, meta=scan.summary())
    md: dict[str, Any] = {
        "files": len(inv),
        "classes": inv["class_name"].nunique(),
        "layout": scan.layout,
        "skipped": dict(scan.skipped),
        "walk_problems": len(scan.problems),
        "class_by_split_dir": inv.pivot_table(
            index="class_name", columns="split_dir", values="relpath", aggfunc="count", fill_value=0
        ),
        "path": str(art.inventory),
    }
    if scan.problems:
        md["walk_problem_list"] = pd.DataFrame(scan.problems).head(20)
    _timed(md, start, len(inv), "files")
    return StageResult(fp, reused, md)


# --------------------------------------------------------------------------- integrity


def run_integrity(task_dir: Path, art: TaskArtifacts, config: IntegrityConfig) -> StageResult:
    start = time.perf_counter()
    fp = _fp("integrity", _upstream(art.inventory, "inventory"), config.model_dump())
    reused = stored_fingerprint(art.integrity) == fp
    if reused:
        df = af.read_parquet(art.integrity)
        summary = af.parquet_meta(art.integrity)
        summary["decoded"] = 0
    else:
        inventory = af.read_parquet(art.inventory)
        previous = af.read_parquet(art.integrity) if art.integrity.exists() else None
        df, summary = check_integrity(task_dir, inventory, config, previous)
        af.write_parquet(
            art.integrity, df, fp, meta={k: v for k, v in summary.items() if k != "decoded"}
        )
    md = integrity_metadata(df, summary)
    md["path"] = str(art.integrity)
    _timed(md, start, summary.get("decoded", 0), "decoded")
    return StageResult(fp, reused, md, integrity_checks(df, config))


def integrity_metadata(df: pd.DataFrame, summary: dict[str, Any]) -> dict[str, Any]:
    codes = pd.Series([c for issues in df["issues"] for c in issues], dtype=object)
    problems = df[df["status"] != "ok"][["relpath", "class_name", "status", "issues", "detail"]]
    problems = problems.assign(issues=problems["issues"].map(", ".join))
    return {
        "files": len(df),
        "ok": int((df["status"] == "ok").sum()),
        "warn": int((df["status"] == "warn").sum()),
        "error": int((df["status"] == "error").sum()),
        "decoded": int(summary.get("decoded", 0)),
        "reused_findings": int(summary.get("reused", 0)),
        "issue_counts": codes.value_counts().rename_axis("issue").rename("files").to_frame(),
        "problem_files": problems.head(25),
        "task_findings": summary.get("task_findings", []),
        "class_by_split_dir": df.pivot_table(
            index="class_name", columns="split_dir", values="relpath", aggfunc="count", fill_value=0
        ),
    }


def integrity_checks(df: pd.DataFrame, config: IntegrityConfig) -> dict[str, CheckOutcome]:
    n = max(len(df), 1)
    errors = int((df["status"] == "error").sum())
    fraction = errors / n
    leaks = df[df["issues"].map(lambda c: "cross_split_leak" in c)]
    return {
        "error_fraction": CheckOutcome(
            fraction <= config.max_error_fraction,
            f"{errors} of {len(df)} files ({fraction:.1%}) have errors; "
            f"allowed {config.max_error_fraction:.1%} (integrity.max_error_fraction)",
            "error",
            {"error_files": errors, "error_fraction": fraction},
        ),
        "no_split_leakage": CheckOutcome(
            leaks.empty,
            f"{len(leaks)} files have identical bytes in another split folder"
            + (" (they are excluded)" if len(leaks) else ""),
            "warn",
            {"leaking_files": leaks["relpath"].head(20).tolist()},
        ),
    }


# --------------------------------------------------------------------------- splits


def _splits_settings(path: Path) -> dict[str, Any] | None:
    return af.parquet_meta(path).get("split_config") if path.exists() else None


def run_splits(art: TaskArtifacts, config: SplitConfig) -> StageResult:
    start = time.perf_counter()
    fp = _fp("splits", _upstream(art.integrity, "integrity"), config.model_dump())
    reused = stored_fingerprint(art.splits) == fp
    if reused:
        manifest = af.read_parquet(art.splits)
        classes = class_names_from_schema(pq.read_schema(art.splits))
    else:
        integrity = af.read_parquet(art.integrity)
        same_settings = _splits_settings(art.splits) == config.model_dump()
        previous = af.read_parquet(art.splits) if same_settings else None
        manifest, classes = make_splits(usable_rows(integrity), config, previous, art.task)
        af.write_parquet(
            art.splits,
            manifest,
            fp,
            meta={"split_config": config.model_dump(), "class_names": classes},
            schema=splits_schema(classes),
        )
    inventory_classes = sorted(af.read_parquet(art.inventory)["class_name"].unique())
    md = {
        "images": len(manifest),
        "classes": len(classes),
        "by_split": manifest["split"].value_counts().to_dict(),
        "class_by_split": class_split_counts(manifest),
        "path": str(art.splits),
    }
    _timed(md, start)
    return StageResult(fp, reused, md, splits_checks(manifest, classes, inventory_classes))


def splits_checks(
    manifest: pd.DataFrame, classes: list[str], inventory_classes: list[str]
) -> dict[str, CheckOutcome]:
    in_train = set(manifest.loc[manifest["split"] == "train", "class_name"])
    missing = [c for c in inventory_classes if c not in in_train]
    leaks = leaking_hashes(manifest)
    return {
        "every_class_in_train": CheckOutcome(
            not missing,
            "every class folder has training images"
            if not missing
            else f"classes without usable training images (left out of the model): {missing}",
            "warn",
            {"missing_classes": missing},
        ),
        "no_hash_in_two_splits": CheckOutcome(
            len(leaks) == 0,
            f"{len(leaks)} identical images appear in more than one split",
            "error",
            {"leaking_hashes": [str(h) for h in leaks[:20]]},
        ),
    }


# --------------------------------------------------------------------------- sampling weights


def run_sampling(art: TaskArtifacts, config: SamplingConfig) -> StageResult:
    start = time.perf_counter()
    fp = _fp("sampling_weights", _upstream(art.splits, "splits"), config.model_dump())
    reused = stored_fingerprint(art.sampling_weights) == fp
    if reused:
        table = af.read_parquet(art.class_weights)
    else:
        manifest = af.read_parquet(art.splits)
        classes = class_names_from_schema(pq.read_schema(art.splits))
        weights, table = sampling_weights(manifest, classes, config)
        af.write_parquet(art.class_weights, table, fp)
        af.write_parquet(art.sampling_weights, weights, fp, meta={"strategy": config.strategy})
    shares = table.set_index("class_name")[["share_before", "expected_share"]]
    md = {
        "strategy": config.strategy,
        "class_table": table,
        "expected_share_plot": Png(bar_png(shares["expected_share"], "expected share of draws")),
        "path": str(art.sampling_weights),
    }
    _timed(md, start)
    return StageResult(fp, reused, md)


# --------------------------------------------------------------------------- model


def run_training(
    task_dir: Path,
    art: TaskArtifacts,
    config: TrainConfig,
    runtime: Runtime,
    log: Callable[[str], None] = print,
) -> StageResult:
    start = time.perf_counter()
    fp = _fp(
        "model",
        _upstream(art.splits, "splits"),
        _upstream(art.sampling_weights, "sampling_weights"),
        config.model_dump(),
        runtime.precision,
    )
    model_json = art.model_dir / MODEL_FILE
    reused = stored_fingerprint(model_json) == fp
    if not reused:
        manifest = af.read_parquet(art.splits)
        classes = class_names_from_schema(pq.read_schema(art.splits))
        weights = af.read_parquet(art.sampling_weights)
        log(f"training {config.model} on {runtime.describe()} for task {art.task!r}")
        result = train_model(
            manifest, classes, weights, task_dir, art.work_dir / "cache", config, runtime, log
        )
        info = {
            "arch": config.model,
            "class_names": classes,
            "img_size": config.img_size,
            "mean": list(result.preprocess.mean),
            "std": list(result.preprocess.std),
            "interpolation": result.preprocess.interpolation,
            "config": config.model_dump(),
            "fingerprint": fp,
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "metrics": result.best_metrics,
            "parameters": result.parameters,
            "device": runtime.describe(),
            "precision": runtime.precision,
            "train_seconds": round(result.seconds, 2),
            "images_per_second": round(result.images_per_second, 1),
            "trained_at": pd.Timestamp.now(tz="UTC").isoformat(),
        }
        with af.atomic_dir(art.model_dir) as tmp:
            save_bundle(tmp, result.model, info)
            af.write_parquet(tmp / "history.parquet", result.history)
    info = af.read_json(model_json)
    history = af.read_parquet(art.model_dir / "history.parquet")
    md = {
        "arch": info["arch"],
        "parameters": info["parameters"],
        "device": runtime.describe() if not reused else info["device"],
        "precision": info["precision"],
        "best_epoch": info["best_epoch"] + 1,
        "epochs_run": info["epochs_run"],
        "val_accuracy": info["metrics"].get("accuracy"),
        "val_macro_f1": info["metrics"].get("macro_f1"),
        "train_images_per_s": info["images_per_second"],
        "train_seconds": info["train_seconds"],
        "curves": Png(history_png(history)),
        "path": str(art.model_dir),
    }
    _timed(md, start)
    return StageResult(fp, reused, md)


# --------------------------------------------------------------------------- evaluation


def run_evaluation(
    task_dir: Path, art: TaskArtifacts, config: EvaluationConfig, runtime: Runtime
) -> StageResult:
    start = time.perf_counter()
    fp = _fp(
        "evaluation",
        _upstream(art.model_dir / MODEL_FILE, "model"),
        _upstream(art.splits, "splits"),
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
    _timed(md, start)
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


# --------------------------------------------------------------------------- calibration


def run_calibration(art: TaskArtifacts, config: CalibrationConfig) -> StageResult:
    start = time.perf_counter()
    eval_dir = art.evaluation_dir
    fp = _fp("calibration", _upstream(eval_dir / "metrics.json", "evaluation"), config.model_dump())
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
    _timed(md, start)
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


# --------------------------------------------------------------------------- leaderboard


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
    fp = _fp("leaderboard", rows)
    path = af.leaderboard_path(root)
    reused = stored_fingerprint(path) == fp
    if not reused:
        af.write_parquet(path, table, fp)
    md = {"tasks": len(rows), "leaderboard": table, "path": str(path)}
    if missing:
        md["tasks_without_results"] = missing
    return StageResult(fp, reused, md)
