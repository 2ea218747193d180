"""Atomic writes and safe paths: a crash at any point leaves the previous output whole."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pandas as pd
import pytest

from mtmc_pipeline import artifacts as af
from mtmc_pipeline.artifacts import UnsafePathError, atomic_dir, safe_child


def test_failed_file_write_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "t" / "x.parquet"
    af.write_parquet(path, pd.DataFrame({"a": [1, 2]}), fp="old")

    class Boom(Exception):
        pass

    with pytest.raises(Boom), af._atomic_file(path) as tmp:
        tmp.write_bytes(b"half a parquet fi")
        raise Boom
    assert pd.read_parquet(path)["a"].tolist() == [1, 2]
    assert af.stored_fingerprint(path) == "old"
    assert [p.name for p in path.parent.iterdir()] == ["x.parquet"]


def test_failed_directory_build_keeps_the_previous_directory(tmp_path: Path) -> None:
    final = tmp_path / "model"
    with atomic_dir(final) as d:
        (d / "weights").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(final) as d:
        (d / "weights").write_text("v2, half")
        raise RuntimeError("killed while writing")
    assert (final / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_interrupted_swap_is_repaired(tmp_path: Path) -> None:
    """A crash between the two renames leaves only model.old: the next write restores it."""
    final = tmp_path / "model"
    with atomic_dir(final) as d:
        (d / "weights").write_text("v1")
    final.rename(tmp_path / "model.old")
    with pytest.raises(RuntimeError), atomic_dir(final):
        raise RuntimeError
    assert (final / "weights").read_text() == "v1"
    assert not (tmp_path / "model.old").exists()


def test_stale_temporaries_of_killed_writers_are_removed(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    stale = tmp_path / ".x.json.abc123.tmp"
    fresh = tmp_path / ".x.json.def456.tmp"  # maybe another writer's, still at work
    stale_dir = tmp_path / ".model.zzz.tmp"
    for p in (stale, fresh):
        p.write_text("partial")
    stale_dir.mkdir()
    old = time.time() - af.STALE_TEMP_SECONDS - 5
    os.utime(stale, (old, old))
    os.utime(stale_dir, (old, old))
    af.write_json(path, {"ok": True})
    with atomic_dir(tmp_path / "model") as d:
        (d / "w").write_text("v1")
    assert not stale.exists() and not stale_dir.exists() and fresh.exists()
    assert af.read_json(path) == {"ok": True}


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "a\\b", "nul\x00"])
def test_unsafe_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(UnsafePathError):
        safe_child(tmp_path, name)


def test_symlinked_task_dir_cannot_escape_the_root(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    root.mkdir()
    os.symlink(tmp_path, root / "escape")
    with pytest.raises(UnsafePathError, match="outside"):
        safe_child(root, "escape")
    assert safe_child(root, "印花 task") == root / "印花 task"
