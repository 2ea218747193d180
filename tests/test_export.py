"""ONNX export, its parity check, open-set rejection and safe promotion, on a real tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from mtmc_pipeline import artifacts as af
from mtmc_pipeline.artifacts import TaskArtifacts
from mtmc_pipeline.config import ExportConfig, PromotionConfig, load_task_config
from mtmc_pipeline.evaluation.openset import OpenSet, auroc, knn_scores, unknown_scores
from mtmc_pipeline.evaluation.promote import compare, map_predictions
from mtmc_pipeline.runtime import DeviceSettings
from mtmc_pipeline.serving.export import SIDECAR_FILE, ExportError, OnnxModel
from mtmc_pipeline.serving.serve import Registry
from mtmc_pipeline.stages.export import run_export
from mtmc_pipeline.stages.reporting import run_calibration, run_evaluation
from mtmc_pipeline.training.models import MODEL_FILE, load_bundle, save_bundle


def test_export_is_self_describing_and_matches_pytorch(exported: Path) -> None:
    directory = exported / "pattern" / "export"
    sidecar = af.read_json(directory / SIDECAR_FILE)
    assert sidecar["parity"]["passed"]
    assert sidecar["parity"]["max_abs_diff"] <= 1e-4
    assert sidecar["parity"]["top1_agree"] == sidecar["parity"]["images"] > 0
    assert sidecar["speed"]["onnxruntime_images_per_s"] > 0
    assert sidecar["speed"]["pytorch_images_per_s"] > 0
    meta = {p.key: p.value for p in onnx.load(str(directory / "model.onnx")).metadata_props}
    described = json.loads(meta["mtmc"])
    assert described["class_names"] == ["条纹", "格子", "波点", "渐变色", "纯色"]
    assert described["preprocessing"]["img_size"] == 32
    assert described["temperature"] == sidecar["calibrator"]["temperature"] > 0
    assert described["openset"]["kind"] == "energy"

    model = OnnxModel.load(directory)
    torch_model, _ = load_bundle(exported / "pattern" / "model")
    pre = model.preprocess
    for n in (1, 5):  # the batch axis is dynamic
        pixels = np.random.default_rng(n).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float()
        mean = torch.tensor(pre.mean).view(1, 3, 1, 1) * 255
        std = torch.tensor(pre.std).view(1, 3, 1, 1) * 255
        with torch.no_grad():
            expected = torch_model((x - mean) / std).numpy()
        assert np.abs(model.logits(pixels) - expected).max() <= 1e-4


def test_a_tampered_onnx_file_is_refused(exported: Path, tmp_path: Path) -> None:
    copy = tmp_path / "export"
    shutil.copytree(exported / "pattern" / "export", copy)
    with open(copy / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ExportError, match="SHA-256"):
        OnnxModel.load(copy)


def _worse_retrain(art: TaskArtifacts) -> None:
    """A new bundle that always predicts the first class: a retrain gone wrong."""
    model, info = load_bundle(art.model_dir)
    head = model.get_classifier()
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.arange(len(info["class_names"]), 0, -1, dtype=torch.float32))
    save_bundle(art.model_dir, model, {**info, "fingerprint": "worse-retrain"})


def test_a_worse_retrain_is_not_promoted_and_the_old_model_stays_served(
    exported: Path, tiny_root: Path, tmp_path: Path
) -> None:
    root = tmp_path / "artifacts"
    shutil.copytree(exported, root)
    art = TaskArtifacts(root, "pattern")
    task_dir = tiny_root / "pattern"
    served_fp = af.read_json(art.export_dir / SIDECAR_FILE)["model_fingerprint"]
    registry = Registry(root)
    registry.refresh()
    assert registry.tasks["pattern"].fingerprint == served_fp

    _worse_retrain(art)
    cfg = load_task_config(task_dir)
    run_evaluation(task_dir, art, cfg.evaluation, DeviceSettings("cpu"))
    run_calibration(art, cfg.calibration)
    result = run_export(task_dir, art, cfg.export, cfg.promotion)

    assert result.metadata["promoted"] is False
    check = result.checks["no_regression"]
    assert not check.passed and check.severity == "error"
    assert "macro F1" in check.description and "stays served" in check.description
    assert af.read_json(art.export_dir / SIDECAR_FILE)["model_fingerprint"] == served_fp
    rejected = af.read_json(art.rejected_export_dir / SIDECAR_FILE)
    assert rejected["model_fingerprint"] == "worse-retrain"
    registry.refresh()
    assert registry.tasks["pattern"].fingerprint == served_fp

    forced = run_export(task_dir, art, cfg.export, PromotionConfig(force=True))
    assert forced.metadata["promoted"] is True
    assert forced.checks["no_regression"].severity == "warn"
    assert af.read_json(art.export_dir / SIDECAR_FILE)["model_fingerprint"] == "worse-retrain"
    assert not art.rejected_export_dir.exists()
    registry.refresh()
    assert registry.tasks["pattern"].fingerprint == "worse-retrain"
    assert af.read_json(art.model_dir / MODEL_FILE)["fingerprint"] == "worse-retrain"


def test_export_is_reused_for_the_same_inputs(exported: Path, tiny_root: Path) -> None:
    art = TaskArtifacts(exported, "pattern")
    cfg = load_task_config(tiny_root / "pattern")
    again = run_export(tiny_root / "pattern", art, cfg.export, cfg.promotion)
    assert again.reused and again.checks["onnx_parity"].passed


def test_promotion_tolerates_noise_but_not_a_recall_drop() -> None:
    names = ["a", "b", "c"]
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    served = labels.copy()
    same = compare(labels, served, served, names, 0.0, 0.05, "test")
    assert same.promoted
    lost_c = np.where(labels == 2, 0, labels)  # class c never predicted any more
    worse = compare(labels, lost_c, served, names, 0.5, 0.05, "test")
    assert not worse.promoted and worse.summary["classes_worse"] == ["c"]
    one_miss = labels.copy()
    one_miss[0] = 1
    assert not compare(labels, one_miss, served, names, 0.0, 0.3, "test").promoted  # F1 < served
    assert compare(labels, one_miss, served, names, 0.1, 0.3, "test").promoted
    # a served model with another class list: its predictions are mapped by name
    assert map_predictions(np.array([0, 1]), ["b", "z"], names).tolist() == [1, -1]


def test_unknown_threshold_rejects_the_chosen_share_of_known_images() -> None:
    rng = np.random.default_rng(0)
    known = rng.normal(0, 1, (1000, 4))
    known[np.arange(1000), rng.integers(0, 4, 1000)] += 6  # confident known images
    unknown = rng.normal(0, 1, (500, 4))  # no class stands out
    rejector = OpenSet.fit(known, "energy", 0.05, "synthetic")
    rejected = (rejector.scores(known) > rejector.threshold).mean()
    assert 0.04 <= rejected <= 0.06
    assert (rejector.scores(unknown) > rejector.threshold).mean() > 0.9
    for kind in ("energy", "max_logit"):
        assert auroc(unknown_scores(known, kind), unknown_scores(unknown, kind)) > 0.95
    assert OpenSet.from_json(rejector.to_json()) == rejector
    with pytest.raises(ValueError, match=r"openset\.json"):
        OpenSet.from_json({"kind": "softmax", "threshold": 0, "false_reject_rate": 0.05})
    bank = np.eye(3)
    assert knn_scores(bank, np.array([[1.0, 0, 0], [1.0, 1.0, 1.0]]), k=1).tolist()[0] == 0


def test_export_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError):
        ExportConfig(false_reject_rate=0)
    with pytest.raises(ValueError):
        PromotionConfig(recall_tolerance=2)
