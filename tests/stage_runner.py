"""Run every stage of one task in order, without Dagster: the process the kill tests stop.

Usage: python -m tests.stage_runner DATA_ROOT ARTIFACTS TASK OVERRIDES_JSON [SWAP_PAUSE]
Prints ``START <stage>`` before each stage so a test can aim its kill. With SWAP_PAUSE
(seconds), every finished output directory prints ``SWAP <name>`` and waits that long just
before it is swapped into place: the moment a kill is most likely to tear a bundle.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from mtmc_pipeline import artifacts, stages
from mtmc_pipeline.artifacts import TaskArtifacts
from mtmc_pipeline.config import load_task_config
from mtmc_pipeline.runtime import DeviceSettings
from mtmc_pipeline.stages.reporting import run_calibration, run_evaluation
from mtmc_pipeline.stages.training import run_training


def run(data_root: Path, artifacts: Path, task: str, overrides: dict) -> None:
    task_dir = data_root / task
    cfg = load_task_config(task_dir, overrides)
    art = TaskArtifacts(artifacts, task)
    runtime = DeviceSettings("cpu")
    steps = [
        ("inventory", lambda: stages.run_inventory(task_dir, art, cfg.scan)),
        ("integrity", lambda: stages.run_integrity(task_dir, art, cfg.integrity)),
        ("splits", lambda: stages.run_splits(art, cfg.split, task_dir)),
        ("sampling_weights", lambda: stages.run_sampling(art, cfg.sampling)),
        ("model", lambda: run_training(task_dir, art, cfg.train, runtime, lambda _: None)),
        ("evaluation", lambda: run_evaluation(task_dir, art, cfg.evaluation, runtime)),
        ("calibration", lambda: run_calibration(art, cfg.calibration)),
    ]
    for name, step in steps:
        print(f"START {name}", flush=True)
        step()
    print("DONE", flush=True)


def pause_before_swaps(seconds: float) -> None:
    """Make ``atomic_dir`` announce each swap and wait before its renames."""
    build_and_swap = artifacts.atomic_dir

    @contextlib.contextmanager
    def announced(final: Path) -> Iterator[Path]:
        with build_and_swap(final) as staging:
            yield staging
            print(f"SWAP {final.name}", flush=True)
            time.sleep(seconds)

    artifacts.atomic_dir = announced


if __name__ == "__main__":
    if len(sys.argv) > 5:
        pause_before_swaps(float(sys.argv[5]))
    run(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4]))
