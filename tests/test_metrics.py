"""Metrics agree with scikit-learn (and mmpretrain's documented examples), edge cases included."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from mtmc_pipeline.evaluation.metrics import (
    average_precision,
    confusion,
    cross_entropy,
    one_hot,
    one_vs_rest,
    per_class,
    per_class_average_precision,
    row_fractions,
    sigmoid,
    softmax,
    summary_metrics,
    top_k_accuracy,
)

K = 5


def _cases():
    rng = np.random.default_rng(0)
    y = rng.integers(0, K, 300)
    yield "random", y, rng.integers(0, K, 300)
    noisy = np.where(rng.random(300) < 0.7, y, rng.integers(0, K, 300))
    yield "mostly right", y, noisy
    yield "class never predicted", y, np.where(noisy == 3, 2, noisy)
    y_absent = np.where(y == 4, 0, y)
    yield "class absent from split", y_absent, np.where(rng.random(300) < 0.8, y_absent, 4)


@pytest.mark.parametrize(("name", "y", "p"), list(_cases()))
def test_against_sklearn(name: str, y: np.ndarray, p: np.ndarray) -> None:
    labels = list(range(K))
    cm = confusion(y, p, K)
    assert (cm == confusion_matrix(y, p, labels=labels)).all()
    pc = per_class(cm)
    prec, rec, f1, sup = precision_recall_fscore_support(y, p, labels=labels, zero_division=0)
    assert pc["precision"].to_numpy() == pytest.approx(prec)
    assert pc["recall"].to_numpy() == pytest.approx(rec)
    assert pc["f1"].to_numpy() == pytest.approx(f1)
    assert (pc["support"].to_numpy() == sup).all()
    m = summary_metrics(cm)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p))
    present = np.unique(y)
    assert m["balanced_accuracy"] == pytest.approx(
        precision_recall_fscore_support(y, p, labels=present, average="macro", zero_division=0)[1]
    )
    if len(present) == K:
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p))
    for avg in ("macro", "weighted", "micro"):
        ref = precision_recall_fscore_support(y, p, labels=labels, average=avg, zero_division=0)
        assert m[f"{avg}_precision"] == pytest.approx(ref[0])
        assert m[f"{avg}_recall"] == pytest.approx(ref[1])
        assert m[f"{avg}_f1"] == pytest.approx(ref[2])


def test_top_k_and_log_loss_against_sklearn() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(200, K))
    y = rng.integers(0, K, 200)
    for k in (1, 2, 3):
        assert top_k_accuracy(y, logits, k) == pytest.approx(
            top_k_accuracy_score(y, logits, k=k, labels=list(range(K)))
        )
    assert cross_entropy(logits, y) == pytest.approx(
        log_loss(y, softmax(logits), labels=list(range(K)))
    )


def _score_cases():
    """(name, labels, scores): random, tied, and the edge cases of the confusion tests."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, K, 400)
    logits = rng.normal(size=(400, K)) + 2.0 * np.eye(K)[y]
    yield "random softmax", y, softmax(logits)
    yield "random sigmoid", y, sigmoid(logits)
    yield "ties", y, np.round(softmax(logits), 1)
    never = softmax(logits)
    never[:, 3] = 0.01  # class 3 is never above any threshold
    yield "class never predicted", y, never
    y_absent = np.where(y == 4, 0, y)  # class 4 has no image in the split
    yield "class absent from split", y_absent, softmax(logits)


@pytest.mark.parametrize(("name", "y", "scores"), list(_score_cases()))
@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.8])
def test_one_vs_rest_against_sklearn(name: str, y, scores, threshold: float) -> None:
    truth = one_hot(y, K)
    m = one_vs_rest(scores, truth, threshold)
    decisions = (scores >= threshold).astype(int)
    for avg, keys in (("macro", ("CP", "CR", "CF1")), ("micro", ("OP", "OR", "OF1"))):
        ref = precision_recall_fscore_support(
            truth.astype(int), decisions, average=avg, zero_division=0
        )
        assert [m[k] for k in keys] == pytest.approx(list(ref[:3]))


@pytest.mark.parametrize(("name", "y", "scores"), list(_score_cases()))
def test_average_precision_against_sklearn(name: str, y, scores) -> None:
    truth = one_hot(y, K)
    ap = per_class_average_precision(scores, truth)
    for c in range(K):
        if truth[:, c].any():
            assert ap[c] == pytest.approx(average_precision_score(truth[:, c], scores[:, c]))
        else:  # no positive: sklearn warns and gives 0, as mmpretrain does
            assert ap[c] == 0.0
    with warnings.catch_warnings():  # sklearn warns about a class with no positive
        warnings.simplefilter("ignore", UserWarning)
        ref = average_precision_score(truth, scores, average="macro")
    assert ap.mean() == pytest.approx(ref)


def test_matches_mmpretrain_documented_examples() -> None:
    """The examples in the docstrings of mmpretrain's MultiLabelMetric and AveragePrecision."""
    scores = np.array(
        [
            [0.4575, 0.7335, 0.3934, 0.2572],
            [0.1318, 0.1004, 0.8248, 0.6448],
            [0.8349, 0.6294, 0.7896, 0.2061],
            [0.4037, 0.7308, 0.6713, 0.8374],
            [0.3779, 0.4836, 0.0313, 0.0067],
        ]
    )
    truth = np.array([[1, 1, 0, 0], [0, 0, 1, 0], [1, 1, 1, 0], [1, 0, 0, 0], [1, 0, 0, 0]])
    m = one_vs_rest(scores, truth, threshold=0.1)
    assert [100 * m[k] for k in ("CP", "CR", "CF1")] == pytest.approx(
        [42.5, 75.0, 53.1746], abs=1e-4
    )
    onehot_pred = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 1, 0, 0]])
    m = one_vs_rest(onehot_pred.astype(float), truth, threshold=0.5)
    assert [100 * m[k] for k in ("CP", "CR", "CF1")] == pytest.approx(
        [43.75, 31.25, 33.3333], abs=1e-4
    )
    ap_scores = np.array(
        [[0.9, 0.8, 0.3, 0.2], [0.1, 0.2, 0.2, 0.1], [0.7, 0.5, 0.9, 0.3], [0.8, 0.1, 0.1, 0.2]]
    )
    ap_truth = np.array([[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]])
    ap = per_class_average_precision(ap_scores, ap_truth)
    assert 100 * ap == pytest.approx([100.0, 83.3333, 100.0, 0.0], abs=1e-4)
    assert 100 * ap.mean() == pytest.approx(70.8333, abs=1e-4)


def test_average_precision_does_not_depend_on_the_order_of_ties() -> None:
    scores = np.array([0.9, 0.5, 0.5, 0.5, 0.1])
    positive = np.array([1, 0, 1, 0, 1], dtype=bool)
    flipped = np.array([1, 1, 0, 0, 1], dtype=bool)  # same multiset within the tie
    assert average_precision(scores, positive) == average_precision(scores, flipped)
    # one step at 0.9 (P 1, R 1/3), one at 0.5 (P 2/4, R 2/3), one at 0.1 (P 3/5, R 1)
    assert average_precision(scores, positive) == pytest.approx((1 + 0.5 + 0.6) / 3)


def test_sigmoid_is_stable_for_extreme_logits() -> None:
    x = np.array([-1000.0, -30.0, 0.0, 30.0, 1000.0])
    out = sigmoid(x)
    assert np.isfinite(out).all()
    assert out == pytest.approx(1 / (1 + np.exp(-np.clip(x, -700, 700))))


def test_row_fractions_match_scikit_learn_and_leave_an_absent_class_at_zero() -> None:
    y_true, y_pred = np.array([0, 0, 0, 2, 2]), np.array([0, 1, 1, 2, 0])
    cm = confusion(y_true, y_pred, 3)
    expected = confusion_matrix(y_true, y_pred, labels=[0, 1, 2], normalize="true")
    assert row_fractions(cm) == pytest.approx(expected)
    assert (row_fractions(cm)[1] == 0).all()
