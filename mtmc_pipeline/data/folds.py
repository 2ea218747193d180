"""Stratified k-fold assignment that stays put as the data grows.

Within each class, files already assigned keep their fold; every other file, in the order of
a seeded hash of its content, goes to the fold that has the fewest files of its class so far
(the lowest-numbered on ties). Each class is therefore spread over the folds as evenly as its
count allows, and adding images never moves an existing image to another fold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd


def previous_folds(previous: pd.DataFrame | None, folds: int) -> dict[str, int]:
    """content_hash -> fold of the last manifest (files it gave a fold below ``folds``)."""
    if previous is None or "fold" not in previous.columns:
        return {}
    kept = previous[previous["fold"].notna()]
    pairs = zip(kept["content_hash"], kept["fold"].astype(int), strict=True)
    return {h: f for h, f in pairs if f < folds}


def assign_folds(
    classes: Sequence[str],
    content_hashes: Sequence[str],
    order: Sequence[float],
    folds: int,
    previous: Mapping[str, int] | None = None,
) -> np.ndarray:
    """A fold in [0, folds) for each file, given its class, content hash and hash order."""
    previous = previous or {}
    frame = pd.DataFrame({"cls": list(classes), "hash": list(content_hashes), "u": list(order)})
    out = np.full(len(frame), -1, dtype=np.int64)
    for _, group in frame.sort_values("u").groupby("cls", sort=False):
        counts = np.zeros(folds, dtype=np.int64)
        kept = group["hash"].map(previous)
        for i, fold in zip(group.index[kept.notna()], kept.dropna().astype(int), strict=True):
            out[i] = fold
            counts[fold] += 1
        for i in group.index[kept.isna()]:  # in hash order
            out[i] = int(np.argmin(counts))
            counts[out[i]] += 1
    return out
