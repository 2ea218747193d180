"""Sampling weights: exact values for every strategy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mtmc_pipeline.config import SamplingConfig
from mtmc_pipeline.sampling import class_weights, sampling_weights

COUNTS = np.array([100, 25, 4])


def _manifest(counts: np.ndarray) -> pd.DataFrame:
    labels = np.repeat(np.arange(len(counts)), counts)
    return pd.DataFrame(
        {"relpath": [f"{i}.png" for i in range(len(labels))], "label": labels, "split": "train"}
    )


@pytest.mark.parametrize(
    ("strategy", "extra", "expected"),
    [
        ("none", {}, [1.0, 1.0, 1.0]),
        ("inverse", {}, [1 / 100, 1 / 25, 1 / 4]),
        ("sqrt_inverse", {}, [1 / 10, 1 / 5, 1 / 2]),
        (
            "effective_number",
            {"beta": 0.9},
            [0.1 / (1 - 0.9**100), 0.1 / (1 - 0.9**25), 0.1 / (1 - 0.9**4)],
        ),
        # f = 100/129, 25/129, 4/129; r = max(1, sqrt(0.1 / f))
        ("repeat_factor", {"repeat_threshold": 0.1}, [1.0, 1.0, np.sqrt(0.1 * 129 / 4)]),
    ],
)
def test_class_weights_exact(strategy: str, extra: dict, expected: list[float]) -> None:
    cfg = SamplingConfig(strategy=strategy, **extra)
    assert class_weights(COUNTS, cfg) == pytest.approx(expected)


@pytest.mark.parametrize(
    "strategy", ["none", "inverse", "sqrt_inverse", "effective_number", "repeat_factor"]
)
def test_weights_have_mean_one_and_shares_add_up(strategy: str) -> None:
    weights, table = sampling_weights(
        _manifest(COUNTS), ["a", "b", "c"], SamplingConfig(strategy=strategy)
    )
    assert weights["weight"].mean() == pytest.approx(1.0)
    assert table["expected_share"].sum() == pytest.approx(1.0)
    assert table["share_before"].tolist() == pytest.approx((COUNTS / COUNTS.sum()).tolist())
    raw = class_weights(COUNTS, SamplingConfig(strategy=strategy))
    expected_share = COUNTS * raw / (COUNTS * raw).sum()
    assert table["expected_share"].tolist() == pytest.approx(expected_share.tolist())


def test_inverse_frequency_balances_classes() -> None:
    _, table = sampling_weights(_manifest(COUNTS), ["a", "b", "c"], SamplingConfig())
    assert table["expected_share"].tolist() == pytest.approx([1 / 3] * 3)
    assert table["count"].tolist() == COUNTS.tolist()


def test_class_without_train_images_gets_zero_weight() -> None:
    _, table = sampling_weights(_manifest(np.array([5, 5])), ["a", "b", "c"], SamplingConfig())
    assert table.loc[2, "count"] == 0 and table.loc[2, "class_weight"] == 0
