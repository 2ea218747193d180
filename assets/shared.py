"""``shared/<group>/model``: one backbone with a head per member task (``mtmc.yaml``).

It reads every member's splits and sampling weights and writes the joint bundle and each
member's ``T/model/``; the members' evaluations depend on it instead of a model of their own.
"""

from pathlib import Path

import dagster as dg

from assets.automation import RETRAIN
from assets.config import TrainOverrides, overrides_of
from assets.deployment import training_step
from assets.factory import task_key, user_errors
from assets.metadata import stage_metadata
from assets.resources import ArtifactStore, TorchDevice
from mtmc_pipeline import stages
from mtmc_pipeline.artifacts import fingerprint
from mtmc_pipeline.data.groups import GROUPS_FILE, SharedGroup


def group_model_key(group: SharedGroup) -> dg.AssetKey:
    return dg.AssetKey(["shared", task_key(group.name), "model"])


def build_group_model(
    group: SharedGroup, data_root: Path, priority: int = 0
) -> dg.AssetsDefinition:
    """The group's training step; ``priority``: its ``dagster/priority``."""
    key = group_model_key(group)
    deps = [
        dg.AssetKey([task_key(t), stage])
        for t in group.tasks
        for stage in ("splits", "sampling_weights")
    ]

    @dg.asset(
        key=key,
        deps=deps,
        group_name="shared",
        # the group's settings live in mtmc.yaml, outside every task folder: in the code
        # version, so that editing them (and reloading) marks the group stale
        code_version=f"{stages.CODE_VERSIONS['shared_model']}-{fingerprint(group.model_dump())}",
        automation_condition=RETRAIN,
        **training_step(priority),
        kinds={"pytorch"},
        tags={"shared_group": task_key(group.name)},
        description=f"One backbone, one head per task: {', '.join(group.tasks)} "
        f"(declared in {data_root / 'mtmc.yaml'}).",
    )
    def shared_model(
        context: dg.AssetExecutionContext,
        config: TrainOverrides,  # type: ignore[valid-type]
        artifacts: ArtifactStore,
        torch_device: TorchDevice,
    ) -> dg.MaterializeResult:
        from mtmc_pipeline.stages.shared import group_train_config, run_shared_training

        with user_errors(data_root / GROUPS_FILE):
            result = run_shared_training(
                group,
                data_root,
                artifacts.path,
                group_train_config(group, data_root, overrides_of(config)),
                torch_device.runtime(),
                context.log.info,
            )
        return dg.MaterializeResult(
            data_version=dg.DataVersion(result.fingerprint), metadata=stage_metadata(result)
        )

    return shared_model
