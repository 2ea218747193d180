"""The user's review of their labels: ``<task>/review.csv``, honoured by the split stage.

A person who has looked at the near-duplicate groups or the suspected label errors writes one
row per image to act on (UTF-8, a header row, extra columns ignored)::

    relpath,action,new_label
    train/条纹/条纹_017.jpg,drop,
    train/格子/格子_003.jpg,relabel,波点

``drop`` leaves the image out of the split manifest (so out of training and evaluation);
``relabel`` files it under ``new_label``, which must be one of the task's class folders. The
images themselves are never touched: deleting the row undoes it. Rows that cannot be honoured
(an unknown file, action or class, a repeated file) are left out and reported as findings,
each naming its line.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mtmc_pipeline.config import ConfigError

REVIEW_FILE = "review.csv"
ACTIONS = ("drop", "relabel")


@dataclass(frozen=True)
class Review:
    """What ``review.csv`` asks for, and the rows it could not honour."""

    drop: frozenset[str] = frozenset()
    relabel: dict[str, str] = field(default_factory=dict)
    findings: list[dict[str, object]] = field(default_factory=list)
    digest: str = ""  # of the file's bytes; "" when there is no file

    @property
    def empty(self) -> bool:
        return not self.drop and not self.relabel and not self.findings


def review_digest(task_dir: Path) -> str:
    """A digest of the review file's bytes ("" when there is none): part of data versions."""
    path = task_dir / REVIEW_FILE
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest() if path.is_file() else ""


def read_review(task_dir: Path, files: Collection[str], classes: Collection[str]) -> Review:
    """Parse ``task_dir/review.csv`` against the task's files (relpaths) and class names."""
    path = task_dir / REVIEW_FILE
    if not path.is_file():
        return Review()
    try:
        text = path.read_text("utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read as UTF-8 text: {e}") from e
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in reader.fieldnames or []]
    if "relpath" not in header or "action" not in header:
        raise ConfigError(
            f"{path}: the first row must name the columns relpath,action[,new_label]; "
            f"found {','.join(header) or 'nothing'}"
        )
    drop: set[str] = set()
    relabel: dict[str, str] = {}
    findings: list[dict[str, object]] = []
    for line, raw in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        rel, action, new = (
            row.get("relpath", ""),
            row.get("action", "").lower(),
            row.get("new_label", ""),
        )
        problem = None
        if not rel and not action:
            continue  # a blank line
        if rel not in files:
            problem = "no such image file in the task"
        elif rel in drop or rel in relabel:
            problem = "the file is already named on an earlier line"
        elif action not in ACTIONS:
            problem = f"action {action!r} is not one of {', '.join(ACTIONS)}"
        elif action == "relabel" and new not in classes:
            problem = f"new_label {new!r} is not a class folder of the task"
        if problem:
            findings.append({"line": line, "relpath": rel, "problem": problem})
        elif action == "drop":
            drop.add(rel)
        else:
            relabel[rel] = new
    return Review(frozenset(drop), relabel, findings, review_digest(task_dir))


def apply_review(usable: pd.DataFrame, review: Review) -> tuple[pd.DataFrame, dict[str, int]]:
    """``usable`` without the dropped files and with the new labels; what was changed."""
    keep = ~usable["relpath"].isin(review.drop)
    out = usable[keep].copy()
    new = out["relpath"].map(review.relabel)
    moved = new.notna() & (new != out["class_name"])
    out.loc[moved, "class_name"] = new[moved]
    counts = {"dropped": int((~keep).sum()), "relabelled": int(moved.sum())}
    return out.reset_index(drop=True), counts
