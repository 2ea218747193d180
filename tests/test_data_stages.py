"""The four data stages run as the pipeline runs them: files on disk in, Parquet out."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from mtmc_pipeline import stages
from mtmc_pipeline.artifacts import TaskArtifacts
from mtmc_pipeline.config import IntegrityConfig, SamplingConfig, ScanConfig, SplitConfig
from mtmc_pipeline.data.splits import TaskDataError, class_names_from_schema
from tests.images import image_bytes, write


def _run(task: Path, art: TaskArtifacts, integrity: IntegrityConfig | None = None):
    inventory = stages.run_inventory(task, art, ScanConfig())
    checked = stages.run_integrity(task, art, integrity or IntegrityConfig(workers=1))
    splits = stages.run_splits(art, SplitConfig(val_fraction=0.25))
    sampling = stages.run_sampling(art, SamplingConfig(strategy="inverse"))
    return inventory, checked, splits, sampling


def _plant(task: Path, counts: dict[str, int], start: int = 0) -> None:
    for cls, n in counts.items():
        for i in range(start, start + n):
            write(task / cls / f"{i}.png", image_bytes(seed=zlib.crc32(f"{cls}/{i}".encode())))


def test_adding_files_moves_no_existing_file_and_decodes_only_the_new(tmp_path: Path) -> None:
    task, art = tmp_path / "data" / "t", TaskArtifacts(tmp_path / "art", "t")
    _plant(task, {"猫": 30, "狗 dog": 12})
    _run(task, art)
    first = pd.read_parquet(art.splits)
    _plant(task, {"猫": 10, "狗 dog": 25, "🐦": 6}, start=100)
    _, checked, splits, _ = _run(task, art)
    second = pd.read_parquet(art.splits)
    assert checked.metadata["decoded"] == 41 and checked.metadata["reused_findings"] == 42
    merged = first.merge(second, on="relpath", suffixes=("_before", "_after"))
    assert len(merged) == len(first) == 42
    assert (merged["split_before"] == merged["split_after"]).all()
    assert class_names_from_schema(pq.read_schema(art.splits)) == sorted(["猫", "狗 dog", "🐦"])
    assert splits.checks["no_hash_in_two_splits"].passed
    assert splits.checks["every_class_in_train"].passed


def test_changed_limits_redecode_every_file(tmp_path: Path) -> None:
    task, art = tmp_path / "data" / "t", TaskArtifacts(tmp_path / "art", "t")
    _plant(task, {"a": 5, "b": 5})
    _run(task, art)
    checked = stages.run_integrity(task, art, IntegrityConfig(workers=1, min_side=32))
    assert checked.metadata["decoded"] == 10
    assert checked.metadata["issue_counts"].loc["too_small", "files"] == 10


def test_error_fraction_check_and_what_the_ui_shows(tmp_path: Path) -> None:
    task, art = tmp_path / "data" / "t", TaskArtifacts(tmp_path / "art", "t")
    _plant(task, {"a": 10, "b": 30})
    write(task / "a" / "empty.jpg", b"")
    write(task / "a" / "text.png", b"not an image at all")
    write(task / "b" / "cut.png", image_bytes(size=(64, 64))[:300])
    (task / "c").mkdir()
    _, checked, _, sampling = _run(task, art)
    check = checked.checks["error_fraction"]
    assert not check.passed and check.severity == "error"
    assert check.metadata == {"error_files": 3, "error_fraction": 3 / 43}
    md = checked.metadata
    assert md["issue_counts"].to_dict("index") == {
        "empty_file": {"severity": "error", "files": 1, "meaning": "the file has zero bytes"},
        "not_an_image": {
            "severity": "error",
            "files": 1,
            "meaning": "leading bytes are not JPEG, PNG, GIF, BMP, TIFF or WebP",
        },
        "truncated": {
            "severity": "error",
            "files": 1,
            "meaning": "truncated or corrupt: the full decode failed",
        },
    }
    assert md["problem_files"]["relpath"].tolist() == ["a/empty.jpg", "a/text.png", "b/cut.png"]
    assert md["usable_by_class_and_split"].to_dict("index") == {
        "a": {"none": 10, "errors": 2},
        "b": {"none": 30, "errors": 1},
    }
    assert md["task_findings"]["class_name"].tolist() == ["c"]
    train = pd.read_parquet(art.splits).query("split == 'train'")
    table = sampling.metadata["class_table"].set_index("class_name")
    shares = train["class_name"].value_counts(normalize=True)
    assert table["share_before"].to_dict() == shares.to_dict()
    assert shares["a"] != shares["b"] and table["expected_share"].tolist() == [0.5, 0.5]
    assert sampling.metadata["class_shares_plot"].data.startswith(b"\x89PNG")


def test_a_task_folder_that_cannot_be_listed_fails_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = tmp_path / "data" / "t"
    _plant(task, {"a": 2})
    real_scandir = os.scandir

    def refuse(path):
        if str(path) == str(task):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    with pytest.raises(TaskDataError, match=r"has no image files.*\.: unreadable_dir"):
        stages.run_inventory(task, TaskArtifacts(tmp_path / "art", "t"), ScanConfig())
