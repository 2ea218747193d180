"""Check every listed file: decode it fully, hash it, and record findings with stable codes.

Per-file checks run in worker processes (a full decode: ``Image.verify()`` alone misses
truncated files); the same pass takes each image's perceptual fingerprint
(:mod:`mtmc_pipeline.data.near_duplicates`). Cross-file checks (duplicates, conflicting labels,
leakage between split folders) run afterwards on the content hashes, and again, for near
duplicates, on the fingerprints. Nothing is ever written to the raw folder.

Files whose (relpath, size, mtime) are unchanged since the previous run reuse their
per-file results, so adding a handful of images to a large task decodes only those.

What keeps one hostile file from hurting the run: files are opened non-blocking and only
regular files are read (a pipe named ``x.jpg`` cannot hang it); the decoder is chosen by the
file's leading bytes, never guessed; image dimensions are checked against ``max_pixels``
before any pixel is decoded; files above 64 MiB are hashed in blocks instead of read whole;
and a worker process that dies on a file is replaced, that file recorded as ``unreadable``.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import os
import stat
import warnings
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image, ImageFile

from mtmc_pipeline.config import IntegrityConfig
from mtmc_pipeline.data.near_duplicates import (
    Small,
    fingerprints,
    group_labels,
    hashes_and_thumbs,
    near_duplicate_pairs,
    reduced,
)

# Stable issue codes. Never rename one: reports, checks and users' scripts match on them.
EMPTY_FILE = "empty_file"
UNREADABLE = "unreadable"
NOT_AN_IMAGE = "not_an_image"
EXTENSION_MISMATCH = "extension_mismatch"
TRUNCATED = "truncated"
DECOMPRESSION_BOMB = "decompression_bomb"
TOO_SMALL = "too_small"
CMYK = "cmyk"
HIGH_BIT_DEPTH = "high_bit_depth"
PALETTE_ALPHA = "palette_alpha"
ANIMATED = "animated"
EXIF_ROTATED = "exif_rotated"
EXACT_DUPLICATE = "exact_duplicate"
CONFLICTING_LABELS = "conflicting_labels"
CROSS_SPLIT_LEAK = "cross_split_leak"
NEAR_DUPLICATE = "near_duplicate"
NEAR_DUPLICATE_CONFLICT = "near_duplicate_conflict"
NEAR_DUPLICATE_LEAK = "near_duplicate_leak"
LABELS_UNKNOWN_CLASS = "labels_unknown_class"
LABELS_DUPLICATE_ROW = "labels_duplicate_row"
NOT_IN_LABELS = "not_in_labels_csv"

# code -> (default severity, meaning). "error" excludes the file from training, "warn" keeps it.
ISSUES: dict[str, tuple[str, str]] = {
    EMPTY_FILE: ("error", "the file has zero bytes"),
    UNREADABLE: ("error", "cannot be read: permission, broken link, not a regular file"),
    NOT_AN_IMAGE: ("error", "leading bytes are not JPEG, PNG, GIF, BMP, TIFF or WebP"),
    EXTENSION_MISMATCH: ("warn", "the extension names another format than the bytes"),
    TRUNCATED: ("error", "truncated or corrupt: the full decode failed"),
    DECOMPRESSION_BOMB: ("error", "width x height above integrity.max_pixels; not decoded"),
    TOO_SMALL: ("error", "a side shorter than integrity.min_side"),
    CMYK: ("warn", "CMYK colour; converted to RGB for training"),
    HIGH_BIT_DEPTH: ("warn", "16 bits per channel or float pixels; reduced to 8 bits"),
    PALETTE_ALPHA: ("warn", "palette image with transparency; composited for training"),
    ANIMATED: ("warn", "several frames; only the first is used"),
    EXIF_ROTATED: ("warn", "EXIF orientation is not 1; the image is turned upright"),
    EXACT_DUPLICATE: ("warn", "same bytes as an earlier file of the same class and split"),
    CONFLICTING_LABELS: ("error", "the same bytes are filed under two or more classes"),
    CROSS_SPLIT_LEAK: ("error", "same bytes as a file in another split (train wins)"),
    NEAR_DUPLICATE: ("warn", "a near copy (re-encoded, resized) of an earlier file of its class"),
    NEAR_DUPLICATE_CONFLICT: ("warn", "near copies of this picture are filed under two classes"),
    NEAR_DUPLICATE_LEAK: ("error", "a near copy of a file in an earlier split (train wins)"),
    LABELS_UNKNOWN_CLASS: ("warn", "labels.csv gives it a label outside `classes` (dropped)"),
    LABELS_DUPLICATE_ROW: ("warn", "labels.csv lists it more than once (the first row counts)"),
    NOT_IN_LABELS: ("error", "multi-label task with labels.csv: the file has no row in it"),
}
DEFAULT_SEVERITY: dict[str, str] = {code: sev for code, (sev, _) in ISSUES.items()}

# Task-level findings (stored in the integrity file's metadata, shown in the UI).
CLASS_WITHOUT_USABLE_IMAGE = "class_without_usable_image"
CLASS_NOT_IN_TRAIN = "class_not_in_train"
LABELS_MISSING_FILE = "labels_missing_file"  # a labels.csv row names no image of the task
LABELS_BAD_ROW = "labels_bad_row"  # a labels.csv row without exactly two fields

_MAGIC: list[tuple[bytes, int, str]] = [
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"RIFF", 0, "WEBP"),  # and "WEBP" at offset 8, checked in sniff_format
]
_EXT_FORMAT = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".gif": "GIF",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".webp": "WEBP",
}
# Where Pillow finds an orientation (getexif() costs ~6% of a small JPEG's check: skip it
# when a file has none of these; TIFF and PNG keep theirs elsewhere).
_EXIF_SOURCES = ("exif", "xmp", "XML:com.adobe.xmp", "Raw profile type exif")
_HIGH_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_SPLIT_ORDER = {"train": 0, "none": 0, "val": 1, "test": 2}
_IN_MEMORY_LIMIT = 64 * 2**20  # larger files are hashed in blocks and decoded from disk
PER_FILE_COLUMNS = [
    "width",
    "height",
    "mode",
    "format",
    "content_hash",
    "file_issues",
    "detail",
    "perceptual_hash",
    "colour_layout",
]
KEY_COLUMNS = ["relpath", "bytes", "mtime_ns"]

# The stored table's schema, fixed so that it never depends on the data: on a clean task the
# issue lists would otherwise be inferred as list<null> and the optional columns as null.
INTEGRITY_SCHEMA = pa.schema(
    [
        ("relpath", pa.string()),
        ("split_dir", pa.string()),
        ("class_name", pa.string()),
        ("bytes", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("ext", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("mode", pa.string()),
        ("format", pa.string()),
        ("content_hash", pa.string()),
        ("file_issues", pa.list_(pa.string())),
        ("detail", pa.string()),
        ("issues", pa.list_(pa.string())),
        ("status", pa.string()),
        ("perceptual_hash", pa.string()),
        ("colour_layout", pa.binary()),
        ("near_duplicate_group", pa.int64()),
    ]
)

PerFile = tuple[
    int | None,
    int | None,
    str | None,
    str | None,
    str | None,
    list[str],
    str | None,
    str | None,
    bytes | None,
]
# inspect_file's result: a PerFile still holding what near_duplicates.reduced kept of the
# image instead of its fingerprint
Inspected = tuple[
    int | None, int | None, str | None, str | None, str | None, list[str], str | None, Small
]
_NO_PRINT = (None, None)  # perceptual_hash, colour_layout of a file that was not decoded


def sniff_format(head: bytes) -> str | None:
    """The image format named by a file's first bytes, or None."""
    for magic, offset, name in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            if name == "WEBP" and head[8:12] != b"WEBP":
                return None
            return name
    return None


@dataclass(frozen=True)
class Limits:
    """The per-file settings; findings made under other limits are not reused."""

    min_side: int
    max_pixels: int
    fingerprints: bool

    @classmethod
    def of(cls, config: IntegrityConfig) -> Limits:
        return cls(config.min_side, config.max_pixels, config.near_duplicates)


def _open_regular(path: str) -> tuple[int | None, int, str | None]:
    """(file descriptor, size) or (None, -1, why it cannot be read). Never blocks."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        return None, -1, f"{type(e).__name__}: {e.strerror or e}"
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None, -1, "not a regular file (a pipe, socket or device)"
    return fd, st.st_size, None


def _hash_and_source(fd: int, size: int) -> tuple[str, bytes, IO[bytes]]:
    """(content hash, first 32 bytes, a readable stream at 0) of an open regular file."""
    if size <= _IN_MEMORY_LIMIT:
        data = os.read(fd, size + 1)  # one system call, unless the file grew since fstat
        if len(data) > size:
            data += b"".join(iter(lambda: os.read(fd, 2**20), b""))
        return hashlib.blake2b(data, digest_size=16).hexdigest(), data[:32], io.BytesIO(data)
    f = os.fdopen(os.dup(fd), "rb")  # large: hash in blocks, then decode from the file
    try:
        h = hashlib.blake2b(digest_size=16)
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
        f.seek(0)
        head = f.read(32)
        f.seek(0)
    except OSError:
        f.close()
        raise
    return h.hexdigest(), head, f


def _png_bit_depth(head: bytes) -> int | None:
    return head[24] if head[12:16] == b"IHDR" and len(head) > 24 else None


def inspect_file(path: str, ext: str, limits: Limits) -> Inspected:
    """Read, hash and fully decode one file. Never raises: problems become issue codes.

    Returns the values of ``PER_FILE_COLUMNS``, with one output of
    :func:`near_duplicates.reduced` in place of the last two: :func:`_inspect_chunk`
    fingerprints a whole chunk's in one batch.
    """
    issues: list[str] = []
    fd, size, why = _open_regular(path)
    if fd is None:
        return None, None, None, None, None, [UNREADABLE], why, None
    try:
        digest, head, source = _hash_and_source(fd, size)
    except OSError as e:
        return None, None, None, None, None, [UNREADABLE], f"{type(e).__name__}: {e}", None
    finally:
        os.close(fd)
    with source:
        if not head:
            return None, None, None, None, digest, [EMPTY_FILE], None, None
        fmt = sniff_format(head)
        if fmt is None:
            detail = f"leading bytes {head[:8].hex()}"
            return None, None, None, None, digest, [NOT_AN_IMAGE], detail, None
        if _EXT_FORMAT.get(ext, fmt) != fmt:
            issues.append(EXTENSION_MISMATCH)
        width = height = mode = found = None
        try:
            img = Image.open(source, formats=[fmt])
            width, height = img.size
            mode, found = img.mode, img.format
            if width * height > limits.max_pixels:
                issues.append(DECOMPRESSION_BOMB)
                detail = f"{width}x{height} exceeds integrity.max_pixels={limits.max_pixels}"
                return width, height, mode, found, digest, issues, detail, None
            # before load(): a TIFF forgets its tags once loaded (a PNG loads itself here)
            has_exif = found in ("TIFF", "PNG") or any(key in img.info for key in _EXIF_SOURCES)
            rotated = has_exif and img.getexif().get(0x0112, 1) in range(2, 9)
            img.load()
            if found != "MPO" and getattr(img, "n_frames", 1) > 1:
                issues.append(ANIMATED)
            if rotated:
                issues.append(EXIF_ROTATED)
        except Exception as e:  # any decoder failure is a finding about this file, never a crash
            issues.append(TRUNCATED)
            detail = f"{type(e).__name__}: {e}"
            return width, height, mode, found, digest, issues, detail, None
    if min(width, height) < limits.min_side:
        issues.append(TOO_SMALL)
    if mode == "CMYK":
        issues.append(CMYK)
    elif mode in _HIGH_BIT_MODES or _png_bit_depth(head) == 16:
        issues.append(HIGH_BIT_DEPTH)
    elif mode == "PA" or (mode == "P" and "transparency" in img.info):
        issues.append(PALETTE_ALPHA)
    small = reduced(img) if limits.fingerprints else None
    return width, height, mode, found, digest, issues, None, small


@contextlib.contextmanager
def _decoder_settings() -> Iterator[None]:
    """Our own configurable pixel limit replaces Pillow's; truncated images must fail."""
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = None, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _inspect_chunk(items: list[tuple[str, str]], limits: Limits) -> list[PerFile]:
    with _decoder_settings():
        rows = [inspect_file(path, ext, limits) for path, ext in items]
    prints = fingerprints([row[-1] for row in rows])
    return [(*row[:-1], *fingerprint) for row, fingerprint in zip(rows, prints, strict=True)]


def _worker_count(config: IntegrityConfig) -> int:
    if config.workers:
        return config.workers
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _run_in_pool(
    chunks: list[list[tuple[str, str]]], limits: Limits, workers: int
) -> dict[int, list[PerFile]]:
    """Results of the chunks a pool finished before any worker died (all, normally)."""
    done: dict[int, list[PerFile]] = {}
    # Forked workers share the parent's heap; frozen, the workers' garbage collector leaves
    # it alone instead of copying the pages it touches (about 55 MiB per worker measured
    # with the pipeline's imports; see benchmarks/scale.py).
    gc.freeze()
    try:
        with ProcessPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
            futures = {
                pool.submit(_inspect_chunk, chunk, limits): i for i, chunk in enumerate(chunks)
            }
            wait(futures, return_when=FIRST_EXCEPTION)
    finally:
        gc.unfreeze()
    for future, i in futures.items():
        if future.done() and future.exception() is None:
            done[i] = future.result()
    return done


def inspect_files(paths: list[str], exts: list[str], config: IntegrityConfig) -> list[PerFile]:
    """Per-file results in input order, decoded in parallel worker processes.

    If a worker dies (a decoder crash, the kernel's out-of-memory killer), the chunks it
    left unfinished are retried in smaller pieces; a single file that still kills its
    worker is recorded as ``unreadable``.
    """
    limits = Limits.of(config)
    items = list(zip(paths, exts, strict=True))
    workers = _worker_count(config)
    if workers == 1 or len(items) < 64:
        return _inspect_chunk(items, limits)
    size = max(8, min(1024, len(items) // (workers * 4)))
    results: list[PerFile | None] = [None] * len(items)
    todo = [(start, items[start : start + size]) for start in range(0, len(items), size)]
    while todo:
        done = _run_in_pool([chunk for _, chunk in todo], limits, workers)
        retry: list[tuple[int, list[tuple[str, str]]]] = []
        for i, (start, chunk) in enumerate(todo):
            if i in done:
                results[start : start + len(chunk)] = done[i]
            elif len(chunk) > 1:
                half = len(chunk) // 2
                retry += [(start, chunk[:half]), (start + half, chunk[half:])]
            else:
                detail = "the decoder process died on this file"
                results[start] = (None, None, None, None, None, [UNREADABLE], detail, *_NO_PRINT)
        todo = retry
    return results  # type: ignore[return-value]


def _cross_file_issues(df: pd.DataFrame, multilabel: bool = False) -> pd.Series:
    """Issue codes that need the whole task: duplicates, conflicting labels, split leakage.

    Among copies of the same bytes, the first in (train, val, test; relpath) order is kept as
    it is; a later copy in another split is a leak, in the same split a duplicate. Copies
    under different classes all get conflicting_labels: no one can say which label is right.
    In a multi-label task copies under different classes of one split are one image with
    several labels: only a second copy in the same class folder is a duplicate.
    """
    hashed = df["content_hash"].notna() & (df["bytes"] != 0)
    copies = df.loc[hashed & df["content_hash"].duplicated(keep=False)]
    copies = copies.assign(_s=copies["split_dir"].map(_SPLIT_ORDER)).sort_values(["_s", "relpath"])
    by_hash = copies.groupby("content_hash", sort=False)
    later = copies["content_hash"].duplicated()
    if multilabel:
        conflicting = pd.Series(False, index=copies.index)
        duplicate = copies.duplicated(["content_hash", "split_dir", "class_name"])
    else:
        conflicting = by_hash["class_name"].transform("nunique") > 1
        duplicate = later
    leak = copies["split_dir"] != by_hash["split_dir"].transform("first")
    codes = pd.Series(
        np.select(
            [conflicting, later & leak, duplicate],
            [CONFLICTING_LABELS, CROSS_SPLIT_LEAK, EXACT_DUPLICATE],
            "",
        ),
        index=copies.index,
        dtype=object,
    )
    return codes[codes != ""]


def _near_duplicate_issues(
    df: pd.DataFrame, config: IntegrityConfig
) -> tuple[pd.Series, pd.Series]:
    """Near-duplicate codes (one per flagged row) and each row's group number (or NA).

    One file per content hash takes part (exact copies have their own codes). Within a group,
    in (train, val, test; relpath) order, the first file is kept as it is; a file in a later
    split than the first is a leak; groups spanning two classes are conflicts; other later
    files are near duplicates.
    """
    group = pd.Series(pd.NA, index=df.index, dtype="Int64")
    found = df[df["perceptual_hash"].notna() & df["colour_layout"].notna()]
    if not config.near_duplicates or len(found) < 2:
        return pd.Series(dtype=object), group
    found = found.assign(_s=found["split_dir"].map(_SPLIT_ORDER)).sort_values(["_s", "relpath"])
    found = found[~found["content_hash"].duplicated()]
    hashes, thumbs = hashes_and_thumbs(found)
    pairs = near_duplicate_pairs(
        hashes, thumbs, config.near_duplicate_distance, config.near_duplicate_colour
    )
    labels = group_labels(pairs, len(found))
    members = found[labels >= 0].assign(_g=labels[labels >= 0])
    group[members.index] = members["_g"]
    by_group = members.groupby("_g", sort=False)
    conflict = by_group["class_name"].transform("nunique") > 1
    leak = members["split_dir"] != by_group["split_dir"].transform("first")
    later = members["_g"].duplicated()
    codes = pd.Series(
        np.select(
            [leak, conflict, later],
            [NEAR_DUPLICATE_LEAK, NEAR_DUPLICATE_CONFLICT, NEAR_DUPLICATE],
            "",
        ),
        index=members.index,
        dtype=object,
    )
    return codes[codes != ""], group


def _findings(
    df: pd.DataFrame, cross: list[pd.Series], severity: Mapping[str, str]
) -> tuple[list[list[str]], np.ndarray]:
    """Every row's issue codes (per-file then cross-file, ignored codes dropped) and status.

    ``cross`` holds Series of one code per flagged row (exact copies, near copies). Only rows
    with a finding are visited: a rerun over a large clean task stays cheap.
    """
    per_file = df["file_issues"].to_numpy()
    extras = [c.reindex(df.index).to_numpy() for c in cross]
    flagged = np.fromiter(map(len, per_file), bool, len(df))
    for extra in extras:
        flagged |= pd.notna(extra)
    issues: list[list[str]] = [[] for _ in range(len(df))]
    status = np.full(len(df), "ok", dtype=object)
    for i in np.flatnonzero(flagged):
        codes = [*per_file[i], *(e[i] for e in extras if pd.notna(e[i]))]
        issues[i] = [c for c in codes if severity[c] != "ignore"]
        status[i] = _status(issues[i], severity)
    return issues, status


def _status(issues: list[str], severity: Mapping[str, str]) -> str:
    levels = {severity.get(code, "error") for code in issues}
    if "error" in levels:
        return "error"
    return "warn" if "warn" in levels else "ok"


def _reusable(inventory: pd.DataFrame, previous: pd.DataFrame | None) -> pd.DataFrame:
    """Per-file columns of ``previous`` aligned to ``inventory`` (all-missing rows to decode)."""
    if previous is None or previous.empty:
        return pd.DataFrame(index=inventory.index, columns=PER_FILE_COLUMNS).assign(_hit=False)
    prev = previous[KEY_COLUMNS + PER_FILE_COLUMNS].drop_duplicates("relpath")
    merged = inventory[KEY_COLUMNS].merge(prev, on=KEY_COLUMNS, how="left", indicator="_hit")
    merged.index = inventory.index
    merged["_hit"] = merged["_hit"] == "both"
    return merged[[*PER_FILE_COLUMNS, "_hit"]]


def check_integrity(
    task_dir: Path,
    inventory: pd.DataFrame,
    config: IntegrityConfig | None = None,
    previous: pd.DataFrame | None = None,
    class_folders: Iterable[tuple[str, str]] = (),
    multilabel: bool = False,
) -> tuple[pd.DataFrame, dict[str, object]]:
    """Integrity rows (inventory columns + findings) and a summary with task-level findings.

    ``previous`` is the last integrity table made with the same :class:`Limits` (at least its
    ``KEY_COLUMNS`` and ``PER_FILE_COLUMNS``); its
    per-file results are reused for files whose (relpath, bytes, mtime_ns) did not change.
    ``class_folders`` are the (split_dir, class) folders the scan found, empty ones included.
    ``multilabel``: copies of one image in several class folders are its labels, no conflict.
    """
    config = config or IntegrityConfig()
    severity = {**DEFAULT_SEVERITY, **config.severity}
    df = inventory.reset_index(drop=True)
    reused = _reusable(df, previous)
    hit = reused["_hit"].to_numpy(dtype=bool)
    todo = np.flatnonzero(~hit)
    root = os.fspath(task_dir)
    paths = [os.path.join(root, rel) for rel in df["relpath"].to_numpy()[todo]]
    fresh = inspect_files(paths, df["ext"].to_numpy()[todo].tolist(), config)
    per_file = pd.concat(
        [
            reused.loc[hit, PER_FILE_COLUMNS],
            pd.DataFrame.from_records(fresh, columns=PER_FILE_COLUMNS, index=df.index[todo]),
        ]
    ).sort_index()
    df = pd.concat([df, per_file], axis=1)
    near, df["near_duplicate_group"] = _near_duplicate_issues(df, config)
    df["issues"], df["status"] = _findings(df, [_cross_file_issues(df, multilabel), near], severity)
    df = df.astype({"width": "Int64", "height": "Int64"})
    summary = {
        "decoded": len(todo),
        "reused": len(df) - len(todo),
        "task_findings": task_findings(df, class_folders),
        "severity": severity,
        "limits": asdict(Limits.of(config)),
    }
    return df, summary


def task_findings(
    df: pd.DataFrame, class_folders: Iterable[tuple[str, str]] = ()
) -> list[dict[str, str]]:
    """Problems of the task as a whole: classes that cannot be learned or evaluated."""
    findings: list[dict[str, str]] = []
    usable = df[df["status"] != "error"]
    per_class = df["class_name"].value_counts()
    listed = set(per_class.index)
    for cls in sorted(listed - set(usable["class_name"].unique())):
        detail = f"all {per_class[cls]} files have errors"
        findings.append({"code": CLASS_WITHOUT_USABLE_IMAGE, "class_name": cls, "detail": detail})
    for split, cls in sorted(set(map(tuple, class_folders))):
        if cls not in listed:
            folder = cls if split == "none" else f"{split}/{cls}"
            detail = f"folder {folder} has no image files"
            findings.append(
                {"code": CLASS_WITHOUT_USABLE_IMAGE, "class_name": cls, "detail": detail}
            )
            listed.add(cls)
    if (df["split_dir"] == "train").any():
        in_train = set(usable.loc[usable["split_dir"] == "train", "class_name"].unique())
        for cls in sorted(set(usable["class_name"].unique()) - in_train):
            where = sorted(set(usable.loc[usable["class_name"] == cls, "split_dir"]))
            detail = f"usable images only in {', '.join(where)}: it cannot be learned"
            findings.append({"code": CLASS_NOT_IN_TRAIN, "class_name": cls, "detail": detail})
    return findings


def usable_rows(integrity: pd.DataFrame) -> pd.DataFrame:
    """Rows that may be used for training and evaluation (status is not error)."""
    return integrity[integrity["status"] != "error"].reset_index(drop=True)
