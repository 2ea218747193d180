"""Check every listed file: decode it fully, hash it, and record findings with stable codes.

Per-file checks run in worker processes (a full decode: ``Image.verify()`` alone misses
truncated files). Cross-file checks (duplicates, conflicting labels, leakage between split
folders) run afterwards on the content hashes. Nothing is ever written to the raw folder.

Files whose (relpath, size, mtime) are unchanged since the previous run reuse their
per-file results, so adding a handful of images to a large task decodes only those.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections.abc import Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image, ImageFile

from mtmc_pipeline.config import IntegrityConfig

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

DEFAULT_SEVERITY: dict[str, str] = {
    EMPTY_FILE: "error",
    UNREADABLE: "error",
    NOT_AN_IMAGE: "error",
    EXTENSION_MISMATCH: "warn",
    TRUNCATED: "error",
    DECOMPRESSION_BOMB: "error",
    TOO_SMALL: "error",
    CMYK: "warn",
    HIGH_BIT_DEPTH: "warn",
    PALETTE_ALPHA: "warn",
    ANIMATED: "warn",
    EXIF_ROTATED: "warn",
    EXACT_DUPLICATE: "warn",
    CONFLICTING_LABELS: "error",
    CROSS_SPLIT_LEAK: "error",
}
CROSS_FILE_CODES = frozenset({EXACT_DUPLICATE, CONFLICTING_LABELS, CROSS_SPLIT_LEAK})

# Task-level findings (stored in the integrity file's metadata, shown in the UI).
CLASS_WITHOUT_USABLE_IMAGE = "class_without_usable_image"
CLASS_NOT_IN_TRAIN = "class_not_in_train"

_MAGIC: list[tuple[bytes, int, str]] = [
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"WEBP", 8, "WEBP"),
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
_HIGH_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_SPLIT_ORDER = {"train": 0, "none": 0, "val": 1, "test": 2}
PER_FILE_COLUMNS = ["width", "height", "mode", "format", "content_hash", "file_issues", "detail"]


def sniff_format(head: bytes) -> str | None:
    """The image format named by a file's first bytes, or None."""
    for magic, offset, name in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return name
    return None


@dataclass(frozen=True)
class _Limits:
    min_side: int
    max_pixels: int


def inspect_file(path: str, ext: str, limits: _Limits) -> dict[str, object]:
    """Read, hash and fully decode one file. Never raises: problems become issue codes."""
    out: dict[str, object] = dict.fromkeys(PER_FILE_COLUMNS)
    issues: list[str] = []
    out["file_issues"] = issues
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        issues.append(UNREADABLE)
        out["detail"] = f"{type(e).__name__}: {e.strerror or e}"
        return out
    out["content_hash"] = hashlib.blake2b(data, digest_size=16).hexdigest()
    if not data:
        issues.append(EMPTY_FILE)
        return out
    sniffed = sniff_format(data[:16])
    if sniffed is None:
        issues.append(NOT_AN_IMAGE)
        out["detail"] = f"unrecognised leading bytes {data[:8].hex()}"
        return out
    if _EXT_FORMAT.get(ext) not in (None, sniffed):
        issues.append(EXTENSION_MISMATCH)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            out.update(width=width, height=height, mode=img.mode, format=img.format)
            if width * height > limits.max_pixels:
                issues.append(DECOMPRESSION_BOMB)
                out["detail"] = f"{width}x{height} exceeds max_pixels={limits.max_pixels}"
                return out
            img.load()
            if getattr(img, "n_frames", 1) > 1:
                issues.append(ANIMATED)
            if img.getexif().get(0x0112, 1) not in (1, None):
                issues.append(EXIF_ROTATED)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError) as e:
        issues.append(TRUNCATED)
        out["detail"] = f"{type(e).__name__}: {e}"
        return out
    if min(width, height) < limits.min_side:
        issues.append(TOO_SMALL)
    mode = img.mode
    if mode == "CMYK":
        issues.append(CMYK)
    elif mode in _HIGH_BIT_MODES:
        issues.append(HIGH_BIT_DEPTH)
    elif mode in ("P", "PA") and ("transparency" in img.info or mode == "PA"):
        issues.append(PALETTE_ALPHA)
    return out


def _init_worker() -> None:
    Image.MAX_IMAGE_PIXELS = None  # we apply our own, configurable limit before decoding
    ImageFile.LOAD_TRUNCATED_IMAGES = False


def _inspect_chunk(items: list[tuple[str, str]], limits: _Limits) -> list[dict[str, object]]:
    return [inspect_file(path, ext, limits) for path, ext in items]


def _chunks(items: list[tuple[str, str]], size: int) -> Iterable[list[tuple[str, str]]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def inspect_files(
    paths: list[str], exts: list[str], config: IntegrityConfig
) -> list[dict[str, object]]:
    """Per-file results in input order, decoded in parallel worker processes."""
    limits = _Limits(config.min_side, config.max_pixels)
    items = list(zip(paths, exts, strict=True))
    workers = config.workers or os.cpu_count() or 1
    if workers == 1 or len(items) < 64:
        _init_worker()
        return _inspect_chunk(items, limits)
    chunk = max(16, min(256, len(items) // (workers * 4) or 1))
    results: list[dict[str, object]] = []
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) as pool:
        for part in pool.map(_inspect_chunk, _chunks(items, chunk), [limits] * len(items)):
            results.extend(part)
    return results


def _cross_file_issues(df: pd.DataFrame) -> pd.Series:
    """Issue codes that need the whole task: duplicates, conflicting labels, split leakage."""
    out: dict[int, list[str]] = {i: [] for i in df.index}
    hashed = df[df["content_hash"].notna() & (df["bytes"] > 0)]
    for _, group in hashed.groupby("content_hash", sort=False):
        if len(group) < 2:
            continue
        if group["class_name"].nunique() > 1:
            for i in group.index:
                out[i].append(CONFLICTING_LABELS)
            continue
        order = group.assign(_s=group["split_dir"].map(_SPLIT_ORDER)).sort_values(["_s", "relpath"])
        first_split = order["split_dir"].iloc[0]
        for i in order.index[1:]:
            leak = df.at[i, "split_dir"] != first_split
            out[i].append(CROSS_SPLIT_LEAK if leak else EXACT_DUPLICATE)
    return pd.Series(out)


def _status(issues: list[str], severity: Mapping[str, str]) -> str:
    levels = {severity.get(code, "error") for code in issues}
    if "error" in levels:
        return "error"
    return "warn" if "warn" in levels else "ok"


def check_integrity(
    task_dir: Path,
    inventory: pd.DataFrame,
    config: IntegrityConfig | None = None,
    previous: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, dict[str, object]]:
    """Integrity rows (inventory columns + findings) and a summary with task-level findings.

    ``previous`` is the last integrity table; its per-file results are reused for files whose
    (relpath, bytes, mtime_ns) did not change.
    """
    config = config or IntegrityConfig()
    severity = {**DEFAULT_SEVERITY, **config.severity}
    df = inventory.reset_index(drop=True).copy()
    key = ["relpath", "bytes", "mtime_ns"]
    per_file = pd.DataFrame(index=df.index, columns=PER_FILE_COLUMNS, dtype=object)
    todo = df.index
    if previous is not None and len(previous) and "file_issues" in previous.columns:
        prev = previous[key + PER_FILE_COLUMNS].drop_duplicates("relpath")
        merged = df[key].merge(prev, on=key, how="left")
        hit = merged["content_hash"].notna() | merged["file_issues"].notna()
        per_file.loc[hit, PER_FILE_COLUMNS] = merged.loc[hit, PER_FILE_COLUMNS].to_numpy()
        todo = df.index[~hit.to_numpy()]
    paths = [str(task_dir / rel) for rel in df.loc[todo, "relpath"]]
    results = inspect_files(paths, df.loc[todo, "ext"].tolist(), config)
    for i, res in zip(todo, results, strict=True):
        for col in PER_FILE_COLUMNS:
            per_file.at[i, col] = res[col]
    df = pd.concat([df, per_file], axis=1)
    df["file_issues"] = df["file_issues"].map(lambda v: [str(x) for x in v])
    cross = _cross_file_issues(df)
    df["issues"] = [list(f) + list(c) for f, c in zip(df["file_issues"], cross, strict=True)]
    df["issues"] = df["issues"].map(lambda codes: [c for c in codes if severity.get(c) != "ignore"])
    df["status"] = df["issues"].map(lambda codes: _status(codes, severity))
    df["perceptual_hash"] = None
    df = df.astype({"width": "Int64", "height": "Int64"})
    summary = {
        "decoded": len(todo),
        "reused": len(df) - len(todo),
        "task_findings": task_findings(df),
        "severity": severity,
    }
    return df, summary


def task_findings(df: pd.DataFrame) -> list[dict[str, str]]:
    """Problems of the task as a whole: classes that cannot be learned or evaluated."""
    findings: list[dict[str, str]] = []
    usable = df[df["status"] != "error"]
    for cls in sorted(set(df["class_name"]) - set(usable["class_name"])):
        findings.append({"code": CLASS_WITHOUT_USABLE_IMAGE, "class_name": cls})
    if (df["split_dir"] == "train").any():
        in_train = set(usable.loc[usable["split_dir"] == "train", "class_name"])
        for cls in sorted(set(usable["class_name"]) - in_train):
            findings.append({"code": CLASS_NOT_IN_TRAIN, "class_name": cls})
    return findings


def usable_rows(integrity: pd.DataFrame) -> pd.DataFrame:
    """Rows that may be used for training and evaluation (status is not error)."""
    return integrity[integrity["status"] != "error"].reset_index(drop=True)
