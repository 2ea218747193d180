"""Multi-label losses, metrics and calibration, checked against torch, torchvision and
scikit-learn computed independently."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from torchvision.ops import sigmoid_focal_loss

from mtmc_pipeline.config import CalibrationConfig, ConfigError, TrainConfig
from mtmc_pipeline.evaluation.calibrate import precision_thresholds, realised_precision
from mtmc_pipeline.evaluation.multilabel_calibrate import (
    MultiLabelCalibrator,
    calibrate_multilabel,
    fit_platt,
    multilabel_table,
)
from mtmc_pipeline.evaluation.multilabel_metrics import (
    co_occurrence,
    multilabel_metrics,
    multilabel_per_class,
)
from mtmc_pipeline.training.losses import build_loss
from mtmc_pipeline.training.multilabel import build_multilabel_loss
from tests.multilabel_reference import sklearn_metrics

NAMES = ["人物", "卡通", "条纹", "格子"]


def _data(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = rng.random((n, 4)) < [0.5, 0.3, 0.1, 0.03]
    logits = rng.normal(0, 1.5, (n, 4)) + 2.5 * truth - 1
    return logits.astype(np.float32).astype(np.float64), truth


def _loss(loss: str, **kw) -> torch.nn.Module:
    return build_multilabel_loss(TrainConfig(loss=loss, **kw), 4)


def test_losses_equal_their_reference_implementations() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 4) * 3
    y = (torch.rand(16, 4) < 0.4).long()
    yf = y.float()
    per_image = lambda t: t.sum(1).mean()  # noqa: E731 - every loss sums classes, means images
    bce = F.binary_cross_entropy_with_logits(x, yf, reduction="none")
    assert _loss("bce", label_smoothing=0)(x, y) == pytest.approx(per_image(bce).item(), rel=1e-5)
    smooth = F.binary_cross_entropy_with_logits(x, yf * 0.8 + 0.1, reduction="none")
    assert _loss("ce", label_smoothing=0.2)(x, y) == pytest.approx(per_image(smooth).item(), 1e-5)
    pw = torch.tensor([1.0, 2.0, 3.0, 0.5])
    weighted = F.binary_cross_entropy_with_logits(x, yf, pos_weight=pw, reduction="none")
    got = build_multilabel_loss(TrainConfig(loss="bce", label_smoothing=0), 4, pos_weight=pw)
    assert got(x, y) == pytest.approx(per_image(weighted).item(), rel=1e-5)
    focal = sigmoid_focal_loss(x, yf, alpha=0.25, gamma=2.0, reduction="none")
    assert _loss("focal", focal_alpha=0.25)(x, y) == pytest.approx(per_image(focal).item(), 1e-5)
    # ASL without focusing and margin is BCE; with them, easy negatives count less
    plain = _loss("asl", asl_gamma_neg=0, asl_gamma_pos=0, asl_clip=0)(x, y)
    assert plain == pytest.approx(per_image(bce).item(), rel=1e-4)
    assert _loss("asl")(x, y) < plain


def test_settings_a_multilabel_or_single_label_task_cannot_use_fail_clearly() -> None:
    with pytest.raises(ConfigError, match="mixup"):
        build_multilabel_loss(TrainConfig(mixup_alpha=0.2), 4)
    with pytest.raises(ConfigError, match="ghm"):
        build_multilabel_loss(TrainConfig(loss="ghm"), 4)
    with pytest.raises(ConfigError, match="multilabel"):
        build_loss(TrainConfig(loss="asl"), 4)


@pytest.mark.parametrize("thresholds", [0.0, np.array([0.3, -0.2, 0.8, np.nan])])
def test_metrics_match_scikit_learn(thresholds: float | np.ndarray) -> None:
    logits, truth = _data()
    th = np.where(np.isnan(thresholds), np.inf, thresholds)
    pred = logits >= th
    m = multilabel_metrics(logits, truth, thresholds)
    expected = sklearn_metrics(truth, pred, logits)
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, abs=1e-12), key
    pc = multilabel_per_class(logits, truth, NAMES, thresholds)
    np.testing.assert_allclose(pc["f1"], f1_score(truth, pred, average=None, zero_division=0))
    np.testing.assert_array_equal(pc["support"], truth.sum(0))
    co = co_occurrence(pred, truth)
    assert np.array_equal(np.diag(co), (pred & truth).sum(0))
    assert co[0, 1] == int((truth[:, 0] & pred[:, 1]).sum())


def test_calibrated_levels_hold_on_held_out_images_and_platt_lowers_nll() -> None:
    logits, truth = _data(4000, seed=1)
    fit, check = slice(0, 2000), slice(2000, 4000)
    levels = [0.5, 0.7, 0.8, 0.9]
    table = multilabel_table(logits[fit], truth[fit], NAMES, levels, min_support=20)
    for c, name in enumerate(NAMES):  # the single-label table, positive = class membership
        own = precision_thresholds(logits[fit, c], truth[fit, c], levels, 20)
        got = table[table["class_name"] == name].reset_index(drop=True)
        np.testing.assert_array_equal(got["threshold"], own["threshold"])
    realised = realised_precision(table, logits[check], truth[check], NAMES, tolerance=0.05)
    checked = realised[realised["n"] >= 30]
    assert len(checked) >= 8 and not checked["flagged"].any()

    # the default lower-bound rule, as for single-label tasks: on 200 val images, a level
    # must be reached by the 0.9 lower confidence bound, so no threshold is looser
    few = slice(0, 200)
    plain = multilabel_table(logits[few], truth[few], NAMES, levels, 10)
    bounded = multilabel_table(logits[few], truth[few], NAMES, levels, 10, fit_confidence=0.9)
    for c, name in enumerate(NAMES):
        own = precision_thresholds(logits[few, c], truth[few, c], levels, 10, 0.9)
        got = bounded[bounded["class_name"] == name].reset_index(drop=True)
        np.testing.assert_array_equal(got["threshold"], own["threshold"])
    both = plain["reachable"] & bounded["reachable"]
    assert (bounded.loc[both, "threshold"] >= plain.loc[both, "threshold"]).all()
    assert (bounded.loc[both, "threshold"] > plain.loc[both, "threshold"]).any()

    squashed = logits[fit, 0] * 0.3  # an over-confident model's logits, scaled back
    a, _ = fit_platt(logits[fit, 0], truth[fit, 0])
    a2, _ = fit_platt(squashed, truth[fit, 0])
    assert a2 == pytest.approx(a / 0.3, rel=1e-3)
    assert fit_platt(logits[fit, 0], np.ones(2000, dtype=bool)) == (1.0, 0.0)


def test_calibration_of_predictions_and_its_calibrator_json() -> None:
    import pandas as pd

    logits, truth = _data(2000, seed=2)
    preds = pd.DataFrame(
        {
            "relpath": [f"{i}.png" for i in range(2000)],
            "split": ["val"] * 1000 + ["test"] * 1000,
            "labels": [list(np.flatnonzero(t)) for t in truth],
            "logits": list(logits.astype(np.float32)),
        }
    )
    cal = calibrate_multilabel(preds, NAMES, CalibrationConfig())
    assert set(cal.table["score_kind"]) == {"logit"}
    levels = CalibrationConfig().levels
    fitted = multilabel_table(logits[:1000], truth[:1000], NAMES, levels, 10, 0.9)
    np.testing.assert_array_equal(cal.table["threshold"], fitted["threshold"])
    assert cal.temperature["nll_after"] <= cal.temperature["nll_before"] + 1e-12
    assert cal.temperature["at_levels"]["split"] == "test"
    at_90 = cal.temperature["at_levels"]["0.9"]
    assert at_90["OP"] >= 0.85  # labels predicted at their 0.9 thresholds are that often right
    assert cal.realised is not None and (cal.realised["score_kind"] == "logit").all()
    again = MultiLabelCalibrator.from_json(cal.calibrator.to_json())
    assert again.platt == cal.calibrator.platt
    conf = again.precision_confidence(logits[:5])
    assert conf.shape == (5, 4) and (conf >= 0).all() and (conf <= 0.98).all()
    with pytest.raises(ValueError, match=r"calibrator\.json: not a valid calibrator"):
        MultiLabelCalibrator.from_json({**cal.calibrator.to_json(), "platt": [[1.0]]})
