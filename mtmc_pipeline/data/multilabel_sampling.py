"""Sampling weights of multi-label tasks: class weights combined over each image's labels.

Each class gets the weight of its strategy (:func:`mtmc_pipeline.data.sampling.class_weights`)
from ``n_c``, the train images carrying label c; an image's weight is the max over its labels
(LVIS repeat factor sampling, Gupta et al. 2019: r_i = max_c r_c) or their mean
(``sampling.multilabel_combine``). An image without a label gets the smallest class weight:
it is never drawn more often than the commonest class. Weights have mean 1.0 over train.

The class table's ``expected_share`` is the expected share of draws that carry each label
(shares can sum to more than 1: one draw carries several labels).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mtmc_pipeline.config import SamplingConfig
from mtmc_pipeline.data.multilabel_splits import indicator
from mtmc_pipeline.data.sampling import class_weights


def multilabel_sampling_weights(
    manifest: pd.DataFrame, classes: list[str], config: SamplingConfig
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-sample weights of the train split (mean 1.0) and the per-class table."""
    train = manifest[manifest["split"] == "train"]
    y = indicator(train["labels"], len(classes))
    counts = y.sum(0)
    present = counts > 0
    cw = np.zeros(len(classes))
    cw[present] = class_weights(counts[present], config)
    floor = cw[present].min() if present.any() else 1.0
    masked = np.where(y, cw[None, :], np.nan)
    has_label = y.any(1)
    per_sample = np.full(len(train), floor)
    if has_label.any():
        combine = np.nanmax if config.multilabel_combine == "max" else np.nanmean
        per_sample[has_label] = combine(masked[has_label], axis=1)
    scale = len(per_sample) / per_sample.sum() if per_sample.sum() > 0 else 1.0
    weights = pd.DataFrame(
        {
            "relpath": train["relpath"].to_numpy(),
            "label": train["label"].to_numpy(),
            "weight": per_sample * scale,
        }
    )
    mass = (y * per_sample[:, None]).sum(0)
    table = pd.DataFrame(
        {
            "class_name": classes,
            "label": np.arange(len(classes)),
            "count": counts,
            "class_weight": cw * scale,
            "share_before": counts / max(len(train), 1),
            "expected_share": mass / per_sample.sum() if per_sample.sum() > 0 else mass,
        }
    )
    return weights, table
