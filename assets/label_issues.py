"""``<task>/label_issues``: the opt-in review list of suspected label errors.

It depends on the split manifest only (its fold models train like the model stage, on the
same pool of GPUs), and does nothing until ``label_quality.enabled`` is set in task.yaml or
the launchpad.
"""

from pathlib import Path
from typing import Any

import dagster as dg

from assets.config import OVERRIDES, overrides_of
from assets.deployment import training_step
from assets.metadata import stage_metadata
from assets.resources import ArtifactStore, TorchDevice
from mtmc_pipeline.config import load_task_config

LabelQualityOverrides = OVERRIDES["label_quality"]


def build_label_issues(task: str, task_dir: Path, spec: dict[str, Any]) -> dg.AssetsDefinition:
    """The asset, given the factory's common asset arguments (key, deps, group, ...)."""
    from assets.factory import user_errors  # the factory imports this module

    @dg.asset(
        **spec,
        **training_step(),
        description="Out-of-fold suspected label errors (cleanlab) and a review list with "
        "thumbnails; off unless label_quality.enabled.",
    )
    def label_issues(
        context: dg.AssetExecutionContext,
        config: LabelQualityOverrides,  # type: ignore[valid-type]
        artifacts: ArtifactStore,
        torch_device: TorchDevice,
    ) -> dg.MaterializeResult:
        from mtmc_pipeline.stages.label_quality import run_label_issues

        with user_errors(task_dir):
            cfg = load_task_config(
                task_dir, {"label_quality": overrides_of(config)}, check_model=False
            )
            result = run_label_issues(
                task_dir, artifacts.task(task), cfg, torch_device.settings(), context.log.info
            )
        return dg.MaterializeResult(
            data_version=dg.DataVersion(result.fingerprint), metadata=stage_metadata(result)
        )

    return label_issues
