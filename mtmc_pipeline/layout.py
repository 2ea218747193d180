"""Walk a data root: which folders are tasks, which are classes, which files are images.

Rules (also in the README):

- A task is any non-hidden directory directly under the data root.
- If a task has a ``train``, ``val`` or ``test`` directory, it uses the split layout
  ``<task>/<split>/<class>/...``; other directories at that level are ignored (and counted).
  Otherwise every directory under the task is a class (flat layout ``<task>/<class>/...``).
- Files anywhere below a class directory belong to that class (nested folders are fine).
- Hidden files and folders (``.name``) and OS litter (``Thumbs.db``, ``desktop.ini``) are
  skipped and counted; files whose extension is not an image extension are skipped and counted.
- Symlinked files and folders are followed; broken links are listed (with size -1) so the
  integrity stage reports them, and a folder reached twice (a symlink loop) is walked once.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mtmc_pipeline.artifacts import fingerprint
from mtmc_pipeline.config import TASK_FILE, ScanConfig

SPLIT_DIRS = ("train", "val", "test")
OS_LITTER = frozenset({"thumbs.db", "desktop.ini", "icon\r"})
INVENTORY_COLUMNS = ["relpath", "split_dir", "class_name", "bytes", "mtime_ns", "ext"]


class DataRootError(FileNotFoundError):
    """The data root is missing or is not a directory."""


def discover_tasks(data_root: Path) -> list[str]:
    """Sorted names of the task folders under ``data_root``."""
    if not data_root.is_dir():
        raise DataRootError(
            f"data root {data_root} does not exist or is not a directory "
            "(set MTMC_DATA_ROOT, or run `mtmc demo-data data/demo`)"
        )
    return sorted(
        e.name
        for e in os.scandir(data_root)
        if not e.name.startswith(".") and e.is_dir(follow_symlinks=True)
    )


@dataclass
class ScanResult:
    """The inventory of one task plus what the walk skipped or could not follow."""

    inventory: pd.DataFrame
    layout: str  # "split" or "flat"
    skipped: Counter[str] = field(default_factory=Counter)
    problems: list[dict[str, str]] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        return {"layout": self.layout, "skipped": dict(self.skipped), "problems": self.problems}


def _is_hidden_or_litter(name: str) -> str | None:
    if name.startswith("."):
        return "hidden"
    if name.lower() in OS_LITTER:
        return "os_litter"
    return None


class _Walker:
    def __init__(self, task_dir: Path, config: ScanConfig) -> None:
        self.task_dir = task_dir
        self.extensions = {e.lower() for e in config.extensions}
        self.rows: list[tuple[str, str, str, int, int, str]] = []
        self.skipped: Counter[str] = Counter()
        self.problems: list[dict[str, str]] = []
        self._seen_dirs: set[tuple[int, int]] = set()

    def _relpath(self, path: str) -> str:
        return Path(os.path.relpath(path, self.task_dir)).as_posix()

    def _enter(self, path: str) -> bool:
        """False if this directory was already walked (a symlink loop or a second link)."""
        try:
            st = os.stat(path)
        except OSError as e:
            self.problems.append(
                {"relpath": self._relpath(path), "problem": f"unreadable_dir: {e}"}
            )
            return False
        key = (st.st_dev, st.st_ino)
        if key in self._seen_dirs:
            self.problems.append({"relpath": self._relpath(path), "problem": "symlink_loop"})
            return False
        self._seen_dirs.add(key)
        return True

    def walk_class(self, class_dir: str, split_dir: str, class_name: str) -> None:
        if not self._enter(class_dir):
            return
        try:
            entries = sorted(os.scandir(class_dir), key=lambda e: e.name)
        except OSError as e:
            self.problems.append(
                {"relpath": self._relpath(class_dir), "problem": f"unreadable_dir: {e}"}
            )
            return
        for entry in entries:
            reason = _is_hidden_or_litter(entry.name)
            if reason:
                self.skipped[reason] += 1
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                self.walk_class(entry.path, split_dir, class_name)
                continue
            ext = os.path.splitext(entry.name)[1].lower()
            if ext not in self.extensions:
                self.skipped["not_image_extension"] += 1
                continue
            try:
                st = entry.stat(follow_symlinks=True)
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:
                size, mtime = -1, -1  # broken symlink: listed so integrity reports it
            else:
                if not stat.S_ISREG(st.st_mode):  # a FIFO or device: reading it could block
                    self.problems.append(
                        {"relpath": self._relpath(entry.path), "problem": "not_a_regular_file"}
                    )
                    continue
            self.rows.append((self._relpath(entry.path), split_dir, class_name, size, mtime, ext))

    def walk_classes_in(self, parent: str, split_dir: str) -> None:
        for entry in sorted(os.scandir(parent), key=lambda e: e.name):
            reason = _is_hidden_or_litter(entry.name)
            if reason:
                self.skipped[reason] += 1
            elif entry.is_dir(follow_symlinks=True):
                self.walk_class(entry.path, split_dir, entry.name)
            elif entry.name != TASK_FILE:
                self.skipped["file_outside_class"] += 1


def scan_task(task_dir: Path, config: ScanConfig | None = None) -> ScanResult:
    """List every image file of one task, in one pass, without opening any of them."""
    config = config or ScanConfig()
    if not task_dir.is_dir():
        raise DataRootError(f"task folder {task_dir} does not exist")
    walker = _Walker(task_dir, config)
    top = [e for e in os.scandir(task_dir) if e.is_dir(follow_symlinks=True)]
    split_dirs = sorted(e.name for e in top if e.name in SPLIT_DIRS)
    if split_dirs:
        layout = "split"
        for e in top:
            if e.name not in SPLIT_DIRS and not e.name.startswith("."):
                walker.skipped["dir_outside_split"] += 1
        for split in split_dirs:
            walker.walk_classes_in(str(task_dir / split), split)
    else:
        layout = "flat"
        walker.walk_classes_in(str(task_dir), "none")
    inventory = pd.DataFrame(walker.rows, columns=INVENTORY_COLUMNS)
    inventory = inventory.astype({"bytes": "int64", "mtime_ns": "int64"})
    return ScanResult(inventory, layout, walker.skipped, walker.problems)


def listing_fingerprint(task_dir: Path, inventory: pd.DataFrame) -> str:
    """Digest of every file's (relpath, size, mtime) and of task.yaml: the raw data version."""
    listing = sorted(
        zip(
            inventory["relpath"],
            inventory["bytes"].tolist(),
            inventory["mtime_ns"].tolist(),
            strict=True,
        )
    )
    task_file = task_dir / TASK_FILE
    settings = task_file.read_bytes().hex() if task_file.is_file() else ""
    return fingerprint("raw_images", listing, settings)
