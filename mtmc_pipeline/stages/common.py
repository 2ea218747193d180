"""What every stage shares: code versions, input fingerprints, and the result it reports.

Every stage computes an *input fingerprint* from its upstream outputs' data versions, its
resolved configuration and its code version. If the stored output was made from the same
fingerprint it is reused (no decoding, no training) and the result says so. A stage's data
version (in Dagster, and for the stages after it) is its input fingerprint, except for the
split manifest, whose data version is a digest of its content: a rerun of the first stages
that yields the same manifest (files touched, an unrelated ``task.yaml`` edit, a fresh
checkout) leaves the model, its evaluation and calibration current.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtmc_pipeline.artifacts import fingerprint, stored_data_version

CODE_VERSIONS: dict[str, str] = {
    "raw_images": "1",
    "inventory": "1",
    "integrity": "2",
    "splits": "1",
    "sampling_weights": "1",
    "model": "3",
    "shared_model": "2",
    "evaluation": "1",
    "calibration": "1",
    "label_issues": "2",
    "export": "1",
    "leaderboard": "1",
}
"""Each stage's code version: its Dagster ``code_version`` and part of its input fingerprint.

Policy: bump a stage's version (to the next integer, as a string) in the same commit as a
change to what the stage writes for the same inputs and settings: a new or renamed column,
different split, training, metric or calibration logic, a fixed bug in the output. Dagster
then marks that stage stale, the automation sensor reruns it (``code_version_changed``), and
every stage after it recomputes because its input fingerprint changed; stages before it are
untouched (a new ``evaluation`` version reruns evaluation and calibration, not the model).

Do not bump it for refactors, logging, UI-only metadata or speed-ups that write the same
output: a needless bump retrains every task. Settings need no bump: they are fingerprinted.
"""


@dataclass(frozen=True)
class Markdown:
    text: str


@dataclass(frozen=True)
class Png:
    data: bytes


def png_markdown(data: bytes, alt: str) -> str:
    """An image inlined in Markdown (the UI shows no file links)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(data).decode()})"


@dataclass(frozen=True)
class CheckOutcome:
    passed: bool
    description: str
    severity: str = "error"  # "error" or "warn"
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageResult:
    """What a stage produced: its data version, whether it was reused, what to show."""

    fingerprint: str
    reused: bool
    metadata: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, CheckOutcome] = field(default_factory=dict)


def upstream_fingerprint(path: Path, stage: str) -> str:
    """The data version of an upstream output; a clear error when it is missing."""
    fp = stored_data_version(path)
    if fp is None:
        raise FileNotFoundError(f"{path} is missing: materialize the {stage!r} stage first")
    return fp


def stage_fingerprint(stage: str, *inputs: Any) -> str:
    """The input fingerprint of ``stage``: its code version and everything it reads."""
    return fingerprint(stage, CODE_VERSIONS[stage], *inputs)


def record_elapsed(
    metadata: dict[str, Any], start: float, count: int | None = None, unit: str = ""
) -> None:
    """Add elapsed seconds (and a throughput when ``count`` is given) to ``metadata``."""
    seconds = time.perf_counter() - start
    metadata["elapsed_s"] = round(seconds, 3)
    if count is not None and seconds > 0:
        metadata[f"{unit}_per_s"] = round(count / seconds, 1)
