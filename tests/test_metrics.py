"""Metrics from the confusion matrix agree with scikit-learn, edge cases included."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from mtmc_pipeline.metrics import (
    confusion,
    cross_entropy,
    per_class,
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
