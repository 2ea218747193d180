"""Adaptive class balancing (MTMC-Pytorch's): draw more of the classes the model gets wrong.

Every ``sampling.adaptive_period`` epochs each class's share of the training draws is re-set
to ``M + (1 - metric) * (N - M)`` (N = 2M unless set), from the class's validation recall
(default) or precision. MTMC-Pytorch uses precision; recall is the default here because a
class with low recall is one the model misses, which more draws of it address, while low
precision means other classes are predicted as this one, which more draws of it make worse.
The number of draws per epoch stays the train split's size, so the learning-rate schedule
keeps its length.
"""

from __future__ import annotations

import numpy as np

from mtmc_pipeline.config import SamplingConfig


def per_class_metric(cm: np.ndarray, metric: str) -> np.ndarray:
    """Recall (rows: true class) or precision (columns: predicted) of every class.

    A class without validation images (recall) or never predicted (precision) counts as 0:
    nothing says the model has learned it.
    """
    totals = cm.sum(axis=1 if metric == "recall" else 0).astype(np.float64)
    hits = np.diag(cm).astype(np.float64)
    return np.divide(hits, totals, out=np.zeros_like(hits), where=totals > 0)


def class_shares(metric: np.ndarray, config: SamplingConfig) -> np.ndarray:
    """Each class's share of the draws (sums to 1): M + (1 - metric) * (N - M), normalised."""
    low = config.adaptive_min
    high = config.adaptive_max if config.adaptive_max is not None else 2 * low
    raw = low + (1 - np.clip(metric, 0, 1)) * (high - low)
    return raw / raw.sum()


def draw_weights(labels: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """Per-image weights (mean 1) that give class ``j`` the share ``shares[j]`` of the draws.

    Classes absent from ``labels`` get no draws; the others' shares are renormalised.
    """
    counts = np.bincount(labels, minlength=len(shares)).astype(np.float64)
    present = np.where(counts > 0, shares, 0.0)
    per_image = present[labels] / counts[labels]
    return per_image * len(labels) / per_image.sum()
