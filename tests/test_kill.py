"""Kill a run with SIGKILL at chosen and random points: what was there stays readable and
consistent, and the next run completes."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from mtmc_pipeline.artifacts import TaskArtifacts, read_json, stored_fingerprint
from mtmc_pipeline.training.models import load_bundle

REPO = Path(__file__).resolve().parents[1]
TASK = "pattern"
FIRST = {"train": {"epochs": 2}, "integrity": {"min_side": 8}}
SECOND = {"train": {"epochs": 3, "seed": 1}, "integrity": {"min_side": 9}}
BUNDLE = {**SECOND, "train": {"epochs": 4, "seed": 1}}  # only the model differs from SECOND


def _runner(
    data: Path, artifacts: Path, overrides: dict, swap_pause: float | None = None
) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "tests.stage_runner", str(data), str(artifacts), TASK]
    cmd.append(json.dumps(overrides))
    if swap_pause is not None:
        cmd.append(str(swap_pause))
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)


def _run_to_end(data: Path, artifacts: Path, overrides: dict) -> None:
    proc = _runner(data, artifacts, overrides)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and out.strip().endswith("DONE"), out


def _kill_at(data: Path, artifacts: Path, overrides: dict, marker: str, delay: float) -> str:
    """Start a run, SIGKILL it ``delay`` seconds after it prints ``marker``; return its output.

    Runs aimed at a ``SWAP <dir>`` marker wait before every directory swap, so the kill
    lands after the new directory is complete and before it replaces the old one.
    """
    pause = 30.0 if marker.startswith("SWAP ") else None
    proc = _runner(data, artifacts, overrides, pause)
    seen = []
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line.strip())
        if line.strip() == marker:
            time.sleep(delay)
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return "\n".join(seen)


def _fingerprints(art: TaskArtifacts) -> dict[str, str | None]:
    return {
        "inventory": stored_fingerprint(art.inventory),
        "integrity": stored_fingerprint(art.integrity),
        "splits": stored_fingerprint(art.splits),
        "sampling_weights": stored_fingerprint(art.sampling_weights),
        "model": stored_fingerprint(art.model_dir / "model.json"),
        "evaluation": stored_fingerprint(art.evaluation_dir / "metrics.json"),
        "calibration": stored_fingerprint(art.calibration_dir / "temperature.json"),
    }


def _assert_whole(art: TaskArtifacts) -> None:
    """Every output present is complete and internally consistent."""
    for path in (art.inventory, art.integrity, art.splits, art.sampling_weights):
        pd.read_parquet(path)
    _, info = load_bundle(art.model_dir)
    history = pd.read_parquet(art.model_dir / "history.parquet")
    assert len(history) == info["epochs_run"]
    metrics = read_json(art.evaluation_dir / "metrics.json")
    preds = pd.read_parquet(art.evaluation_dir / "predictions.parquet")
    assert len(preds) == sum(v["n"] for v in metrics["by_split"].values())
    calibrator = read_json(art.calibration_dir / "calibrator.json")
    temperature = read_json(art.calibration_dir / "temperature.json")
    assert calibrator["fingerprint"] == temperature["fingerprint"]
    table = pd.read_parquet(art.calibration_dir / "calibration.parquet")
    assert (
        stored_fingerprint(art.calibration_dir / "calibration.parquet")
        == temperature["fingerprint"]
    )
    assert set(table["class_name"]) == set(info["class_names"])


@pytest.mark.slow
def test_killed_runs_leave_whole_outputs_and_the_next_run_completes(
    tiny_copy: Path, tmp_path: Path
) -> None:
    artifacts = tmp_path / "artifacts"
    art = TaskArtifacts(artifacts, TASK)
    _run_to_end(tiny_copy, artifacts, FIRST)
    _assert_whole(art)
    old = _fingerprints(art)

    rng = random.Random(7)
    for stage in ["integrity", "model", "evaluation"]:
        marker = f"START {stage}"
        assert marker in _kill_at(tiny_copy, artifacts, SECOND, marker, rng.uniform(0.0, 1.5))
        _assert_whole(art)
        now = _fingerprints(art)
        # each output is the old one or a complete new one; never missing
        changed = [k for k in now if now[k] != old[k]]
        assert all(now[k] is not None for k in now), now
        for key in changed:
            assert now[key] not in (None, old[key])

    # killed after the new bundle is complete, before it is swapped in: nothing changes
    before = _fingerprints(art)
    assert "SWAP model" in _kill_at(tiny_copy, artifacts, BUNDLE, "SWAP model", 0.0)
    _assert_whole(art)
    assert _fingerprints(art) == before and not (art.dir / "model.old").exists()

    _run_to_end(tiny_copy, artifacts, SECOND)
    _assert_whole(art)
    final = _fingerprints(art)
    assert final["model"] != old["model"] and final["integrity"] != old["integrity"]
    assert read_json(art.model_dir / "model.json")["config"]["seed"] == 1
