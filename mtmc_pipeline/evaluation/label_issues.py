"""Suspected label errors: out-of-fold probabilities from k fold models, ranked by cleanlab.

Confident learning (cleanlab's ``find_label_issues``) needs, for every image, class
probabilities from a model that was not trained on that image. The train and val images are
dealt into k stratified folds (:func:`mtmc_pipeline.data.folds.assign_folds`); for each fold
a model is trained with the task's own recipe on the other k - 1 folds, and its softmax on the
held-out fold is that fold's out-of-fold probabilities. The held-out fold also picks the
fold model's best epoch (the training loop needs a validation set): one number chosen on it,
never a weight, so its probabilities stay out of sample in the sense cleanlab needs.

Test images take no part: they stay unseen by everything, as the headline metrics require.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy.special import softmax
from torch import nn

from mtmc_pipeline.data.folds import assign_folds
from mtmc_pipeline.data.splits import TaskDataError, unit_hash
from mtmc_pipeline.evaluation.evaluate import predict_logits
from mtmc_pipeline.runtime import Runtime
from mtmc_pipeline.training.loader import (
    CachedImageDataset,
    DecodedCache,
    Normalize,
    inference_loader,
)
from mtmc_pipeline.training.models import Preprocess

POOL_SPLITS = ("train", "val")
ISSUE_COLUMNS = [
    "rank",
    "relpath",
    "split",
    "given_label",
    "suggested_label",
    "self_confidence",
    "label_score",
    "is_label_issue",
    "fold",
    "probabilities",
]
_FOLD_SALT = "label_fold"


def fold_pool(manifest: pd.DataFrame, folds: int, seed: int) -> pd.DataFrame:
    """The train and val rows of the manifest, each with a stratified ``label_fold``."""
    pool = manifest[manifest["split"].isin(POOL_SPLITS)].reset_index(drop=True)
    if len(pool) < 2 * folds:
        raise TaskDataError(
            f"label_quality.folds = {folds} needs at least {2 * folds} train and val images, "
            f"the task has {len(pool)}"
        )
    hashes = pool["content_hash"]
    order = [unit_hash(seed, h, _FOLD_SALT) for h in hashes]
    return pool.assign(label_fold=assign_folds(pool["class_name"], hashes, order, folds))


def fold_manifest(pool: pd.DataFrame, fold: int) -> pd.DataFrame:
    """A manifest that trains on the other folds and holds ``fold`` out as its ``val``."""
    split = np.where(pool["label_fold"] == fold, "val", "train")
    return pool.drop(columns="label_fold").assign(split=split)


def held_out_probabilities(
    model: nn.Module,
    preprocess: Preprocess,
    rows: pd.DataFrame,
    cache: DecodedCache,
    runtime: Runtime,
) -> np.ndarray:
    """Softmax probabilities (N x C, float32) of ``rows`` (already in ``cache``)."""
    ds = CachedImageDataset(cache, rows["content_hash"], rows["label"])
    loader = inference_loader(ds, runtime.inference_batch_size, runtime)
    normalize = Normalize(preprocess, runtime.device, runtime.channels_last)
    logits = predict_logits(model, loader, normalize, runtime)
    return softmax(logits.astype(np.float64), axis=1).astype(np.float32)


def rank_label_issues(
    pool: pd.DataFrame,
    classes: list[str],
    probabilities: np.ndarray,
    method: str,
    filter_by: str,
) -> pd.DataFrame:
    """One row per pool image, most suspect first: ``rank`` 1 has the lowest label score.

    ``is_label_issue`` is cleanlab's verdict (``find_label_issues`` with ``filter_by``);
    ``label_score`` is cleanlab's label quality score by ``method`` (lower: more likely
    mislabelled), which orders every image, flagged or not.
    """
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = pool["label"].to_numpy()
    scores = get_label_quality_scores(labels, probabilities, method=method)
    flagged = find_label_issues(labels, probabilities, filter_by=filter_by, n_jobs=1)
    rank = np.empty(len(pool), dtype=np.int64)
    rank[np.argsort(scores, kind="stable")] = np.arange(1, len(pool) + 1)
    names = np.array(classes, dtype=object)
    table = pd.DataFrame(
        {
            "rank": rank,
            "relpath": pool["relpath"].to_numpy(),
            "split": pool["split"].to_numpy(),
            "given_label": names[labels],
            "suggested_label": names[probabilities.argmax(1)],
            "self_confidence": probabilities[np.arange(len(pool)), labels].astype(np.float64),
            "label_score": scores.astype(np.float64),
            "is_label_issue": flagged,
            "fold": pool["label_fold"].to_numpy(),
            "probabilities": list(probabilities),
        }
    )
    return table.sort_values("rank", ignore_index=True)[ISSUE_COLUMNS]


def review_suggestions(table: pd.DataFrame) -> pd.DataFrame:
    """The flagged images as ``review.csv`` rows (relabel to the suggestion), to copy from."""
    flagged = table[table["is_label_issue"]]
    return pd.DataFrame(
        {
            "relpath": flagged["relpath"],
            "action": "relabel",
            "new_label": flagged["suggested_label"],
            "given_label": flagged["given_label"],
            "self_confidence": flagged["self_confidence"].round(4),
        }
    )


def summary(table: pd.DataFrame, folds: int, method: str, filter_by: str) -> dict[str, Any]:
    """The counts the UI and the report show."""
    flagged = table[table["is_label_issue"]]
    return {
        "images": len(table),
        "folds": folds,
        "method": method,
        "filter_by": filter_by,
        "label_issues": len(flagged),
        "label_issue_share": round(len(flagged) / max(len(table), 1), 4),
        "out_of_fold_accuracy": round(
            float((table["given_label"] == table["suggested_label"]).mean()), 4
        ),
        "issues_by_given_label": flagged["given_label"].value_counts().to_dict(),
    }
