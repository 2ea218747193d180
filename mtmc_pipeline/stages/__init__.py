"""The pipeline's stages as plain functions: read inputs from the artifact root, reuse or
recompute, write outputs atomically, and report what a person wants to see.

This package knows nothing of Dagster; ``assets/`` wraps one function of it per asset. The
stages that need torch live in ``stages.training`` (the model) and ``stages.reporting``
(evaluation, calibration, leaderboard) and are imported from there, not re-exported here, so
that loading the code location does not import torch.
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

__all__ = [
    "CODE_VERSIONS",
    "CheckOutcome",
    "Markdown",
    "Png",
    "StageResult",
    "observe_raw",
    "run_integrity",
    "run_inventory",
    "run_sampling",
    "run_splits",
]
