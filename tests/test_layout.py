"""Task and class discovery, both layouts, and the odd things real folders contain."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from mtmc_pipeline.data.layout import DataRootError, discover_tasks, listing_fingerprint, scan_task


def _touch(path: Path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_discover_tasks_skips_hidden_and_files(tmp_path: Path) -> None:
    for name in ("b", "a", ".hidden"):
        (tmp_path / name).mkdir()
    (tmp_path / "notes.txt").write_text("x")
    assert discover_tasks(tmp_path) == ["a", "b"]
    with pytest.raises(DataRootError, match="does not exist"):
        discover_tasks(tmp_path / "missing")


def test_flat_layout_with_nested_folders_and_litter(tmp_path: Path) -> None:
    task = tmp_path / "t"
    _touch(task / "猫" / "a.jpg")
    _touch(task / "猫" / "sub" / "deeper" / "b 😀.PNG")
    _touch(task / "狗" / "c.jpeg")
    _touch(task / "狗" / ".DS_Store")
    _touch(task / "狗" / "Thumbs.db")
    _touch(task / "狗" / "readme.txt")
    _touch(task / ".git" / "x.jpg")
    scan = scan_task(task)
    inv = scan.inventory.sort_values("relpath")
    assert scan.layout == "flat"
    assert inv["relpath"].tolist() == ["狗/c.jpeg", "猫/a.jpg", "猫/sub/deeper/b 😀.PNG"]
    assert inv["class_name"].tolist() == ["狗", "猫", "猫"]
    assert set(inv["split_dir"]) == {"none"}
    assert inv["ext"].tolist() == [".jpeg", ".jpg", ".png"]
    assert scan.skipped == {"hidden": 2, "os_litter": 1, "not_image_extension": 1}


def test_split_layout(tmp_path: Path) -> None:
    task = tmp_path / "t"
    _touch(task / "train" / "a" / "1.jpg")
    _touch(task / "val" / "a" / "2.jpg")
    _touch(task / "test" / "b" / "3.jpg")
    _touch(task / "extra" / "a" / "4.jpg")
    (task / "task.yaml").write_text("{}")
    scan = scan_task(task)
    assert scan.layout == "split"
    assert dict(zip(scan.inventory["relpath"], scan.inventory["split_dir"], strict=True)) == {
        "train/a/1.jpg": "train",
        "val/a/2.jpg": "val",
        "test/b/3.jpg": "test",
    }
    assert scan.skipped["dir_outside_split"] == 1


def test_symlinks_followed_loops_and_broken_links_recorded(tmp_path: Path) -> None:
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(b"abc")
    task = tmp_path / "t"
    _touch(task / "a" / "real.jpg")
    os.symlink(outside, task / "a" / "link.jpg")
    os.symlink(tmp_path / "missing.jpg", task / "a" / "broken.jpg")
    os.symlink(task / "a", task / "a" / "loop")
    scan = scan_task(task)
    rows = scan.inventory.set_index("relpath")
    assert rows.loc["a/link.jpg", "bytes"] == 3
    assert rows.loc["a/broken.jpg", "bytes"] == -1
    assert [p["problem"] for p in scan.problems] == ["symlink_loop"]
    assert len(rows) == 3


def test_listing_fingerprint_tracks_files_and_task_yaml(tmp_path: Path) -> None:
    task = tmp_path / "t"
    _touch(task / "a" / "1.jpg")
    fp1 = listing_fingerprint(task, scan_task(task))
    assert fp1 == listing_fingerprint(task, scan_task(task))
    _touch(task / "a" / "2.jpg")
    fp2 = listing_fingerprint(task, scan_task(task))
    (task / "task.yaml").write_text("train: {epochs: 3}\n")
    fp3 = listing_fingerprint(task, scan_task(task))
    assert len({fp1, fp2, fp3}) == 3


def test_names_that_are_not_utf8_are_recorded_not_listed(tmp_path: Path) -> None:
    task = tmp_path / "t"
    _touch(task / "a" / "fine.jpg")
    fd = os.open(os.fsencode(task / "a") + b"/bad\xff.jpg", os.O_CREAT | os.O_WRONLY)
    os.close(fd)
    scan = scan_task(task)
    assert scan.inventory["relpath"].tolist() == ["a/fine.jpg"]
    assert scan.problems == [
        {
            "relpath": "a/bad\\xff.jpg",
            "problem": "name_not_utf8",
            "detail": "rename it: manifests store UTF-8 paths",
        }
    ]
    scan.inventory.to_parquet(tmp_path / "inventory.parquet")  # every listed path is storable


def test_deep_trees_do_not_hit_a_recursion_limit(tmp_path: Path) -> None:
    task = tmp_path / "t"
    (task / "a").mkdir(parents=True)
    depth = 400  # deeper than the recursion limit set below: a recursive walk would fail
    fd = os.open(task / "a", os.O_RDONLY)
    for _ in range(depth):  # relative to an open folder: no path grows with the depth
        os.mkdir("d", dir_fd=fd)
        fd, parent = os.open("d", os.O_RDONLY, dir_fd=fd), fd
        os.close(parent)
    os.close(os.open("deep.jpg", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(300)
    try:
        scan = scan_task(task)
        assert scan.inventory["relpath"].tolist() == ["a/" + "d/" * depth + "deep.jpg"]
    finally:  # shutil.rmtree, which cleans tmp_path, recurses: remove the depth here
        sys.setrecursionlimit(limit)
        os.unlink("deep.jpg", dir_fd=fd)
        for _ in range(depth):
            fd, child = os.open("..", os.O_RDONLY, dir_fd=fd), fd
            os.close(child)
            os.rmdir("d", dir_fd=fd)
        os.close(fd)


def test_split_folder_names_are_matched_case_insensitively(tmp_path: Path) -> None:
    task = tmp_path / "t"
    _touch(task / "Train" / "a" / "1.jpg")
    _touch(task / "validation" / "a" / "2.jpg")
    _touch(task / "TEST" / "a" / "3.jpg")
    scan = scan_task(task)
    assert scan.layout == "split"
    assert dict(zip(scan.inventory["relpath"], scan.inventory["split_dir"], strict=True)) == {
        "TEST/a/3.jpg": "test",
        "Train/a/1.jpg": "train",
        "validation/a/2.jpg": "val",
    }


def test_empty_class_folders_are_listed_and_change_the_fingerprint(tmp_path: Path) -> None:
    task = tmp_path / "t"
    _touch(task / "a" / "1.jpg")
    before = scan_task(task)
    (task / "b").mkdir()
    after = scan_task(task)
    assert before.class_folders == [("none", "a")]
    assert after.class_folders == [("none", "a"), ("none", "b")]
    assert after.inventory.equals(before.inventory)
    assert listing_fingerprint(task, after) != listing_fingerprint(task, before)


def test_a_folder_linked_twice_is_walked_once(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    _touch(shared / "1.jpg")
    task = tmp_path / "t"
    (task / "a").mkdir(parents=True)
    os.symlink(shared, task / "a" / "one")
    os.symlink(shared, task / "a" / "two")
    scan = scan_task(task)
    assert scan.inventory["relpath"].tolist() == ["a/one/1.jpg"]
    assert [p["problem"] for p in scan.problems] == ["symlink_loop"]


def test_an_unreadable_folder_is_a_problem_not_a_crash(tmp_path: Path, monkeypatch) -> None:
    task = tmp_path / "t"
    _touch(task / "a" / "1.jpg")
    _touch(task / "b" / "locked" / "2.jpg")
    real_scandir = os.scandir

    def refuse(path):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    scan = scan_task(task)
    assert scan.inventory["relpath"].tolist() == ["a/1.jpg"]
    assert scan.problems == [
        {"relpath": "b/locked", "problem": "unreadable_dir", "detail": "Permission denied"}
    ]
