"""The pipeline's stages as plain functions: read inputs from the artifact root, reuse or
recompute, write outputs atomically, and report what a person wants to see.

This package knows nothing of Dagster; ``assets/`` wraps one function of it per asset.
"""

from mtmc_pipeline.stages.common import (
    CODE_VERSIONS,
    CheckOutcome,
    Markdown,
    Png,
    StageResult,
)
from mtmc_pipeline.stages.prepare import (
    observe_raw,
    run_integrity,
    run_inventory,
    run_sampling,
    run_splits,
)
from mtmc_pipeline.stages.reporting import run_calibration, run_evaluation, run_leaderboard
from mtmc_pipeline.stages.training import run_training

__all__ = [
    "CODE_VERSIONS",
    "CheckOutcome",
    "Markdown",
    "Png",
    "StageResult",
    "observe_raw",
    "run_calibration",
    "run_evaluation",
    "run_integrity",
    "run_inventory",
    "run_leaderboard",
    "run_sampling",
    "run_splits",
    "run_training",
]
