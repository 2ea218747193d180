"""review.csv: drops and relabels honoured by the split stage, bad rows reported by line."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from mtmc_pipeline import stages
from mtmc_pipeline.artifacts import TaskArtifacts
from mtmc_pipeline.config import ConfigError, IntegrityConfig, ScanConfig, SplitConfig
from mtmc_pipeline.data.layout import listing_fingerprint, scan_task
from mtmc_pipeline.data.review import read_review
from tests.images import image_bytes, write


def _task(tmp_path: Path) -> Path:
    task = tmp_path / "印花"
    for c, cls in enumerate(("条纹", "格子")):
        for i in range(6):
            write(task / "train" / cls / f"{i}.png", image_bytes("PNG", seed=10 * c + i))
        write(task / "val" / cls / "v.png", image_bytes("PNG", seed=100 + c))
    return task


def test_bad_rows_become_findings_naming_their_line(tmp_path: Path) -> None:
    task = _task(tmp_path)
    (task / "review.csv").write_text(
        "\ufeffrelpath,action,new_label,note\n"
        "train/条纹/0.png,drop,,blurry\n"
        "train/条纹/1.png,relabel,格子,\n"
        "train/条纹/9.png,drop,,\n"
        "train/条纹/0.png,relabel,格子,\n"
        "train/格子/2.png,delete,,\n"
        "train/格子/3.png,relabel,波点,\n"
        ",,,\n",
        "utf-8",
    )
    files = set(scan_task(task).inventory["relpath"])
    review = read_review(task, files, ["条纹", "格子"])
    assert review.drop == {"train/条纹/0.png"}
    assert review.relabel == {"train/条纹/1.png": "格子"}
    problems = {f["line"]: f["problem"] for f in review.findings}
    assert problems == {
        4: "no such image file in the task",
        5: "the file is already named on an earlier line",
        6: "action 'delete' is not one of drop, relabel",
        7: "new_label '波点' is not a class folder of the task",
    }


def test_a_file_without_the_header_fails_naming_it(tmp_path: Path) -> None:
    task = _task(tmp_path)
    (task / "review.csv").write_text("train/条纹/0.png,drop\n", "utf-8")
    with pytest.raises(ConfigError, match=r"review\.csv: the first row must name the columns"):
        read_review(task, set(), [])


def test_the_split_stage_honours_the_review_and_the_images_stay(tmp_path: Path) -> None:
    task = _task(tmp_path)
    art = TaskArtifacts(tmp_path / "artifacts", task.name)
    before = listing_fingerprint(task, scan_task(task))

    def run() -> stages.StageResult:
        stages.run_inventory(task, art, ScanConfig())
        stages.run_integrity(task, art, IntegrityConfig(workers=1))
        return stages.run_splits(art, SplitConfig(), task)

    first = run()
    assert first.metadata["review_dropped"] == 0
    (task / "review.csv").write_text(
        "relpath,action,new_label\ntrain/条纹/0.png,drop,\ntrain/条纹/1.png,relabel,格子\n"
        "nope.png,drop,\n",
        "utf-8",
    )
    assert listing_fingerprint(task, scan_task(task)) != before  # the raw data version moves
    assert scan_task(task).skipped.get("file_outside_class", 0) == 0
    second = run()
    assert second.fingerprint != first.fingerprint
    assert second.metadata["review_dropped"] == 1
    assert second.metadata["review_relabelled"] == 1
    assert list(second.metadata["review_findings"]["line"]) == [4]
    manifest = pd.read_parquet(art.splits).set_index("relpath")
    assert "train/条纹/0.png" not in manifest.index
    assert manifest.loc["train/条纹/1.png", "class_name"] == "格子"
    assert (task / "train" / "条纹" / "0.png").is_file()  # never touched
    again = run()  # reused: the counts come back from the stored manifest
    assert again.reused and again.metadata["review_relabelled"] == 1
