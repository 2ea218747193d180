"""The calibration and leaderboard stages on a hand-made artifact tree (no model needed):
realised precision on a test split, the checks, reuse, and the leaderboard's columns."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtmc_pipeline import artifacts as af
from mtmc_pipeline.artifacts import TaskArtifacts
from mtmc_pipeline.config import CalibrationConfig, EvaluationConfig
from mtmc_pipeline.stages.reporting import (
    calibration_checks,
    embed_pngs,
    evaluation_checks,
    run_calibration,
    run_leaderboard,
)

CLASSES = ["条纹", "格子", "波点"]
PNG = b"\x89PNG\r\n\x1a\nfake"


def _logits(rng: np.random.Generator, labels: np.ndarray, shift: float = 0.0) -> np.ndarray:
    """Class-separated logits; ``shift`` raises class 0's logit for every image (a drift)."""
    out = rng.normal(size=(len(labels), len(CLASSES))) + 3.0 * np.eye(len(CLASSES))[labels]
    out[:, 0] += shift
    return out


def make_task(root: Path, task: str = "pattern", test_shift: float | None = 0.0) -> TaskArtifacts:
    """The files calibration and the leaderboard read: model.json, the evaluation's metrics
    and predictions (val, plus test unless ``test_shift`` is None), integrity."""
    rng = np.random.default_rng(0)
    art = TaskArtifacts(root, task)
    parts = {"val": rng.integers(0, 3, 600)}
    if test_shift is not None:
        parts["test"] = rng.integers(0, 3, 400)
    frames = []
    for split, labels in parts.items():
        logits = _logits(rng, labels, test_shift if split == "test" else 0.0)
        frames.append(
            pd.DataFrame(
                {
                    "relpath": [f"{split}/{i}.png" for i in range(len(labels))],
                    "split": split,
                    "label": labels,
                    "pred": logits.argmax(1),
                    "logits": list(logits.astype(np.float32)),
                }
            )
        )
    af.write_parquet(art.evaluation_dir / "predictions.parquet", pd.concat(frames))
    primary = "test" if "test" in parts else "val"
    af.write_json(
        art.evaluation_dir / "metrics.json",
        {
            "fingerprint": "eval-fp",
            "model_fingerprint": "model-fp",
            "split": primary,
            "accuracy": 0.9,
            "macro_f1": 0.88,
            "mAP": 0.93,
            "n": len(parts[primary]),
        },
    )
    af.write_json(
        art.model_dir / "model.json",
        {
            "arch": "test_resnet",
            "class_names": CLASSES,
            "fingerprint": "model-fp",
            "trained_at": "2025-01-01T00:00:00+00:00",
        },
    )
    integrity = pd.DataFrame({"relpath": ["a", "b", "c", "d"]})
    integrity["status"] = ["ok", "ok", "warn", "error"]
    af.write_parquet(art.integrity, integrity)
    return art


def test_calibration_stage_reports_realised_precision_on_test(tmp_path: Path) -> None:
    art = make_task(tmp_path)
    result = run_calibration(art, CalibrationConfig())
    assert not result.reused
    out = art.calibration_dir
    for name in ("calibration.parquet", "temperature.json", "calibrator.json", "report.md"):
        assert (out / name).is_file()
    realised = pd.read_parquet(out / "realised_precision.parquet")
    assert {"class_name", "score_kind", "level", "threshold", "n", "precision", "flagged"} <= set(
        realised.columns
    )
    assert result.checks["thresholds_monotone"].passed
    check = result.checks["realised_precision_on_test"]
    assert check.passed, check.description  # same distribution: precision holds on test
    assert check.severity == "warn"
    calibrator = json.loads((out / "calibrator.json").read_text("utf-8"))
    assert calibrator["model_fingerprint"] == "model-fp"
    temperature = json.loads((out / "temperature.json").read_text("utf-8"))
    assert temperature["test"]["n"] == 400
    # the UI gets the report with its image inlined, and the table at 0.9
    report = result.metadata["report"].text
    assert "Realised precision on `test`" in report and "data:image/png;base64," in report
    assert set(result.metadata["thresholds_at_0.9"]["class_name"]) == set(CLASSES)
    assert run_calibration(art, CalibrationConfig()).reused


def test_a_drifted_test_split_is_flagged(tmp_path: Path) -> None:
    art = make_task(tmp_path, test_shift=2.5)  # class 0's logits inflated on test only
    result = run_calibration(art, CalibrationConfig(tolerance=0.05))
    check = result.checks["realised_precision_on_test"]
    assert not check.passed
    short = check.metadata["short"]
    assert len(short) > 0 and set(short["class_name"]) == {"条纹"}
    assert (short["precision"] < short["level"] - 0.05).all()
    assert result.metadata["realised_precision_flagged"] >= len(short)


def test_without_a_test_split_there_is_nothing_to_check(tmp_path: Path) -> None:
    art = make_task(tmp_path, test_shift=None)
    result = run_calibration(art, CalibrationConfig())
    assert "realised_precision_on_test" not in result.checks
    assert not (art.calibration_dir / "realised_precision.parquet").exists()


def test_a_decreasing_threshold_fails_the_monotone_check_naming_class_and_score() -> None:
    rows = []
    for name in CLASSES:
        for kind in ("logit", "softmax"):
            thresholds = [0.6, 0.5, 0.8] if (name, kind) == ("格子", "softmax") else [1, 2, 3]
            for level, t in zip([0.5, 0.7, 0.9], thresholds, strict=True):
                rows.append((name, kind, level, t, True))
    columns = ["class_name", "score_kind", "level", "threshold", "reachable"]
    table = pd.DataFrame(rows, columns=columns)
    check = calibration_checks(table, None, CalibrationConfig())["thresholds_monotone"]
    assert not check.passed and check.severity == "error"
    assert check.metadata["bad"] == ["格子/softmax"] and "格子/softmax" in check.description
    # an unreachable level carries no threshold to compare
    table.loc[table["threshold"] == 0.5, "reachable"] = False
    assert calibration_checks(table, None, CalibrationConfig())["thresholds_monotone"].passed


def test_leaderboard_has_the_columns_of_the_contract(tmp_path: Path) -> None:
    art = make_task(tmp_path)
    run_calibration(art, CalibrationConfig())
    result = run_leaderboard(tmp_path, ["pattern", "not_materialized"])
    board = pd.read_parquet(af.leaderboard_path(tmp_path))
    assert list(board.columns) == [
        "task",
        "images",
        "usable_images",
        "classes",
        "issues",
        "model",
        "split",
        "accuracy",
        "macro_f1",
        "mAP",
        "temperature",
        "ece_before",
        "ece_after",
        "trained_at",
        "fingerprint",
    ]
    row = board.iloc[0]
    assert (row["images"], row["usable_images"], row["issues"], row["classes"]) == (4, 3, 2, 3)
    assert row["model"] == "test_resnet" and row["fingerprint"] == "model-fp"
    temperature = json.loads((art.calibration_dir / "temperature.json").read_text("utf-8"))
    assert row["split"] == "test" and row["ece_after"] == temperature["test"]["ece_after"]
    assert result.metadata["tasks_without_results"] == ["not_materialized"]


def test_evaluation_checks() -> None:
    per_class = pd.DataFrame(
        {"split": "val", "class_name": CLASSES, "support": [60, 30, 10], "f1": [0.8, 0.5, 0.1]}
    )
    metrics = {"split": "val", "accuracy": 0.55, "macro_f1": 0.47}
    checks = evaluation_checks(metrics, per_class, EvaluationConfig(min_macro_f1=0.5))
    assert not checks["beats_majority_baseline"].passed  # 0.55 < 60 / 100
    assert checks["beats_majority_baseline"].metadata["majority_baseline"] == pytest.approx(0.6)
    assert not checks["macro_f1_floor"].passed
    metrics["accuracy"], metrics["macro_f1"] = 0.7, 0.6
    checks = evaluation_checks(metrics, per_class, EvaluationConfig(min_macro_f1=0.5))
    assert all(c.passed for c in checks.values())
    assert "macro_f1_floor" not in evaluation_checks(metrics, per_class, EvaluationConfig())


def test_embed_pngs_inlines_only_local_images_that_exist(tmp_path: Path) -> None:
    (tmp_path / "confusion.png").write_bytes(PNG)
    text = "![cm](confusion.png) ![gone](missing.png) ![up](../confusion.png)"
    out = embed_pngs(text, tmp_path)
    assert f"![cm](data:image/png;base64,{base64.b64encode(PNG).decode()})" in out
    assert "![gone](missing.png)" in out and "![up](../confusion.png)" in out
