"""Where a task's outputs live, and how they are written so a killed run never corrupts them.

The layout under the artifact root is a public contract (other tools read these files):

    <task>/inventory.parquet  <task>/integrity.parquet  <task>/splits.parquet
    <task>/sampling_weights.parquet  <task>/class_weights.parquet
    <task>/model/  <task>/evaluation/  <task>/calibration/  <task>/export/
    summary/leaderboard.parquet

Every file is written to a temporary name in its final directory and renamed into place;
directories (model bundle, reports) are built beside their final place and swapped in.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

FINGERPRINT_KEY = b"mtmc.fingerprint"
DATA_VERSION_KEY = b"mtmc.data_version"
META_KEY = b"mtmc.meta"
MODEL_FILE = "model.json"
ONNX_FILE = "model.onnx"  # T/export/: the served model
SIDECAR_FILE = "export.json"  # beside it: what it needs to be used without this project
"""The model bundle's description (``<task>/model/model.json``); here so that reading it needs
no torch."""


class UnsafePathError(ValueError):
    """A task or class name would place files outside the artifact root."""


def fingerprint(*parts: Any) -> str:
    """A short, stable digest of JSON-serialisable parts (config, upstream versions, ...)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def safe_child(root: Path, name: str) -> Path:
    """``root / name`` for a single path component, refusing anything that could escape root."""
    if name in ("", ".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise UnsafePathError(f"refusing unsafe name {name!r} under {root}")
    child = root / name
    if os.path.commonpath([root.resolve(), child.resolve()]) != str(root.resolve()):
        raise UnsafePathError(f"{name!r} resolves outside {root}")
    return child


@dataclass(frozen=True)
class TaskArtifacts:
    """The fixed paths of one task's newest outputs."""

    root: Path
    task: str

    @property
    def dir(self) -> Path:
        return safe_child(self.root, self.task)

    @property
    def inventory(self) -> Path:
        return self.dir / "inventory.parquet"

    @property
    def integrity(self) -> Path:
        return self.dir / "integrity.parquet"

    @property
    def splits(self) -> Path:
        return self.dir / "splits.parquet"

    @property
    def sampling_weights(self) -> Path:
        return self.dir / "sampling_weights.parquet"

    @property
    def class_weights(self) -> Path:
        return self.dir / "class_weights.parquet"

    @property
    def model_dir(self) -> Path:
        return self.dir / "model"

    @property
    def evaluation_dir(self) -> Path:
        return self.dir / "evaluation"

    @property
    def calibration_dir(self) -> Path:
        return self.dir / "calibration"

    @property
    def export_dir(self) -> Path:
        """The served export (``mtmc serve`` reads it)."""
        return self.dir / "export"

    @property
    def rejected_export_dir(self) -> Path:
        """The last candidate export that was not promoted."""
        return self.dir / "export_rejected"

    @property
    def work_dir(self) -> Path:
        """Scratch space that survives runs: checkpoints for resuming, decoded-image cache."""
        return self.dir / ".work"


def leaderboard_path(root: Path) -> Path:
    return root / "summary" / "leaderboard.parquet"


def group_dir(root: Path, group: str) -> Path:
    """``<root>/shared/<group>``: a shared-backbone group's joint bundle is its ``model/``."""
    return safe_child(root / "shared", group)


STALE_TEMP_SECONDS = 600


def _remove_stale_temps(target: Path) -> None:
    """Delete temporaries of ``target`` left by a killed writer (old enough to be nobody's)."""
    cutoff = time.time() - STALE_TEMP_SECONDS
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            if leftover.lstat().st_mtime < cutoff:
                if leftover.is_dir():
                    shutil.rmtree(leftover)
                else:
                    leftover.unlink()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_file(path: Path, suffix: str = "") -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fsync(tmp_path)  # the bytes reach the disk before the name points at them
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    with _atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str), "utf-8")


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text("utf-8"))


def write_text(path: Path, text: str) -> None:
    with _atomic_file(path) as tmp:
        tmp.write_text(text, "utf-8")


def write_bytes(path: Path, data: bytes) -> None:
    with _atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_parquet(
    path: Path,
    df: pd.DataFrame,
    fp: str | None = None,
    meta: Mapping[str, Any] | None = None,
    schema: pa.Schema | None = None,
    data_version: str | None = None,
) -> None:
    """Write ``df`` atomically; ``fp``, ``data_version`` and ``meta`` go into the schema
    metadata (see :func:`stored_data_version` for the second)."""
    table = pa.Table.from_pandas(df, schema=schema, preserve_index=False)
    extra = dict(table.schema.metadata or {})
    if fp is not None:
        extra[FINGERPRINT_KEY] = fp.encode()
    if data_version is not None:
        extra[DATA_VERSION_KEY] = data_version.encode()
    if meta is not None:
        extra[META_KEY] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    table = table.replace_schema_metadata(extra)
    with _atomic_file(path) as tmp:
        pq.write_table(table, tmp)


def read_parquet(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    return pq.read_table(path, columns=columns).to_pandas()


def parquet_meta(path: Path) -> dict[str, Any]:
    """The ``meta`` mapping stored by :func:`write_parquet` ({} when absent)."""
    raw = (pq.read_schema(path).metadata or {}).get(META_KEY)
    return json.loads(raw) if raw else {}


def _stored_version(path: Path, *keys: bytes) -> str | None:
    """The first of ``keys`` found in a Parquet file's metadata (the ``fingerprint`` field of a
    JSON file); None when the file is missing or unreadable."""
    try:
        if path.suffix == ".parquet":
            metadata = pq.read_schema(path).metadata or {}
            raw = next((metadata[k] for k in keys if k in metadata), None)
            return raw.decode() if raw else None
        if path.suffix == ".json":
            return read_json(path).get("fingerprint")
    except (OSError, ValueError, pa.ArrowException):
        return None
    return None


def stored_fingerprint(path: Path) -> str | None:
    """The input fingerprint an output was made from: Parquet metadata or a JSON field."""
    return _stored_version(path, FINGERPRINT_KEY)


def stored_data_version(path: Path) -> str | None:
    """What downstream stages fingerprint an output by: the digest of its content where it
    records one (the split manifest: unchanged content keeps the model current even when the
    inputs it was recomputed from changed), else its input fingerprint."""
    return _stored_version(path, DATA_VERSION_KEY, FINGERPRINT_KEY)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Build a directory beside ``final`` and swap it in only when the block succeeds.

    The previous directory stays in place until the new one is complete; the swap is two
    renames, and a crash between them leaves ``final.old`` which the next call cleans up.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    old = final.with_name(final.name + ".old")
    if old.exists() and not final.exists():
        old.rename(final)  # a previous swap was interrupted between its two renames
    shutil.rmtree(old, ignore_errors=True)
    _remove_stale_temps(final)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield staging
        if final.exists():
            final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
