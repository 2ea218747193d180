"""Class-balanced sampling weights for the training split.

Strategies (``n_c`` = train images of class c, ``N`` = all train images):

- ``none``: every image weight 1.
- ``inverse``: class weight 1 / n_c, every class equally likely.
- ``sqrt_inverse``: 1 / sqrt(n_c), a softer rebalancing.
- ``effective_number``: (1 - beta) / (1 - beta^n_c), Cui et al. 2019, "Class-Balanced Loss
  Based on Effective Number of Samples".
- ``repeat_factor``: max(1, sqrt(t / f_c)) with f_c = n_c / N, the repeat factor sampling
  of LVIS as in mmpretrain's ``ClassBalancedDataset`` (threshold t).

Per-sample weights are scaled to mean 1.0 over the train split; the class table gives each
class's share of the train split before and its expected share of draws after weighting.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mtmc_pipeline.config import SamplingConfig

WEIGHT_COLUMNS = ["relpath", "label", "weight"]
CLASS_TABLE_COLUMNS = [
    "class_name",
    "label",
    "count",
    "class_weight",
    "share_before",
    "expected_share",
]


def class_weights(counts: np.ndarray, config: SamplingConfig) -> np.ndarray:
    """Unnormalised weight of one image of each class, for per-class image ``counts``."""
    n = counts.astype(np.float64)
    if config.strategy == "none":
        return np.ones_like(n)
    if config.strategy == "inverse":
        return 1.0 / n
    if config.strategy == "sqrt_inverse":
        return 1.0 / np.sqrt(n)
    if config.strategy == "effective_number":
        return (1.0 - config.beta) / (1.0 - np.power(config.beta, n))
    if config.strategy == "repeat_factor":
        freq = n / n.sum()
        return np.maximum(1.0, np.sqrt(config.repeat_threshold / freq))
    raise ValueError(f"sampling.strategy: unknown strategy {config.strategy!r}")


def sampling_weights(
    manifest: pd.DataFrame, classes: list[str], config: SamplingConfig | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-sample weights of the train split (mean 1.0) and the per-class table."""
    config = config or SamplingConfig()
    train = manifest[manifest["split"] == "train"]
    counts = np.bincount(train["label"].to_numpy(), minlength=len(classes))
    present = counts > 0
    cw = np.zeros(len(classes))
    cw[present] = class_weights(counts[present], config)
    per_sample = cw[train["label"].to_numpy()]
    scale = len(per_sample) / per_sample.sum() if per_sample.sum() > 0 else 1.0
    weights = pd.DataFrame(
        {
            "relpath": train["relpath"].to_numpy(),
            "label": train["label"].to_numpy(),
            "weight": per_sample * scale,
        }
    )
    mass = counts * cw
    table = pd.DataFrame(
        {
            "class_name": classes,
            "label": np.arange(len(classes)),
            "count": counts,
            "class_weight": cw * scale,
            "share_before": counts / max(counts.sum(), 1),
            "expected_share": mass / mass.sum() if mass.sum() > 0 else mass,
        }
    )
    return weights, table
