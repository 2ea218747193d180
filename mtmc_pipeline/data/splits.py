"""Split manifests: which usable image is train, val or test, stable as the data grows.

- Split folders that exist (``train/``, ``val/``, ``test/``) are honoured: a file in ``val/``
  or ``test/`` stays there. A split without a folder is carved out of the train files (or,
  in the flat layout, out of every file), stratified: each class's share of val and test is
  its target rounded to the nearest image (:func:`class_quota`). Files are taken in the order
  of a seeded hash of their *content*, and identical bytes always share a split.
- Assignments already in the previous manifest are kept (when the split settings are the
  same), so adding images never moves an existing image to another split: only the new
  files of a class fill what its quota still lacks.
- A member of a shared group (``mtmc.yaml``) other than the first, its *leader*, takes the
  leader's split of every image the leader's manifest also has, over its own previous
  manifest, so that the shared backbone does not train on what another member validates or
  tests on; only the images the leader lacks fill the member's quotas. Split folders still
  win: the member's own ``val/`` and ``test/`` files stay there, and the leader's val or test
  images are not taken into a split the member has a folder for.
- A class with two or more distinct images keeps at least one train image and gets at least
  one val image (when val is carved; of the images a task carves itself); a class of one
  image trains on it.
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


def _assignments(manifest: pd.DataFrame | None) -> dict[str, str]:
    """content_hash -> split of a manifest ({} without one)."""
    if manifest is None or manifest.empty:
        return {}
    return dict(zip(manifest["content_hash"], manifest["split"], strict=True))


def pinned_splits(
    previous: pd.DataFrame | None, leader: pd.DataFrame | None, allowed: set[str]
) -> dict[str, str]:
    """content_hash -> split to keep: the previous manifest's, overridden by the group
    leader's; an assignment to a split outside ``allowed`` (one this task does not carve)
    is not kept."""
    pinned: dict[str, str] = {}
    for manifest in (previous, leader):
        pinned.update((h, s) for h, s in _assignments(manifest).items() if s in allowed)
    return pinned


def class_quota(n: int, val: float, test: float) -> tuple[int, int]:
    """(val, test) image counts of a class of ``n`` distinct images: each share rounded to the
    nearest image, at least one val image from 2 images on (when val is carved), and never
    the class's last train image (test gives way first)."""
    n_val = int(np.floor(n * val + 0.5))
    n_test = int(np.floor(n * test + 0.5))
    if val and n >= 2:
        n_val = max(n_val, 1)
    spare = max(n - 1, 0)
    n_test = min(n_test, spare)
    return min(n_val, spare - n_test), n_test


def _carve(
    df: pd.DataFrame, carvable: np.ndarray, pinned: dict[str, str], config: SplitConfig, carved
) -> dict[str, str]:
    """content_hash -> split for the carvable files: kept where ``pinned``; new files of each
    class fill that class's quota in the order of their seeded content hash."""
    val = config.val_fraction if "val" in carved else 0.0
    test = config.test_fraction if "test" in carved else 0.0
    assigned = dict(pinned)
    pool = df[carvable]
    for _, group in pool.groupby("class_name", sort=True):
        units = list(dict.fromkeys(group["content_hash"]))
        n_val, n_test = class_quota(len(units), val, test)
        kept = [assigned[h] for h in units if h in assigned]
        new = sorted(
            (h for h in units if h not in assigned), key=lambda h: unit_hash(config.seed, h)
        )
        need_test = max(n_test - kept.count("test"), 0)
        need_val = max(n_val - kept.count("val"), 0)
        for i, h in enumerate(new):
            assigned[h] = (
                "test" if i < need_test else "val" if i < need_test + need_val else "train"
            )
    return assigned


def make_splits(
    usable: pd.DataFrame,
    config: SplitConfig | None = None,
    previous: pd.DataFrame | None = None,
    task: str = "task",
    leader: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, list[str]]:
    """The split manifest and the ordered class list.

    ``usable`` has integrity columns (relpath, split_dir, class_name, content_hash) for files
    that passed integrity. ``previous`` is the last manifest made with the same settings;
    ``leader`` the manifest of the first member of this task's shared group.
    """
    config = config or SplitConfig()
    if usable.empty:
        raise TaskDataError(f"task {task!r}: no usable images (see its integrity report)")
    df = usable[["relpath", "split_dir", "class_name", "content_hash"]].reset_index(drop=True)
    folders = set(df["split_dir"]) - {"none"}
    carved = {"val", "test"} - folders
    split_dir = df["split_dir"].to_numpy()
    in_folder = np.isin(split_dir, ["val", "test"])
    pinned = pinned_splits(previous, leader, carved | {"train"})
    assigned = _carve(df, ~in_folder, pinned, config, carved)
    carved_split = np.array([assigned.get(h, "train") for h in df["content_hash"]], dtype=object)
    df["split"] = np.where(in_folder, split_dir, carved_split).astype(object)
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


def cross_task_leaks(manifests: list[pd.DataFrame]) -> int:
    """How many images (distinct content hashes) one manifest trains on and another holds out
    (val or test): a backbone shared by those tasks has seen what it is scored on."""
    train = [set(m.loc[m["split"] == "train", "content_hash"]) for m in manifests]
    held_out = [set(m.loc[m["split"] != "train", "content_hash"]) for m in manifests]
    leaked: set[str] = set()
    for i, held in enumerate(held_out):
        for j, trained in enumerate(train):
            if i != j:
                leaked |= held & trained
    return len(leaked)


def leaking_hashes(manifest: pd.DataFrame) -> np.ndarray:
    """Content hashes that appear in more than one split (must be empty)."""
    per_hash = manifest.groupby("content_hash")["split"].nunique()
    return per_hash[per_hash > 1].index.to_numpy()
