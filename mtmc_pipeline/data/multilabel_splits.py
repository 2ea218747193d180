"""Split manifests of multi-label tasks: iterative stratification, stable as the data grows.

Iterative stratification (Sechidis, Tsoumakas and Vlahavas 2011, "On the Stratification of
Multi-Label Data"): every split wants its share of each label's images; the label with the
fewest images still to place goes first, and each of its images goes to the split that still
wants that label most (then the split that wants the most images). Ties are broken by a seeded
hash of the image's content, so the result depends only on the data and the seed.

Stability: images already in the previous manifest (same settings) keep their split and are
counted against each split's wants first; only new images are placed. Split folders
(``val/``, ``test/``) and the splits of a shared group's leader are honoured as in
single-label manifests. (The ``iterative-stratification`` package implements the same
algorithm as a k-fold splitter, with no way to keep earlier assignments; hence this small
implementation.)

Manifest contract (on top of the single-label columns): ``labels`` is the sorted list of class
indices of each image (empty: no label), ``class_name`` their names joined by ``;`` and
``label`` is -1. The schema metadata holds the class list and ``mtmc.kind = multilabel``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from mtmc_pipeline.config import SplitConfig
from mtmc_pipeline.data.labels import SEPARATOR, label_classes
from mtmc_pipeline.data.splits import (
    SPLIT_COLUMNS,
    TaskDataError,
    pinned_splits,
    splits_schema,
    unit_hash,
)

KIND_KEY = b"mtmc.kind"
MULTILABEL = "multilabel"
MULTILABEL_COLUMNS = [*SPLIT_COLUMNS, "labels"]
_SPLIT_ORDER = {"train": 0, "none": 0, "val": 1, "test": 2}


def iterative_stratification(
    indicator: np.ndarray,
    fractions: np.ndarray,
    tie_break: np.ndarray,
    pinned: np.ndarray | None = None,
) -> np.ndarray:
    """Split index (into ``fractions``) of every row of the N x C boolean ``indicator``.

    ``pinned`` holds a split index for rows already placed, -1 for rows to place; the wants
    of each split are computed over all rows, pinned rows count against them.
    ``tie_break`` (N floats) orders images and splits where the algorithm has no preference.
    """
    y = indicator.astype(bool)
    n, _ = y.shape
    out = np.full(n, -1, dtype=np.int64) if pinned is None else pinned.astype(np.int64).copy()
    want_label = fractions[:, None] * y.sum(0)[None, :].astype(np.float64)  # splits x classes
    want_total = fractions * n
    for j in range(len(fractions)):
        placed = out == j
        want_label[j] -= y[placed].sum(0)
        want_total[j] -= placed.sum()
    todo = out < 0
    while todo.any():
        remaining = y[todo].sum(0)
        if not remaining.any():  # images without a (remaining) label: by total want
            for i in np.flatnonzero(todo)[np.argsort(tie_break[todo], kind="stable")]:
                j = _pick(want_total, want_total, tie_break[i])
                out[i], todo[i] = j, False
                want_total[j] -= 1
            break
        label = int(np.argmin(np.where(remaining > 0, remaining, np.iinfo(np.int64).max)))
        rows = np.flatnonzero(todo & y[:, label])
        for i in rows[np.argsort(tie_break[rows], kind="stable")]:
            j = _pick(want_label[:, label], want_total, tie_break[i])
            out[i], todo[i] = j, False
            want_label[j] -= y[i]
            want_total[j] -= 1
    return out


def _pick(primary: np.ndarray, secondary: np.ndarray, u: float) -> int:
    """The split with the largest ``primary`` want, then ``secondary``; a hash decides ties."""
    best = np.flatnonzero(np.isclose(primary, primary.max()))
    if len(best) > 1:
        best = best[np.isclose(secondary[best], secondary[best].max())]
    return int(best[int(u * len(best))])


def make_multilabel_splits(
    usable: pd.DataFrame,
    config: SplitConfig,
    previous: pd.DataFrame | None = None,
    task: str = "task",
    declared: list[str] | None = None,
    leader: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, list[str]]:
    """The multi-label manifest (one row per distinct image) and the ordered class list.

    ``usable`` are integrity rows with a ``labels`` column (class names); copies of one image
    in one split (several class folders) become one row with the union of their labels.
    ``leader``: the manifest of the first member of this task's shared group.
    """
    if usable.empty:
        raise TaskDataError(f"task {task!r}: no usable images (see its integrity report)")
    df = usable.assign(_s=usable["split_dir"].map(_SPLIT_ORDER)).sort_values(["_s", "relpath"])
    union = df.groupby("content_hash")["labels"].agg(lambda s: sorted({c for x in s for c in x}))
    df = df.drop_duplicates("content_hash").reset_index(drop=True)
    df["labels"] = df["content_hash"].map(union)
    classes = label_classes(df["labels"], declared)
    if len(classes) < 2:
        raise TaskDataError(
            f"task {task!r}: a multi-label task needs at least two classes, found "
            f"{', '.join(classes) or 'none'}"
        )
    index = {c: i for i, c in enumerate(classes)}
    df["labels"] = [[index[c] for c in names if c in index] for names in df["labels"]]
    df["split"] = _assign(df, classes, config, previous, leader)
    df["class_name"] = [SEPARATOR.join(classes[i] for i in ix) for ix in df["labels"]]
    df["label"] = -1
    df["fold"] = pd.array([pd.NA] * len(df), dtype="Int64")
    if config.folds >= 2:
        train = df["split"] == "train"
        df.loc[train, "fold"] = [
            int(unit_hash(config.seed, h, "fold") * config.folds)
            for h in df.loc[train, "content_hash"]
        ]
    df = df.sort_values(["split", "relpath"]).reset_index(drop=True)
    return df[MULTILABEL_COLUMNS], classes


def _assign(
    df: pd.DataFrame,
    classes: list[str],
    config: SplitConfig,
    previous: pd.DataFrame | None,
    leader: pd.DataFrame | None,
) -> np.ndarray:
    """train/val/test of every row: split folders first, then pinned (the leader's, then the
    previous manifest's), then stratified."""
    split_dir = df["split_dir"].to_numpy()
    folders = set(split_dir) - {"none"}
    names = ["train"] + [s for s in ("val", "test") if s not in folders]
    share = {"val": config.val_fraction, "test": config.test_fraction}
    fractions = np.array([1.0 - sum(share[s] for s in names[1:])] + [share[s] for s in names[1:]])
    split = np.where(np.isin(split_dir, ["val", "test"]), split_dir, "").astype(object)
    free = split == ""
    if len(names) == 1 or not free.any():
        split[free] = "train"
        return split
    rows = df[free]
    before = pinned_splits(previous, leader, set(names))
    pin = np.array([names.index(s) if s in names else -1 for s in rows["content_hash"].map(before)])
    y = indicator(rows["labels"], len(classes))
    u = np.array([unit_hash(config.seed, h) for h in rows["content_hash"]])
    split[free] = np.array(names, dtype=object)[iterative_stratification(y, fractions, u, pin)]
    return split


def multilabel_schema(classes: list[str]) -> pa.Schema:
    """The single-label manifest schema plus ``labels`` (list of class indices) and the kind."""
    schema = splits_schema(classes).append(pa.field("labels", pa.list_(pa.int64())))
    return schema.with_metadata({**schema.metadata, KIND_KEY: MULTILABEL.encode()})


def is_multilabel(manifest: pd.DataFrame) -> bool:
    return "labels" in manifest.columns


def indicator(labels: pd.Series, num_classes: int) -> np.ndarray:
    """N x C boolean matrix of label-index lists (the multi-hot targets)."""
    y = np.zeros((len(labels), num_classes), dtype=bool)
    for r, ix in enumerate(labels):
        y[r, np.asarray(ix, dtype=np.int64)] = True
    return y


def label_split_counts(manifest: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Class x split counts of images carrying each label (the table shown in the UI)."""
    splits = [s for s in ("train", "val", "test") if (manifest["split"] == s).any()]
    table = pd.DataFrame(0, index=pd.Index(classes, name="class_name"), columns=splits)
    for s in splits:
        part = manifest.loc[manifest["split"] == s, "labels"]
        table[s] = indicator(part, len(classes)).sum(0)
    return table
