"""Sampling weights: exact values for every strategy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mtmc_pipeline.config import SamplingConfig
from mtmc_pipeline.data.sampling import class_weights, sampling_weights

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


def test_per_sample_weights_and_shares_exact() -> None:
    # sqrt_inverse on 100/25/4: class weights 1/10, 1/5, 1/2; mass 10 + 5 + 2 = 17
    weights, table = sampling_weights(
        _manifest(COUNTS), ["a", "b", "c"], SamplingConfig(strategy="sqrt_inverse")
    )
    scale = 129 / 17  # makes the mean over the 129 train images exactly 1
    assert table["class_weight"].tolist() == pytest.approx([scale / 10, scale / 5, scale / 2])
    assert table["expected_share"].tolist() == pytest.approx([10 / 17, 5 / 17, 2 / 17])
    assert table["share_before"].tolist() == pytest.approx([100 / 129, 25 / 129, 4 / 129])
    by_label = weights.groupby("label")["weight"].agg(["min", "max", "size"])
    assert by_label["min"].tolist() == pytest.approx([scale / 10, scale / 5, scale / 2])
    assert (by_label["min"] == by_label["max"]).all()
    assert by_label["size"].tolist() == [100, 25, 4]


def test_repeat_factor_exact_against_the_mmpretrain_rule() -> None:
    # f_c = n_c / N; r_c = max(1, sqrt(t / f_c)): with t = 0.3 the classes of 25 and 4 repeat
    _, table = sampling_weights(
        _manifest(COUNTS),
        ["a", "b", "c"],
        SamplingConfig(strategy="repeat_factor", repeat_threshold=0.3),
    )
    r = np.array([1.0, np.sqrt(0.3 * 129 / 25), np.sqrt(0.3 * 129 / 4)])
    mass = COUNTS * r
    assert table["expected_share"].tolist() == pytest.approx((mass / mass.sum()).tolist())
    assert table["class_weight"].tolist() == pytest.approx((r * 129 / mass.sum()).tolist())


def test_only_train_rows_are_weighted() -> None:
    manifest = pd.concat(
        [_manifest(np.array([3, 1])), _manifest(np.array([5, 5])).assign(split="val")]
    )
    weights, table = sampling_weights(manifest, ["a", "b"], SamplingConfig())
    assert len(weights) == 4 and table["count"].tolist() == [3, 1]
    assert weights["weight"].tolist() == pytest.approx([2 / 3, 2 / 3, 2 / 3, 2.0])
