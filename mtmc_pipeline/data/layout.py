"""Walk a data root: which folders are tasks, which are classes, which files are images.

Rules (also in the README):

- A task is any non-hidden directory directly under the data root.
- If a task has a ``train``, ``val`` or ``test`` directory (any case; ``valid`` and
  ``validation`` also mean val), it uses the split layout ``<task>/<split>/<class>/...``;
  other directories at that level are ignored (and counted). Otherwise every directory
  under the task is a class (flat layout ``<task>/<class>/...``).
- Files anywhere below a class directory belong to that class (nested folders are fine).
- Hidden files and folders (``.name``) and OS litter (``Thumbs.db``, ``desktop.ini``) are
  skipped and counted; files whose extension is not an image extension are skipped and counted.
- Symlinked files and folders are followed. Broken links, links that loop and things that are
  not regular files (pipes, devices) are listed with size -1 so the integrity stage reports
  them; a folder reached twice (a symlink loop) is walked once; names that are not valid
  UTF-8 cannot be stored in the manifests and are recorded as walk problems.

The walk is iterative (no recursion limit on deep trees), opens no file, and never raises for
anything below the task folder: what it cannot read becomes an entry in ``problems``.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISDIR, S_ISREG

import pandas as pd

from mtmc_pipeline.artifacts import fingerprint
from mtmc_pipeline.config import LABELS_FILE, TASK_FILE, ScanConfig
from mtmc_pipeline.data.review import REVIEW_FILE, review_digest

SPLIT_ALIASES = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}
OS_LITTER = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", "icon\r"})
_RENAME = "rename it: manifests store UTF-8 paths"
INVENTORY_COLUMNS = ["relpath", "split_dir", "class_name", "bytes", "mtime_ns", "ext"]
_TASK_FILES = (TASK_FILE, REVIEW_FILE)  # files of the task folder itself, not images


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
        if not e.name.startswith(".") and _is_dir(e) and _utf8(e.name)
    )


@dataclass
class ScanResult:
    """The inventory of one task plus what the walk skipped or could not follow.

    ``class_folders`` lists every (split_dir, class) folder found, empty ones included, so
    the integrity stage can report a class folder that holds no image at all.
    """

    inventory: pd.DataFrame
    layout: str  # "split" or "flat"
    skipped: Counter[str] = field(default_factory=Counter)
    problems: list[dict[str, str]] = field(default_factory=list)
    class_folders: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        return {
            "layout": self.layout,
            "skipped": dict(self.skipped),
            "problems": self.problems,
            "class_folders": [list(pair) for pair in self.class_folders],
        }


def _skip_reason(name: str) -> str | None:
    if name.startswith("."):
        return "hidden"
    if name.lower() in OS_LITTER:
        return "os_litter"
    return None


def _utf8(name: str) -> bool:
    """False for names with bytes that are not UTF-8 (Python keeps them as surrogates)."""
    if name.isascii():
        return True
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return False


def _printable(path: str) -> str:
    return os.fsencode(path).decode("utf-8", "backslashreplace")


class _Walker:
    def __init__(self, task_dir: Path, config: ScanConfig) -> None:
        self.root = os.fspath(task_dir)
        self.extensions = frozenset(config.extensions)
        self.files: dict[str, list] = {c: [] for c in INVENTORY_COLUMNS}
        self.skipped: Counter[str] = Counter()
        self.problems: list[dict[str, str]] = []
        self.class_folders: list[tuple[str, str]] = []
        self._seen_dirs: set[tuple[int, int]] = set()

    def _problem(self, relpath: str, problem: str, detail: str) -> None:
        self.problems.append({"relpath": _printable(relpath), "problem": problem, "detail": detail})

    def entries(self, path: str, relpath: str) -> list[os.DirEntry[str]]:
        """The entries of a directory not walked before; [] (and a problem) otherwise."""
        try:
            st = os.stat(path)
            key = (st.st_dev, st.st_ino)
            if key in self._seen_dirs:
                self._problem(
                    relpath, "symlink_loop", "folder already walked (a link back up the tree)"
                )
                return []
            self._seen_dirs.add(key)
            with os.scandir(path) as it:
                return list(it)
        except OSError as e:
            self._problem(relpath, "unreadable_dir", e.strerror or str(e))
            return []

    def walk_class(self, path: str, relpath: str, split_dir: str, class_name: str) -> None:
        """Every image file below one class folder, depth first, without recursion.

        This loop is the scan's hot path (one pass per file): it stays flat on purpose.
        """
        self.class_folders.append((split_dir, class_name))
        skipped, extensions = self.skipped, self.extensions
        relpaths, sizes, mtimes, exts = (
            self.files[c] for c in ("relpath", "bytes", "mtime_ns", "ext")
        )
        first = len(relpaths)
        stack = [(path, relpath)]
        while stack:
            dir_path, dir_rel = stack.pop()
            subdirs = []
            prefix = f"{dir_rel}/"
            for entry in self.entries(dir_path, dir_rel):
                name = entry.name
                lower = name.lower()
                if name[0] == "." or lower in OS_LITTER:
                    skipped[_skip_reason(name)] += 1
                    continue
                if not (name.isascii() or _utf8(name)):
                    self._problem(prefix + name, "name_not_utf8", _RENAME)
                    continue
                dot = lower.rfind(".")
                if dot <= 0 or lower[dot:] not in extensions:
                    if _is_dir(entry):
                        subdirs.append((entry.path, prefix + name))
                    else:
                        skipped["not_image_extension"] += 1
                    continue
                try:
                    st = entry.stat()
                    if S_ISDIR(st.st_mode):  # a folder named like an image
                        subdirs.append((entry.path, prefix + name))
                        continue
                    # a pipe, socket or device is listed like a broken link: integrity says why
                    size, mtime = (st.st_size, st.st_mtime_ns) if S_ISREG(st.st_mode) else (-1, -1)
                except OSError:
                    size, mtime = -1, -1  # a broken or looping symlink
                relpaths.append(prefix + name)
                sizes.append(size)
                mtimes.append(mtime)
                exts.append(lower[dot:])
            subdirs.sort()
            stack.extend(reversed(subdirs))  # walked in name order: the first link wins
        added = len(relpaths) - first
        self.files["split_dir"] += [split_dir] * added
        self.files["class_name"] += [class_name] * added

    def walk_classes_in(self, entries: list[os.DirEntry[str]], relpath: str, split: str) -> None:
        """Every class folder among ``entries`` (a split folder's or the task's own)."""
        for entry in sorted(entries, key=lambda e: e.name):  # name order: the first link wins
            name = entry.name
            rel = f"{relpath}/{name}" if relpath else name
            reason = _skip_reason(name)
            if reason:
                self.skipped[reason] += 1
            elif not _utf8(name):
                self._problem(rel, "name_not_utf8", _RENAME)
            elif _is_dir(entry):
                self.walk_class(entry.path, rel, split, name)
            elif not (name in _TASK_FILES and not relpath):
                self.skipped["file_outside_class"] += 1


def scan_task(task_dir: Path, config: ScanConfig | None = None) -> ScanResult:
    """List every image file of one task, in one pass, without opening any of them."""
    config = config or ScanConfig()
    if not task_dir.is_dir():
        raise DataRootError(f"task folder {task_dir} does not exist")
    walker = _Walker(task_dir, config)
    top = walker.entries(walker.root, ".")
    split_dirs = sorted(
        ((SPLIT_ALIASES[e.name.lower()], e) for e in top if e.name.lower() in SPLIT_ALIASES),
        key=lambda pair: (pair[0], pair[1].name),
    )
    split_dirs = [(split, e) for split, e in split_dirs if _is_dir(e)]
    if split_dirs:
        layout = "split"
        for e in top:
            if e.name.lower() in SPLIT_ALIASES or _skip_reason(e.name) or e.name in _TASK_FILES:
                continue
            walker.skipped["dir_outside_split" if _is_dir(e) else "file_outside_class"] += 1
        for split, e in split_dirs:
            walker.walk_classes_in(walker.entries(e.path, e.name), e.name, split)
    else:
        layout = "flat"
        walker.walk_classes_in(top, "", "none")
    inventory = pd.DataFrame(walker.files).astype({"bytes": "int64", "mtime_ns": "int64"})
    inventory = inventory.sort_values("relpath", ignore_index=True)
    problems = sorted(walker.problems, key=lambda p: p["relpath"])
    return ScanResult(inventory, layout, walker.skipped, problems, sorted(walker.class_folders))


def listing_fingerprint(task_dir: Path, scan: ScanResult) -> str:
    """Digest of every file's (relpath, size, mtime), the class folders, task.yaml and
    review.csv and labels.csv (when there is one).

    This is the raw data version: it changes when a file is added, removed or rewritten,
    when a class folder appears (even an empty one) and when the task's settings or review
    change.
    """
    inventory = scan.inventory  # sorted by relpath
    listing = list(
        zip(
            inventory["relpath"],
            inventory["bytes"].tolist(),
            inventory["mtime_ns"].tolist(),
            strict=True,
        )
    )
    task_file = task_dir / TASK_FILE
    settings = task_file.read_bytes().hex() if task_file.is_file() else ""
    labels_file = task_dir / LABELS_FILE  # multi-label tasks: part of the raw data
    labels = [labels_file.read_bytes().hex()] if labels_file.is_file() else []
    review = review_digest(task_dir)
    return fingerprint("raw_images", listing, scan.class_folders, settings, review, *labels)
