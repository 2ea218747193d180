"""Split manifests: which usable image is train, val or test, stable as the data grows.

- Split folders that exist (``train/``, ``val/``, ``test/``) are honoured: a file in ``val/``
  or ``test/`` stays there. A split without a folder is carved out of the train files (or,
  in the flat layout, out of every file) by a seeded hash of each file's *content*:
  identical bytes always land in the same split, and the decision for one file never
  depends on the other files.
- Assignments already in the previous manifest are kept (when the split settings are the
  same), so adding images never moves an existing image to another split.
- Every class with at least two distinct images gets at least one validation image when
  validation is carved (the lowest-hash file of a class that has none is moved to val).
- The k-fold column over the train files is stratified per class and stable under additions
  (:mod:`mtmc_pipeline.data.folds`; previous folds are kept when the settings are the same).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mtmc_pipeline.artifacts import fingerprint
from mtmc_pipeline.config import SplitConfig
from mtmc_pipeline.data.folds import assign_folds, previous_folds

SPLIT_COLUMNS = ["relpath", "class_name", "label", "split", "fold", "content_hash"]
CLASSES_KEY = b"mtmc.class_names"


class TaskDataError(ValueError):
    """A task's data cannot be trained on (no images, a single class, ...)."""


def unit_hash(seed: int, key: str, salt: str = "split") -> float:
    """A uniform number in [0, 1) fixed by (seed, salt, key)."""
    digest = hashlib.blake2b(f"{salt}:{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _previous_assignments(previous: pd.DataFrame | None) -> dict[str, str]:
    """content_hash -> split from the last manifest."""
    if previous is None or previous.empty:
        return {}
    return dict(zip(previous["content_hash"], previous["split"], strict=True))


def _by_hash(u: np.ndarray, val: float, test: float) -> np.ndarray:
    """train, val or test for each unit hash: [0, test) test, [test, test + val) val."""
    return np.where(u < test, "test", np.where(u < test + val, "val", "train"))


def make_splits(
    usable: pd.DataFrame,
    config: SplitConfig | None = None,
    previous: pd.DataFrame | None = None,
    task: str = "task",
) -> tuple[pd.DataFrame, list[str]]:
    """The split manifest and the ordered class list.

    ``usable`` has integrity columns (relpath, split_dir, class_name, content_hash) for files
    that passed integrity. ``previous`` is the last manifest made with the same settings.
    """
    config = config or SplitConfig()
    if usable.empty:
        raise TaskDataError(f"task {task!r}: no usable images (see its integrity report)")
    df = usable[["relpath", "split_dir", "class_name", "content_hash"]].reset_index(drop=True)
    folders = set(df["split_dir"]) - {"none"}
    carved = {"val", "test"} - folders
    u = np.array([unit_hash(config.seed, h) for h in df["content_hash"]])
    split = _by_hash(
        u,
        config.val_fraction if "val" in carved else 0.0,
        config.test_fraction if "test" in carved else 0.0,
    )
    split_dir = df["split_dir"].to_numpy()
    in_folder = np.isin(split_dir, ["val", "test"])
    split = np.where(in_folder, split_dir, split).astype(object)
    pinned = {h: s for h, s in _previous_assignments(previous).items() if s in carved | {"train"}}
    pin = np.array([pinned.get(h) for h in df["content_hash"]], dtype=object)
    use_pin = ~in_folder & pd.notna(pin)
    split[use_pin] = pin[use_pin]
    df["split"] = split
    if "val" in carved:
        _ensure_one_val_per_class(df, u, use_pin)
    classes = sorted(df.loc[df["split"] == "train", "class_name"].unique())
    if len(classes) < 2:
        found = ", ".join(classes) or "none"
        raise TaskDataError(
            f"task {task!r}: needs at least two classes with usable training images, found {found}"
        )
    df = df[df["class_name"].isin(classes)].copy()
    df["label"] = df["class_name"].map({c: i for i, c in enumerate(classes)}).astype("int64")
    df["fold"] = pd.array([pd.NA] * len(df), dtype="Int64")
    if config.folds >= 2:
        train = df["split"] == "train"
        hashes = df.loc[train, "content_hash"]
        df.loc[train, "fold"] = assign_folds(
            df.loc[train, "class_name"],
            hashes,
            [unit_hash(config.seed, h, "fold") for h in hashes],
            config.folds,
            previous_folds(previous, config.folds),
        )
    df = df.sort_values(["split", "label", "relpath"]).reset_index(drop=True)
    return df[SPLIT_COLUMNS], classes


def _ensure_one_val_per_class(df: pd.DataFrame, u: np.ndarray, pinned: np.ndarray) -> None:
    """Move the lowest-hash unpinned train file of a class without val images to val."""
    has_val = set(df.loc[df["split"] == "val", "class_name"])
    distinct = df.groupby("class_name")["content_hash"].nunique()
    candidates = df.assign(_u=u)[(df["split"] == "train").to_numpy() & ~pinned]
    for cls, group in candidates.groupby("class_name", sort=False):
        if cls in has_val or distinct[cls] < 2:
            continue
        chosen = group.loc[group["_u"].idxmin(), "content_hash"]
        df.loc[df["content_hash"] == chosen, "split"] = "val"


def splits_schema(classes: list[str]) -> pa.Schema:
    """The manifest schema, with the ordered class list in its metadata."""
    schema = pa.schema(
        [
            ("relpath", pa.string()),
            ("class_name", pa.string()),
            ("label", pa.int64()),
            ("split", pa.string()),
            ("fold", pa.int64()),
            ("content_hash", pa.string()),
        ]
    )
    return schema.with_metadata({CLASSES_KEY: json.dumps(classes, ensure_ascii=False).encode()})


def manifest_fingerprint(manifest: pd.DataFrame, classes: list[str]) -> str:
    """A digest of everything a manifest decides (files, labels, splits, folds, content)."""
    rows = manifest[SPLIT_COLUMNS].sort_values("relpath")
    return fingerprint("split manifest", classes, rows.to_csv(index=False))


def class_names_from_schema(schema: pa.Schema) -> list[str]:
    return json.loads((schema.metadata or {})[CLASSES_KEY])


def read_manifest(path: Path) -> tuple[pd.DataFrame, list[str]]:
    """A split manifest and its ordered class list, in one read."""
    table = pq.read_table(path)
    return table.to_pandas(), class_names_from_schema(table.schema)


def class_split_counts(manifest: pd.DataFrame) -> pd.DataFrame:
    """Class x split image counts (the table shown in the UI)."""
    table = manifest.pivot_table(
        index="class_name", columns="split", values="relpath", aggfunc="count", fill_value=0
    )
    return table.reindex(columns=[s for s in ("train", "val", "test") if s in table.columns])


def leaking_hashes(manifest: pd.DataFrame) -> np.ndarray:
    """Content hashes that appear in more than one split (must be empty)."""
    per_hash = manifest.groupby("content_hash")["split"].nunique()
    return per_hash[per_hash > 1].index.to_numpy()
