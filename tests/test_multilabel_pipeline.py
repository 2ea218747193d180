"""A multi-label task through every stage (a tiny model, two epochs), and the figures it writes
recomputed independently from its predictions.parquet: metrics.json against scikit-learn and
the mmpretrain formulas, calibration against its own table, predict against the calibrator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import precision_score

from mtmc_pipeline import stages
from mtmc_pipeline.artifacts import TaskArtifacts
from mtmc_pipeline.config import load_task_config
from mtmc_pipeline.demo import MULTI_CLASSES, MULTI_MISSING, WARM, write_multilabel
from mtmc_pipeline.evaluation.multilabel_calibrate import MultiLabelCalibrator
from mtmc_pipeline.runtime import DeviceSettings, resolve_runtime
from mtmc_pipeline.serving.predict import COLUMNS, Predictor, decode_image
from mtmc_pipeline.stages.reporting import run_calibration, run_evaluation
from mtmc_pipeline.stages.training import run_training
from tests.multilabel_reference import per_class_ap, sklearn_metrics

TASK_YAML = """\
kind: multilabel
split:
  test_fraction: 0.25
train:
  model: test_resnet
  img_size: 32
  pretrained: false
  epochs: 2
  batch_size: 16
  optimizer: adamw
  lr: 0.01
  loss: asl
  pos_weight: true
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TaskArtifacts]:
    task_dir = tmp_path_factory.mktemp("data") / "组合图案"
    write_multilabel(task_dir, n=64)
    (task_dir / "task.yaml").write_text(TASK_YAML, "utf-8")
    cfg = load_task_config(task_dir)
    art = TaskArtifacts(tmp_path_factory.mktemp("artifacts"), task_dir.name)
    stages.run_inventory(task_dir, art, cfg.scan)
    stages.run_integrity(task_dir, art, cfg.integrity)
    stages.run_splits(art, cfg.split)
    stages.run_sampling(art, cfg.sampling)
    run_training(task_dir, art, cfg.train, DeviceSettings("cpu"), lambda _: None)
    run_evaluation(task_dir, art, cfg.evaluation, DeviceSettings("cpu"))
    run_calibration(art, cfg.calibration)
    return task_dir, art


def _split(preds: pd.DataFrame, split: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    part = preds[preds["split"] == split]
    truth = np.zeros((len(part), k), dtype=bool)
    for r, labels in enumerate(part["labels"]):
        truth[r, list(labels)] = True
    return np.stack(part["logits"].to_numpy()).astype(np.float64), truth


def test_metrics_json_matches_scikit_learn_on_predictions(trained) -> None:
    _, art = trained
    model = json.loads((art.model_dir / "model.json").read_text("utf-8"))
    assert model["kind"] == "multilabel"
    assert model["class_names"] == sorted([*MULTI_CLASSES, WARM])
    metrics = json.loads((art.evaluation_dir / "metrics.json").read_text("utf-8"))
    preds = pd.read_parquet(art.evaluation_dir / "predictions.parquet")
    assert metrics["kind"] == "multilabel" and set(metrics["by_split"]) == {"val", "test"}
    k = len(model["class_names"])
    for split, m in metrics["by_split"].items():
        logits, truth = _split(preds, split, k)
        probs = 1 / (1 + np.exp(-logits))
        pred = probs >= metrics["ovr_threshold"]
        stored = np.zeros_like(pred)
        for r, p in enumerate(preds.loc[preds["split"] == split, "pred"]):
            stored[r, list(p)] = True
        assert np.array_equal(stored, pred)
        expected = sklearn_metrics(truth, pred, logits)
        expected["n"] = len(truth)
        for key, value in expected.items():
            assert m[key] == pytest.approx(value, abs=1e-6), (split, key)
    assert metrics["mAP"] == metrics["by_split"]["test"]["mAP"]
    per_class = pd.read_parquet(art.evaluation_dir / "per_class.parquet")
    test_pc = per_class[per_class["split"] == "test"]
    logits, truth = _split(preds, "test", k)
    aps = per_class_ap(truth, logits)
    np.testing.assert_allclose(test_pc["average_precision"], aps, atol=1e-6)
    co = pd.read_parquet(art.evaluation_dir / "confusion.parquet")
    diagonal = co[(co["split"] == "test") & (co["true_label"] == co["pred_label"])]
    tp = ((logits >= 0) & truth).sum(0)
    assert list(diagonal["count"]) == list(tp)
    assert "Multi-label evaluation" in (art.evaluation_dir / "report.md").read_text("utf-8")


def test_calibration_table_and_levels_checked_on_test(trained) -> None:
    _, art = trained
    table = pd.read_parquet(art.calibration_dir / "calibration.parquet")
    names = json.loads((art.model_dir / "model.json").read_text("utf-8"))["class_names"]
    assert set(table["class_name"]) == set(names) and set(table["score_kind"]) == {"logit"}
    scaling = json.loads((art.calibration_dir / "temperature.json").read_text("utf-8"))
    assert set(scaling["platt"]) == set(names)
    assert scaling["nll_after"] <= scaling["nll_before"] + 1e-9
    preds = pd.read_parquet(art.evaluation_dir / "predictions.parquet")
    logits, truth = _split(preds, "test", len(names))
    realised = pd.read_parquet(art.calibration_dir / "realised_precision.parquet")
    for r in realised.sample(min(len(realised), 20), random_state=0).itertuples():
        c = names.index(r.class_name)
        kept = logits[:, c] >= r.threshold
        assert r.n == kept.sum()
        if r.n:
            assert r.precision == pytest.approx(truth[kept, c].mean())
    at_90 = scaling["at_levels"]["0.9"]
    th = table[np.isclose(table["level"], 0.9)].set_index("class_name")["threshold"]
    pred = logits >= np.nan_to_num(th.reindex(names).to_numpy(), nan=np.inf)
    assert at_90["OP"] == pytest.approx(
        precision_score(truth, pred, average="micro", zero_division=0)
    )


def test_predict_returns_the_label_set_at_the_precision_asked(trained) -> None:
    task_dir, art = trained
    predictor = Predictor(art.dir, resolve_runtime("cpu"))
    paths = sorted((task_dir / "images").glob("*.png"))[:12]
    df = predictor.predict(paths, min_precision=0.5)
    assert list(df.columns) == list(COLUMNS) and df["error"].isna().all()
    assert df["softmax_prob"].isna().all()  # no softmax over independent labels
    calibrator = MultiLabelCalibrator.from_json(
        json.loads((art.calibration_dir / "calibrator.json").read_text("utf-8"))
    )
    batch = np.stack([decode_image(p, predictor.pre) for p in paths])
    conf = calibrator.precision_confidence(predictor.logits(batch))
    for k, labels in enumerate(df["labels_at_min_precision"]):
        expected = [calibrator.class_names[j] for j in np.flatnonzero(conf[k] >= 0.5)]
        assert sorted(labels) == sorted(expected)
    assert (df["temperature_prob"].between(0, 1)).all()


def test_demo_task_is_deterministic_and_rewrites_nothing(tmp_path: Path) -> None:
    assert write_multilabel(tmp_path / "a", n=20) == 21  # images + labels.csv
    write_multilabel(tmp_path / "b", n=20)
    assert write_multilabel(tmp_path / "a", n=20) == 0
    for name in ("labels.csv", "images/0007.png", "task.yaml"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    rows = (tmp_path / "a" / "labels.csv").read_text("utf-8").splitlines()
    assert rows[0] == "relpath,labels" and rows[-1].startswith(MULTI_MISSING)  # planted
    assert all(2 <= r.count(";") + 1 <= 4 for r in rows[1:-1])  # 2-3 textures, maybe warm
