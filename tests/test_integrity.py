"""Integrity findings with stable codes, cross-file checks, and incremental reruns."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mtmc_pipeline.config import IntegrityConfig
from mtmc_pipeline.integrity import check_integrity, task_findings
from mtmc_pipeline.layout import scan_task
from tests.images import image_bytes, write


def _check(task: Path, **cfg) -> pd.DataFrame:
    df, _ = check_integrity(task, scan_task(task).inventory, IntegrityConfig(workers=1, **cfg))
    return df.set_index("relpath")


def test_per_file_issue_codes(tmp_path: Path) -> None:
    task = tmp_path / "t"
    jpg = image_bytes("JPEG", seed=1)
    write(task / "a" / "ok.png", image_bytes("PNG", seed=2))
    write(task / "a" / "empty.jpg", b"")
    write(task / "a" / "truncated.jpg", jpg[: len(jpg) // 2])
    write(task / "a" / "text.jpg", b"hello, not an image")
    write(task / "a" / "png_named.jpg", image_bytes("PNG", seed=3))
    write(task / "a" / "cmyk.jpg", image_bytes("JPEG", seed=4, mode="CMYK"))
    write(task / "a" / "tiny.png", image_bytes("PNG", size=(4, 4), seed=5))
    write(task / "a" / "big.png", image_bytes("PNG", size=(64, 64), seed=6))
    df = _check(task, max_pixels=64 * 64 - 1)
    issues = df["issues"].map(list).to_dict()
    assert issues["a/ok.png"] == []
    assert issues["a/empty.jpg"] == ["empty_file"]
    assert issues["a/truncated.jpg"] == ["truncated"]
    assert issues["a/text.jpg"] == ["not_an_image"]
    assert issues["a/png_named.jpg"] == ["extension_mismatch"]
    assert issues["a/cmyk.jpg"] == ["cmyk"]
    assert issues["a/tiny.png"] == ["too_small"]
    assert issues["a/big.png"] == ["decompression_bomb"]
    assert df.loc["a/ok.png", "status"] == "ok"
    assert df.loc["a/png_named.jpg", "status"] == "warn"
    assert df.loc["a/truncated.jpg", "status"] == "error"
    assert df.loc["a/ok.png", "width"] == 16 and df.loc["a/ok.png", "format"] == "PNG"


def test_cross_file_findings(tmp_path: Path) -> None:
    task = tmp_path / "t"
    same = image_bytes("PNG", seed=10)
    write(task / "train" / "a" / "1.png", same)
    write(task / "train" / "a" / "1b.png", same)  # duplicate within the class
    write(task / "val" / "a" / "1.png", same)  # same bytes in val: leak
    other = image_bytes("PNG", seed=11)
    write(task / "train" / "a" / "2.png", other)
    write(task / "train" / "b" / "2.png", other)  # same bytes under two classes
    df = _check(task)
    # the first copy in (split, path) order is kept as is, later copies are flagged
    assert list(df.loc["train/a/1.png", "issues"]) == []
    assert list(df.loc["train/a/1b.png", "issues"]) == ["exact_duplicate"]
    assert list(df.loc["val/a/1.png", "issues"]) == ["cross_split_leak"]
    assert df.loc["val/a/1.png", "status"] == "error"
    assert list(df.loc["train/a/2.png", "issues"]) == ["conflicting_labels"]
    assert list(df.loc["train/b/2.png", "issues"]) == ["conflicting_labels"]


def test_severity_overrides(tmp_path: Path) -> None:
    task = tmp_path / "t"
    write(task / "a" / "png_named.jpg", image_bytes("PNG"))
    df = _check(task, severity={"extension_mismatch": "error"})
    assert df.loc["a/png_named.jpg", "status"] == "error"
    df = _check(task, severity={"extension_mismatch": "ignore"})
    assert df.loc["a/png_named.jpg", "status"] == "ok"


def test_task_findings(tmp_path: Path) -> None:
    task = tmp_path / "t"
    write(task / "train" / "a" / "1.png", image_bytes(seed=1))
    write(task / "train" / "broken" / "1.jpg", b"")
    write(task / "val" / "only_val" / "1.png", image_bytes(seed=2))
    df = _check(task).reset_index()
    codes = {(f["code"], f["class_name"]) for f in task_findings(df)}
    assert codes == {
        ("class_without_usable_image", "broken"),
        ("class_not_in_train", "only_val"),
    }


def test_incremental_rerun_decodes_only_new_files(tmp_path: Path) -> None:
    task = tmp_path / "t"
    for i in range(20):
        write(task / "a" / f"{i}.png", image_bytes(seed=i))
    cfg = IntegrityConfig(workers=1)
    first, summary = check_integrity(task, scan_task(task).inventory, cfg)
    assert summary["decoded"] == 20
    write(task / "a" / "new.png", image_bytes(seed=99))
    write(task / "a" / "3.png", image_bytes(seed=100))  # changed content
    second, summary = check_integrity(task, scan_task(task).inventory, cfg, first)
    assert summary["decoded"] == 2 and summary["reused"] == 19
    assert (second["status"] == "ok").all()
    assert (
        second.set_index("relpath").loc["a/3.png", "content_hash"]
        != first.set_index("relpath").loc["a/3.png", "content_hash"]
    )


def test_parallel_and_serial_agree(tmp_path: Path) -> None:
    task = tmp_path / "t"
    for i in range(80):
        write(task / "a" / f"{i}.png", image_bytes(seed=i))
    write(task / "a" / "bad.jpg", b"garbage")
    inv = scan_task(task).inventory
    serial, _ = check_integrity(task, inv, IntegrityConfig(workers=1))
    parallel, _ = check_integrity(task, inv, IntegrityConfig(workers=2))
    cols = ["relpath", "status", "content_hash", "width", "height"]
    pd.testing.assert_frame_equal(serial[cols], parallel[cols])
