"""Precision-threshold tables on scores where the right answer is known, and temperature."""

from __future__ import annotations

import numpy as np
import pytest

from mtmc_pipeline.calibrate import (
    Calibrator,
    calibration_errors,
    fit_temperature,
    precision_thresholds,
    threshold_table,
)
from mtmc_pipeline.metrics import cross_entropy, softmax


def test_known_thresholds() -> None:
    # scores high to low with labels: + + - + - - ; precision at each threshold:
    # t=6: 1/1, t=5: 2/2, t=4: 2/3, t=3: 3/4, t=2: 3/5, t=1: 3/6
    scores = np.array([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    positive = np.array([1, 1, 0, 1, 0, 0], dtype=bool)
    t = precision_thresholds(scores, positive, [0.5, 0.6, 0.7, 0.9, 1.0]).set_index("level")
    # 0.5: every threshold keeps precision >= 0.5 -> the lowest, 1.0
    assert t.loc[0.5, "threshold"] == 1.0 and t.loc[0.5, "support"] == 6
    # 0.6: precision at t=1 is 0.5 < 0.6; at t=2 0.6 and all higher >= 0.6 -> 2.0
    assert t.loc[0.6, "threshold"] == 2.0 and t.loc[0.6, "recall"] == 1.0
    # 0.7: t=3 has 0.75 but t=4 above it has 0.667 -> must stop at 5
    assert t.loc[0.7, "threshold"] == 5.0 and t.loc[0.7, "recall"] == pytest.approx(2 / 3)
    assert t.loc[1.0, "threshold"] == 5.0


def test_unreachable_levels_are_marked_not_invented() -> None:
    scores = np.array([3.0, 2.0, 1.0])
    positive = np.array([0, 1, 1], dtype=bool)  # the top score is a negative
    t = precision_thresholds(scores, positive, [0.1, 0.5])
    assert not t["reachable"].any() and t["threshold"].isna().all()


def test_table_is_monotone_in_level() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 500)
    logits = rng.normal(size=(500, 4)) + 2.5 * np.eye(4)[labels]
    table = threshold_table(logits, labels, list("abcd"), [0.1 + 0.02 * i for i in range(45)])
    for _, part in table[table["reachable"]].groupby(["class_name", "score_kind"]):
        assert (np.diff(part.sort_values("level")["threshold"].to_numpy()) >= 0).all()


def test_calibrator_maps_scores_to_levels() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 2000)
    logits = rng.normal(size=(2000, 3)) + 3.0 * np.eye(3)[labels]
    levels = [0.5, 0.7, 0.9]
    table = threshold_table(logits, labels, ["a", "b", "c"], levels)
    cal = Calibrator.from_table(table, ["a", "b", "c"], 1.0)
    roundtrip = Calibrator.from_json(cal.to_json())
    conf = roundtrip.precision_confidence(logits)
    assert conf.min() >= 0 and conf.max() <= 0.9
    t09 = table.query("class_name == 'a' and score_kind == 'logit' and level == 0.9")["threshold"]
    above = logits[:, 0] >= float(t09.iloc[0])
    assert conf[above, 0] == pytest.approx(0.9)
    # precision among samples the calibrator puts at >= 0.9 really is >= 0.9 here
    assert (labels[conf[:, 0] >= 0.9] == 0).mean() >= 0.9


def test_temperature_scaling_never_raises_nll() -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 5, 400)
    overconfident = (rng.normal(size=(400, 5)) + 1.5 * np.eye(5)[labels]) * 6
    t = fit_temperature(overconfident, labels)
    assert t > 1.5
    assert cross_entropy(overconfident, labels, t) < cross_entropy(overconfident, labels)
    before = calibration_errors(softmax(overconfident), labels)
    after = calibration_errors(softmax(overconfident, t), labels)
    assert after["ece"] < before["ece"] and after["nll"] < before["nll"]
