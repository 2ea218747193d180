"""The evaluation and calibration the pipeline wrote for the tiny demo: every number can be
recomputed from predictions.parquet, and the UI shows the report with its images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, precision_recall_fscore_support

from mtmc_pipeline import artifacts as af
from mtmc_pipeline.artifacts import TaskArtifacts
from mtmc_pipeline.demo import write_digits
from mtmc_pipeline.evaluation.calibrate import calibration_errors
from mtmc_pipeline.evaluation.metrics import cross_entropy, softmax
from mtmc_pipeline.stages.reporting import leaderboard_row
from tests import stage_runner
from tests.conftest import Materialized

TEST_SPLIT_TASK = """\
split:
  test_fraction: 0.2
calibration:  # 2 val images a class: without these no level is reachable
  min_support: 3
  fit_confidence: 0
train:
  model: test_resnet
  img_size: 16
  pretrained: false
  epochs: 1
  batch_size: 16
"""


def _read(materialized: Materialized, task: str):
    ev = materialized.artifacts / task / "evaluation"
    metrics = json.loads((ev / "metrics.json").read_text("utf-8"))
    preds = pd.read_parquet(ev / "predictions.parquet")
    return ev, metrics, preds


@pytest.mark.parametrize("task", ["digits", "pattern"])
def test_metrics_follow_from_the_saved_logits(materialized: Materialized, task: str) -> None:
    ev, metrics, preds = _read(materialized, task)
    part = preds[preds["split"] == metrics["split"]]
    logits = np.stack(part["logits"].to_numpy()).astype(np.float64)
    y = part["label"].to_numpy()
    k = logits.shape[1]
    assert metrics["ovr_scores"] == "softmax" and metrics["ovr_threshold"] == 0.5
    probs = softmax(logits)
    truth = np.eye(k, dtype=int)[y]
    decisions = (probs >= 0.5).astype(int)
    macro = precision_recall_fscore_support(truth, decisions, average="macro", zero_division=0)
    micro = precision_recall_fscore_support(truth, decisions, average="micro", zero_division=0)
    assert [metrics[m] for m in ("CP", "CR", "CF1")] == pytest.approx(list(macro[:3]))
    assert [metrics[m] for m in ("OP", "OR", "OF1")] == pytest.approx(list(micro[:3]))
    assert metrics["mAP"] == pytest.approx(average_precision_score(truth, probs), abs=1e-6)
    assert metrics["log_loss"] == pytest.approx(cross_entropy(logits, y), abs=1e-6)
    per_class = pd.read_parquet(ev / "per_class.parquet")
    ap = per_class[per_class["split"] == metrics["split"]]["average_precision"].to_numpy()
    assert ap.mean() == pytest.approx(metrics["mAP"])
    assert (
        metrics["model_fingerprint"]
        == json.loads((materialized.artifacts / task / "model" / "model.json").read_text("utf-8"))[
            "fingerprint"
        ]
    )


def test_confusion_parquet_has_counts_and_row_fractions(materialized: Materialized) -> None:
    ev, _, preds = _read(materialized, "pattern")
    cm = pd.read_parquet(ev / "confusion.parquet")
    assert {"true_class", "pred_class", "true_label", "pred_label", "count", "row_fraction"} <= set(
        cm.columns
    )
    val = cm[cm["split"] == "val"]
    assert val["count"].sum() == (preds["split"] == "val").sum()
    rows = val.groupby("true_class")["row_fraction"].sum()
    assert np.allclose(rows, 1.0)
    pairs = preds[preds["split"] == "val"].groupby(["label", "pred"]).size()
    counted = val.set_index(["true_label", "pred_label"])["count"]
    assert (counted[counted > 0].sort_index() == pairs.sort_index()).all()
    for name in ("confusion.png", "confusion_normalized.png"):
        assert (ev / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_shows_the_required_sections_in_the_ui(materialized: Materialized) -> None:
    ev = _read(materialized, "pattern")[0]
    report = (ev / "report.md").read_text("utf-8")
    for heading in ("## Evaluation on `test`", "Worst classes", "Most confused pairs", "mistakes"):
        assert heading in report
    assert "| CP | CR | CF1 | OP | OR | OF1 |" in report
    assert "](confusion.png)" in report and "](confusion_normalized.png)" in report
    shown = {}
    for event in materialized.result.get_asset_materialization_events():
        key = event.asset_key.to_user_string()
        if key in ("pattern/evaluation", "pattern/calibration"):
            shown[key] = event.materialization.metadata["report"].value
    assert shown["pattern/evaluation"].count("](data:image/png;base64,") == 2
    assert "## Evaluation on `test`" in shown["pattern/evaluation"]
    assert "neither training, epoch selection nor calibration saw" in shown["pattern/evaluation"]
    assert "### Logit thresholds" in shown["pattern/calibration"]
    assert "](data:image/png;base64," in shown["pattern/calibration"]


@pytest.mark.parametrize("task", ["digits", "pattern"])
def test_temperature_is_fitted_on_val_and_never_raises_its_nll(
    materialized: Materialized, task: str
) -> None:
    _, _, preds = _read(materialized, task)
    val = preds[preds["split"] == "val"]
    logits = np.stack(val["logits"].to_numpy()).astype(np.float64)
    y = val["label"].to_numpy()
    temp = json.loads(
        (materialized.artifacts / task / "calibration" / "temperature.json").read_text("utf-8")
    )
    after = calibration_errors(logits, y, temp["temperature"])
    assert temp["nll_after"] == pytest.approx(after["nll"]) and temp["ece_after"] == pytest.approx(
        after["ece"]
    )
    assert temp["nll_after"] <= temp["nll_before"] + 1e-12


def test_a_task_with_a_test_split_reports_on_test(tmp_path: Path) -> None:
    """Headline metrics, realised precision and the leaderboard's ECE all come from test."""
    write_digits(tmp_path / "data" / "digits", per_class=12)
    (tmp_path / "data" / "digits" / "task.yaml").write_text(TEST_SPLIT_TASK, "utf-8")
    stage_runner.run(tmp_path / "data", tmp_path / "artifacts", "digits", {})
    art = TaskArtifacts(tmp_path / "artifacts", "digits")
    manifest = af.read_parquet(art.splits)
    n_test = int((manifest["split"] == "test").sum())
    assert n_test >= 10  # one or two images of each of the ten classes

    metrics = af.read_json(art.evaluation_dir / "metrics.json")
    assert metrics["split"] == "test" and metrics["n"] == n_test
    assert set(metrics["by_split"]) == {"val", "test"}
    assert metrics["accuracy"] == metrics["by_split"]["test"]["accuracy"]
    preds = af.read_parquet(art.evaluation_dir / "predictions.parquet")
    assert (preds["split"] == "test").sum() == n_test
    assert "## Evaluation on `test`" in (art.evaluation_dir / "report.md").read_text("utf-8")

    realised = af.read_parquet(art.calibration_dir / "realised_precision.parquet")
    assert len(realised) > 0 and realised["n"].max() <= n_test
    temperature = af.read_json(art.calibration_dir / "temperature.json")
    assert temperature["split"] == "val" and temperature["test"]["n"] == n_test
    row = leaderboard_row(art)
    assert row["split"] == "test" and row["ece_after"] == temperature["test"]["ece_after"]


def test_logits_are_stored_in_fp32_under_bf16_autocast() -> None:
    """The backbone runs under autocast, the head in fp32: logits are not rounded to bf16
    (which moved thresholds), and they match a bf16-free head on the same features."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from mtmc_pipeline.evaluation.evaluate import predict_logits
    from mtmc_pipeline.runtime import Runtime
    from mtmc_pipeline.training.loader import Normalize
    from mtmc_pipeline.training.models import Preprocess, create_model

    torch.manual_seed(0)
    model = create_model("test_resnet", 5, log=lambda _: None).eval()
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    loader = DataLoader(TensorDataset(images, torch.zeros(6)), batch_size=3)
    runtime = Runtime(torch.device("cpu"), torch.bfloat16)
    normalize = Normalize(Preprocess.for_model(model, 16), runtime.device, channels_last=False)
    logits = predict_logits(model, loader, normalize, runtime)
    assert logits.dtype == np.float32
    as_bf16 = torch.from_numpy(logits).bfloat16().float().numpy()
    assert (as_bf16 != logits).mean() > 0.5  # most values carry more than bf16's 8 bits
    with torch.no_grad(), runtime.autocast():
        features = model.forward_features(normalize(images))
    with torch.no_grad():
        expected = model.forward_head(features.float()).numpy()
    assert logits == pytest.approx(expected, abs=1e-5)
