"""Label sets of a multi-label task (``kind: multilabel``), from one of two sources.

- ``labels.csv`` in the task folder: one row per image, ``relpath,labels`` with the labels
  separated by ``;`` (an empty field: an image with no label). A first row ``relpath,labels``
  is a header. Paths are relative to the task folder, with ``/``.
- Otherwise the folder layout: the same bytes in several class folders of one split are one
  image whose labels are those folders.

Problems are recorded, never fatal: a row naming no image of the task (``labels_missing_file``)
or malformed (``labels_bad_row``) is a task finding; a file listed twice, with a label outside
the declared ``classes``, or (with ``labels.csv``) not listed at all gets an issue code.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mtmc_pipeline.config import LABELS_FILE
from mtmc_pipeline.data.integrity import (
    LABELS_BAD_ROW,
    LABELS_DUPLICATE_ROW,
    LABELS_MISSING_FILE,
    LABELS_UNKNOWN_CLASS,
    NOT_IN_LABELS,
    _status,
)

SEPARATOR = ";"
HEADER = ("relpath", "labels")


@dataclass
class LabelRows:
    """What ``labels.csv`` says: labels per relpath (first row wins), repeats and findings."""

    labels: dict[str, list[str]] = field(default_factory=dict)
    repeated: set[str] = field(default_factory=set)
    findings: list[dict[str, str]] = field(default_factory=list)


def split_labels(text: str) -> list[str]:
    """``"条纹; 格子"`` -> ``["条纹", "格子"]``: sorted, distinct, blanks dropped."""
    return sorted({part.strip() for part in text.split(SEPARATOR) if part.strip()})


def read_labels_csv(path: Path) -> LabelRows:
    """Parse ``labels.csv`` (UTF-8, a byte-order mark allowed); a bad row is a finding."""
    out = LabelRows()
    try:
        text = path.read_text("utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        detail = f"{path}: cannot be read as UTF-8 text ({e})"
        out.findings.append({"code": LABELS_BAD_ROW, "class_name": "", "detail": detail})
        return out
    for line, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or (line == 1 and tuple(c.strip() for c in row) == HEADER):
            continue
        if len(row) != 2 or not row[0].strip():
            detail = f"{LABELS_FILE} line {line}: expected `relpath,labels`, got {row!r}"
            out.findings.append({"code": LABELS_BAD_ROW, "class_name": "", "detail": detail})
            continue
        relpath = row[0].strip().replace("\\", "/").removeprefix("./")
        if relpath in out.labels:
            out.repeated.add(relpath)
            continue
        out.labels[relpath] = split_labels(row[1])
    return out


def attach_labels(
    df: pd.DataFrame,
    task_dir: Path,
    classes: list[str] | None,
    severity: Mapping[str, str],
) -> tuple[pd.DataFrame, list[dict[str, str]] | None]:
    """Integrity rows with a ``labels`` column (class names) and their label findings.

    Returns the task findings that replace the folder-based ones when ``labels.csv`` is the
    source (folder names are not classes then), else None.
    """
    path = task_dir / LABELS_FILE
    if not path.is_file():
        return _labels_from_folders(df), None
    rows = read_labels_csv(path)
    known = set(df["relpath"])
    findings = rows.findings + [
        {
            "code": LABELS_MISSING_FILE,
            "class_name": "",
            "detail": f"{LABELS_FILE} names `{rel}`, which is not an image file of the task",
        }
        for rel in sorted(set(rows.labels) - known)
    ]
    allowed = set(classes) if classes is not None else None
    labels, issues = [], []
    for relpath, codes in zip(df["relpath"], df["issues"], strict=True):
        codes = list(codes)
        given = rows.labels.get(relpath)
        if given is None:
            codes.append(NOT_IN_LABELS)
            given = []
        if relpath in rows.repeated:
            codes.append(LABELS_DUPLICATE_ROW)
        if allowed is not None and not set(given) <= allowed:
            codes.append(LABELS_UNKNOWN_CLASS)
            given = [c for c in given if c in allowed]
        labels.append(given)
        issues.append([c for c in codes if severity.get(c) != "ignore"])
    out = df.assign(labels=labels, issues=issues)
    out["status"] = [_status(codes, severity) for codes in issues]
    return out, findings


def _labels_from_folders(df: pd.DataFrame) -> pd.DataFrame:
    """Each file's labels: the class folders of one split that hold the same bytes."""
    key = df["content_hash"].fillna(df["relpath"]) + "\0" + df["split_dir"]
    sets = df.groupby(key)["class_name"].agg(lambda names: sorted(set(names)))
    return df.assign(labels=key.map(sets).map(list))


def label_classes(labels: pd.Series, classes: list[str] | None) -> list[str]:
    """The task's class list: the declared ``classes``, else every label used (sorted)."""
    return sorted(classes) if classes is not None else sorted({c for s in labels for c in s})
