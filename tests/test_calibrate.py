"""Precision-threshold tables on scores where the right answer is known, the calibrator's
step confidences, realised precision on test, temperature scaling and calibration errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import brier_score_loss, log_loss

from mtmc_pipeline.config import CalibrationConfig
from mtmc_pipeline.evaluation.calibrate import (
    Calibrator,
    calibrate,
    calibration_errors,
    fit_temperature,
    precision_thresholds,
    realised_precision,
    reliability_bins,
    threshold_table,
)
from mtmc_pipeline.evaluation.metrics import cross_entropy, softmax

LEVELS = [round(0.1 + 0.02 * i, 2) for i in range(45)]


def _by_level(scores, positive, levels=LEVELS, min_support=1) -> pd.DataFrame:
    t = precision_thresholds(
        np.asarray(scores, float), np.asarray(positive, bool), levels, min_support
    )
    return t.set_index("level")


def test_known_thresholds() -> None:
    # scores high to low with labels: + + - + - - ; precision at each threshold:
    # t=6: 1/1, t=5: 2/2, t=4: 2/3, t=3: 3/4, t=2: 3/5, t=1: 3/6
    t = _by_level([6.0, 5.0, 4.0, 3.0, 2.0, 1.0], [1, 1, 0, 1, 0, 0], [0.5, 0.6, 0.7, 0.9, 1.0])
    # 0.5: every threshold keeps precision >= 0.5 -> the lowest, 1.0
    assert t.loc[0.5, "threshold"] == 1.0 and t.loc[0.5, "support"] == 6
    # 0.6: precision at t=1 is 0.5 < 0.6; at t=2 0.6 and all higher >= 0.6 -> 2.0
    assert t.loc[0.6, "threshold"] == 2.0 and t.loc[0.6, "recall"] == 1.0
    # 0.7: t=3 has 0.75 but t=4 above it has 0.667 -> must stop at 5
    assert t.loc[0.7, "threshold"] == 5.0 and t.loc[0.7, "recall"] == pytest.approx(2 / 3)
    assert t.loc[0.7, "precision"] == 1.0 and t.loc[0.7, "support"] == 2
    assert t.loc[1.0, "threshold"] == 5.0


def test_tied_scores_are_kept_or_dropped_together() -> None:
    # scores 3, 2, 2, 1 with labels + + - - : at t=2 both tied samples are in: precision 2/3.
    # Cutting between the two 2s (precision 2/2) is no threshold a score can express.
    t = _by_level([3.0, 2.0, 2.0, 1.0], [1, 1, 0, 0], [0.6, 0.7, 1.0])
    assert t.loc[0.6, "threshold"] == 2.0 and t.loc[0.6, "support"] == 3
    assert t.loc[0.7, "threshold"] == 3.0 and t.loc[0.7, "support"] == 1
    assert t.loc[1.0, "threshold"] == 3.0
    # the tie order in the input does not matter
    swapped = _by_level([3.0, 2.0, 2.0, 1.0], [1, 0, 1, 0], [0.6, 0.7, 1.0])
    assert swapped["threshold"].equals(t["threshold"])


def test_unreachable_levels_are_marked_not_invented() -> None:
    t = _by_level([3.0, 2.0, 1.0], [0, 1, 1], [0.1, 0.5])  # the top score is a negative
    assert not t["reachable"].any() and t["threshold"].isna().all()
    assert (t["support"] == 0).all() and t["precision"].isna().all()


def test_class_with_no_positives_reaches_no_level() -> None:
    t = _by_level([0.9, 0.5, 0.1], [0, 0, 0])
    assert not t["reachable"].any()
    assert (t["recall"] == 0).all() and (t["precision_lower"] == 0).all()


def test_constant_scores_give_one_threshold_up_to_the_prevalence() -> None:
    t = _by_level(np.full(10, 0.7), [1] * 3 + [0] * 7)  # prevalence 0.3
    reached = t[t["reachable"]]
    assert reached.index.max() == pytest.approx(0.3)
    assert (reached["threshold"] == 0.7).all() and (reached["support"] == 10).all()
    assert not t.loc[0.32, "reachable"]


def test_no_scores_at_all() -> None:
    t = _by_level([], [])
    assert not t["reachable"].any() and len(t) == len(LEVELS)


def test_min_support_ignores_thresholds_too_few_images_back() -> None:
    # one negative on top: with min_support 1 no level is reachable. With 3, thresholds that
    # keep fewer than 3 images neither count nor constrain: precision is 2/3, 3/4, 4/5, 4/6
    # from t=7 down, so 0.5 and 0.6 hold down to t=4 and 0.7 holds nowhere
    scores, positive = [9.0, 8.0, 7.0, 6.0, 5.0, 4.0], [0, 1, 1, 1, 1, 0]
    assert not _by_level(scores, positive)["reachable"].any()
    t = _by_level(scores, positive, [0.5, 0.6, 0.7], min_support=3)
    assert list(t["threshold"].iloc[:2]) == [4.0, 4.0]
    assert t.loc[0.5, "precision"] == pytest.approx(4 / 6) and t.loc[0.5, "support"] == 6
    assert not t.loc[0.7, "reachable"]
    t = _by_level(scores, positive, [0.5], min_support=7)  # more than there are images
    assert not t["reachable"].any()


def test_precision_lower_bound_is_clopper_pearson() -> None:
    t = _by_level([2.0, 1.0], [1, 1], [0.9])
    # two hits of two: the one-sided 95% lower bound solves p^2 = 0.05
    assert t.loc[0.9, "precision_lower"] == pytest.approx(0.05**0.5)


def _brute_force(scores: np.ndarray, positive: np.ndarray, level: float) -> float:
    """The definition, literally: the lowest candidate t whose precision, and that of every
    higher candidate, is at least ``level`` (NaN when there is none)."""
    best = np.nan
    for t in sorted(set(scores.tolist()), reverse=True):
        kept = scores >= t
        if positive[kept].mean() < level - 1e-12:
            break
        best = t
    return best


def test_table_matches_the_definition_on_random_scores() -> None:
    rng = np.random.default_rng(4)
    for _ in range(200):
        n = int(rng.integers(1, 30))
        scores = np.round(rng.normal(size=n), int(rng.integers(0, 3)))  # many ties
        positive = rng.random(n) < rng.random()
        t = _by_level(scores, positive)
        expected = [_brute_force(scores, positive, lv) for lv in LEVELS]
        assert np.allclose(t["threshold"].to_numpy(), expected, equal_nan=True)
        assert (t["reachable"] == ~np.isnan(expected)).all()


def test_table_is_monotone_in_level_and_covers_both_score_kinds() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 500)
    logits = rng.normal(size=(500, 4)) + 2.5 * np.eye(4)[labels]
    table = threshold_table(logits, labels, list("abcd"), LEVELS)
    assert set(table["score_kind"]) == {"logit", "softmax"}
    assert len(table) == 2 * 4 * len(LEVELS)
    for _, part in table[table["reachable"]].groupby(["class_name", "score_kind"]):
        assert (np.diff(part.sort_values("level")["threshold"].to_numpy()) >= 0).all()
        assert (part["precision"] >= part["level"] - 1e-12).all()
        assert (part["precision_lower"] <= part["precision"]).all()


def test_non_finite_logits_are_refused_with_a_reason() -> None:
    logits = np.zeros((3, 2))
    logits[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"non-finite logits.*diverged"):
        threshold_table(logits, np.array([0, 1, 0]), ["a", "b"], [0.5])


def _calibrator(thresholds: list[float | None], levels: list[float]) -> Calibrator:
    return Calibrator(["a"], 1.0, levels, {"logit": [thresholds]})


def test_confidence_is_the_highest_level_reached_and_handles_repeated_thresholds() -> None:
    # 0.5, 0.6 and 0.7 share threshold 2.0; 0.8 needs 3.0; 0.9 is unreachable
    cal = _calibrator([2.0, 2.0, 2.0, 3.0, None], [0.5, 0.6, 0.7, 0.8, 0.9])
    scores = np.array([1.99, 2.0, 2.5, 2.999, 3.0, 7.0])
    conf = cal.precision_confidence(scores[:, None])[:, 0]
    # below the lowest threshold: 0; from 2.0 every shared level holds: 0.7, and no more until
    # 0.8's threshold; from 3.0 on the highest reachable level, never the unreachable 0.9
    assert conf == pytest.approx([0.0, 0.7, 0.7, 0.7, 0.8, 0.8])


def test_confidence_selects_exactly_what_each_threshold_selects() -> None:
    """On random score sets with many ties: "confidence >= p" keeps the very images that
    "score >= threshold(p)" keeps, for every reachable level p (also for the softmax kind)."""
    rng = np.random.default_rng(12)
    levels = LEVELS
    for trial in range(40):
        n, k = int(rng.integers(20, 300)), int(rng.integers(2, 5))
        labels = rng.integers(0, k, n)
        logits = np.round(rng.normal(size=(n, k)) + rng.uniform(0, 3) * np.eye(k)[labels], 1)
        names = [f"c{c}" for c in range(k)]
        table = threshold_table(logits, labels, names, levels, int(rng.integers(1, 4)))
        cal = Calibrator.from_json(Calibrator.from_table(table, names, 1.0).to_json())
        for kind in ("logit", "softmax"):
            conf = cal.precision_confidence(logits, kind)
            scores = softmax(logits) if kind == "softmax" else logits
            rows = table[(table["score_kind"] == kind) & table["reachable"]]
            for r in rows.itertuples():
                c = names.index(r.class_name)
                by_threshold = scores[:, c] >= r.threshold
                assert ((conf[:, c] >= r.level) == by_threshold).all(), (trial, kind, r)
                # and what it keeps is right at least that often on these images
                assert (labels[by_threshold] == c).mean() >= r.level - 1e-12


def test_lower_bound_confidence_selects_by_the_precision_lower_of_a_threshold() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 400)
    logits = np.round(rng.normal(size=(400, 2)) + 2.0 * np.eye(2)[labels], 1)
    table = threshold_table(logits, labels, ["a", "b"], LEVELS)
    cal = Calibrator.from_json(Calibrator.from_table(table, ["a", "b"], 1.0).to_json())
    lower = cal.lower_bound_confidence(logits)
    assert (lower <= cal.precision_confidence(logits) + 1e-12).all()
    for c, name in enumerate(["a", "b"]):
        rows = table[(table["score_kind"] == "logit") & (table["class_name"] == name)]
        rows = rows[rows["reachable"]]
        for q in (0.5, 0.8, 0.9):
            meets = rows[rows["precision_lower"] >= q]
            expected = (
                logits[:, c] >= meets["threshold"].min() if len(meets) else np.zeros(400, bool)
            )
            assert ((lower[:, c] >= q) == expected).all()


def test_confidence_is_non_decreasing_in_the_score() -> None:
    rng = np.random.default_rng(5)
    for _ in range(50):
        t = np.sort(np.round(rng.normal(size=6), 1))  # repeats on purpose
        cut = int(rng.integers(0, 7))
        thresholds = [float(v) for v in t[:cut]] + [None] * (6 - cut)
        cal = _calibrator(thresholds, [0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
        s = np.linspace(-4, 4, 801)
        conf = cal.precision_confidence(s[:, None])[:, 0]
        assert (np.diff(conf) >= -1e-12).all()
        for v, lv in zip(thresholds, [0.5, 0.6, 0.7, 0.8, 0.9, 0.95], strict=True):
            if v is not None:  # at its own threshold a score reaches at least its level
                assert cal.precision_confidence(np.array([[v]]))[0, 0] >= lv - 1e-12


def test_calibrator_round_trips_and_keeps_its_promise_on_the_fit_data() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 2000)
    logits = rng.normal(size=(2000, 3)) + 3.0 * np.eye(3)[labels]
    table = threshold_table(logits, labels, ["a", "b", "c"], [0.5, 0.7, 0.9])
    cal = Calibrator.from_table(table, ["a", "b", "c"], 1.3, "fp")
    again = Calibrator.from_json(cal.to_json())
    assert again == cal
    conf = again.precision_confidence(logits)
    assert conf.min() >= 0 and conf.max() <= 0.9
    for c in range(3):
        for level in (0.5, 0.7, 0.9):
            chosen = conf[:, c] >= level
            assert (labels[chosen] == c).mean() >= level
    assert again.temperature_probs(logits) == pytest.approx(softmax(logits, 1.3))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"thresholds": {"logit": [[2.0, 1.0]]}}, "decrease"),
        ({"thresholds": {"logit": [[1.0]]}}, "1 classes x 2 levels"),
        ({"levels": [0.9, 0.5]}, "increasing"),
        ({"temperature": -1}, "positive"),
        ({"thresholds": {"sigmoid": [[1.0, 2.0]]}}, "unknown score kind"),
    ],
)
def test_a_malformed_calibrator_file_is_named(change: dict, message: str) -> None:
    data = {"class_names": ["a"], "temperature": 1.0, "levels": [0.5, 0.9]}
    data |= {"thresholds": {"logit": [[1.0, 2.0]]}, **change}
    with pytest.raises(ValueError, match=f"my/calibrator.json: .*{message}"):
        Calibrator.from_json(data, "my/calibrator.json")


def test_realised_precision_is_measured_and_flagged() -> None:
    val_labels = np.array([0, 0, 0, 1, 1, 1])
    val_logits = np.array([[3.0, 0], [2.0, 0], [1.0, 0], [0, 3.0], [0, 2.0], [0, 1.0]])
    table = threshold_table(val_logits, val_labels, ["a", "b"], [0.5, 0.9])
    # on test, class a's thresholds also select two b images
    test_logits = np.array([[3.0, 0], [2.5, 0.0], [2.5, 1.0], [0, 3.0]])
    test_labels = np.array([0, 1, 1, 1])
    out = realised_precision(table, test_logits, test_labels, ["a", "b"], tolerance=0.05)
    row = out[(out["class_name"] == "a") & (out["score_kind"] == "logit") & (out["level"] == 0.9)]
    assert row["n"].item() == 3 and row["precision"].item() == pytest.approx(1 / 3)
    # 1 of 3: the 95% upper bound is 0.865, so up to 0.53 short is noise; 0.57 short is not
    assert row["allowed"].item() == pytest.approx(0.8647 - 1 / 3, abs=1e-3)
    assert row["flagged"].item()
    b = out[(out["class_name"] == "b") & (out["score_kind"] == "logit")].set_index("level")
    assert not b["flagged"].any()
    assert b.loc[0.9, "n"] == 2 and b.loc[0.9, "precision"] == 1.0


def test_realised_precision_matches_a_row_by_row_count() -> None:
    rng = np.random.default_rng(7)
    names = ["a", "b", "c", "d"]
    val_labels = rng.integers(0, 4, 400)
    val_logits = np.round(rng.normal(size=(400, 4)) + np.eye(4)[val_labels], 1)  # ties
    table = threshold_table(val_logits, val_labels, names, [0.3, 0.5, 0.7, 0.9, 0.99], 3)
    test_labels = rng.integers(0, 3, 60)  # class d has no test image
    test_logits = np.round(rng.normal(size=(60, 4)) + np.eye(4)[test_labels], 1)
    rows = []
    for kind in ("logit", "softmax"):
        scores = softmax(test_logits) if kind == "softmax" else test_logits
        part = table[(table["score_kind"] == kind) & table["reachable"]]
        for r in part.itertuples():
            c = names.index(r.class_name)
            hit = scores[:, c] >= r.threshold
            precision = float((test_labels[hit] == c).mean()) if hit.any() else float("nan")
            rows.append((r.class_name, kind, r.level, r.threshold, int(hit.sum()), precision))
    expected = pd.DataFrame(
        rows, columns=["class_name", "score_kind", "level", "threshold", "n", "precision"]
    )
    assert (~table["reachable"]).any() and (expected["n"] == 0).any()  # both edges are covered
    out = realised_precision(table, test_logits, test_labels, names, tolerance=0.05)
    pd.testing.assert_frame_equal(out.drop(columns=["allowed", "flagged"]), expected)


def _predictions(logits: np.ndarray, labels: np.ndarray, split: str) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "relpath": [f"{split}/{i}.png" for i in range(len(labels))],
            "split": split,
            "label": labels,
            "pred": logits.argmax(1),
            "logits": list(logits.astype(np.float32)),
        }
    )


def test_calibrate_fits_on_val_and_checks_on_test() -> None:
    rng = np.random.default_rng(6)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 3, n)
        return (rng.normal(size=(n, 3)) + 2.0 * np.eye(3)[labels]) * 4, labels

    (vl, vy), (tl, ty) = split(600), split(400)
    preds = pd.concat([_predictions(vl, vy, "val"), _predictions(tl, ty, "test")])
    cal = calibrate(preds, ["x", "y", "z"], CalibrationConfig(), "model-fp")
    assert cal.calibrator.model_fingerprint == "model-fp"
    assert cal.temperature["split"] == "val" and cal.temperature["n"] == 600
    assert cal.temperature["temperature"] > 1  # the logits were scaled up 4x
    assert cal.temperature["nll_after"] < cal.temperature["nll_before"]
    assert cal.temperature["test"]["n"] == 400
    assert cal.temperature["test"]["ece_after"] < cal.temperature["test"]["ece_before"]
    assert cal.realised is not None and set(cal.realised["score_kind"]) == {"logit", "softmax"}
    assert "Realised precision on `test`" in cal.report_md
    assert cal.reliability_png[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibrate_without_val_says_so() -> None:
    preds = _predictions(np.zeros((2, 2)), np.array([0, 1]), "test")
    with pytest.raises(ValueError, match="no val images"):
        calibrate(preds, ["a", "b"], CalibrationConfig())


def test_temperature_scaling_never_raises_nll() -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 5, 400)
    base = rng.normal(size=(400, 5)) + 1.5 * np.eye(5)[labels]
    overconfident, underconfident = base * 6, base / 6
    t = fit_temperature(overconfident, labels)
    assert t > 1.5
    assert cross_entropy(overconfident, labels, t) < cross_entropy(overconfident, labels)
    before = calibration_errors(overconfident, labels)
    after = calibration_errors(overconfident, labels, t)
    assert after["ece"] < before["ece"] and after["nll"] < before["nll"]
    assert fit_temperature(underconfident, labels) < 1
    # labels unrelated to the logits: the best temperature flattens towards uniform, and the
    # NLL still never rises
    noise = rng.normal(size=(400, 5))
    t = fit_temperature(noise, labels)
    assert cross_entropy(noise, labels, t) <= cross_entropy(noise, labels)


def test_reported_nll_is_not_capped_by_a_probability_clip() -> None:
    # the true class 30 logits below the other: -log p = 30 + log(1 + e^-30), where a clip of
    # p at 1e-12 would report log(1e12) = 27.6
    logits = np.array([[30.0, 0.0], [0.0, 5.0]])
    labels = np.array([1, 1])
    errors = calibration_errors(logits, labels)
    assert errors["nll"] == pytest.approx(cross_entropy(logits, labels))
    assert errors["nll"] == pytest.approx((30 + np.log1p(np.exp(-30)) + np.log1p(np.exp(-5))) / 2)


def test_calibration_errors_against_hand_values_and_sklearn() -> None:
    # two images at confidence 0.9, one right and one wrong: one bin, accuracy 0.5
    logits = np.log(np.array([[0.9, 0.1], [0.9, 0.1]]))
    labels = np.array([0, 1])
    errors = calibration_errors(logits, labels)
    assert errors["ece"] == pytest.approx(0.4) and errors["mce"] == pytest.approx(0.4)
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 4, 300)
    logits = rng.normal(size=(300, 4)) * 2
    probs = softmax(logits)
    errors = calibration_errors(logits, labels)
    assert errors["nll"] == pytest.approx(log_loss(labels, probs, labels=[0, 1, 2, 3]))
    assert errors["brier"] == pytest.approx(brier_score_loss(labels, probs, labels=[0, 1, 2, 3]))
    bins = reliability_bins(probs, labels)
    assert bins["count"].sum() == 300 and len(bins) == 15
    gap = (bins["accuracy"] - bins["confidence"]).abs().fillna(0)
    assert errors["ece"] == pytest.approx((gap * bins["count"]).sum() / 300)


def test_high_levels_need_enough_images_not_a_perfect_top() -> None:
    rng = np.random.default_rng(0)
    scores = np.r_[rng.normal(4, 1, 200), rng.normal(-4, 1, 200)]
    positive = np.r_[np.ones(200, dtype=bool), np.zeros(200, dtype=bool)]
    levels = [0.85, 0.9, 0.95, 0.98]
    many = precision_thresholds(scores, positive, levels, min_support=10, fit_confidence=0.9)
    # 200 clean positives prove 0.98 (lower bound 0.1 ** (1 / 200) = 0.989), although the top
    # 10 images alone prove only 0.79
    assert many["reachable"].all()
    assert (np.diff(many["threshold"]) >= 0).all()
    few = precision_thresholds(scores[180:220], positive[180:220], levels, 10, 0.9)
    # 20 clean positives prove 0.1 ** (1 / 20) = 0.89: 0.85 yes, 0.9 and above no
    assert few["reachable"].tolist() == [True, False, False, False]
