"""The code location: one asset group per task folder under ``MTMC_DATA_ROOT``, and the
automation that keeps them up to date (:mod:`assets.automation`).

Tasks are discovered when the code location loads; a new task folder appears after a reload
(``dagster dev`` reloads on the UI's "Reload" button), and the ``task_folders`` sensor says so.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import dagster as dg

from assets import automation
from assets.deployment import step_executor
from assets.factory import build_leaderboard, build_task_assets, task_key
from assets.resources import default_resources
from assets.shared import build_group_model, group_model_key
from mtmc_pipeline.data.groups import read_groups, split_leaders
from mtmc_pipeline.data.layout import DataRootError, discover_tasks

log = logging.getLogger(__name__)
STEP_MODULES = [
    "mtmc_pipeline.stages.training",
    "mtmc_pipeline.stages.reporting",
    # torch itself, imported once by the step server instead of by each model, evaluation and
    # export step (most of them beside another task's training); timm, torchvision and
    # onnxscript stay with the steps that use them, as a run that reuses every stage would pay
    # for them (benchmarks/README.md: no-change rerun 1.17x the no-op graph, 1.78x with them)
    "torch",
]


def data_root() -> Path:
    return Path(os.environ.get("MTMC_DATA_ROOT", "data/demo"))


def build_definitions(
    root: Path | None = None, artifacts_root: Path | None = None
) -> dg.Definitions:
    """Definitions for every task under ``root`` (default ``MTMC_DATA_ROOT``)."""
    root = root or data_root()
    root_problem = None
    try:
        tasks = discover_tasks(root)
    except DataRootError as e:
        root_problem = f"MTMC_DATA_ROOT: {e}"
        log.warning("%s; the code location has no task assets", root_problem)
        tasks = []
    groups = read_groups(root, tasks)
    model_keys = {t: group_model_key(g) for g in groups for t in g.tasks}
    leaders = split_leaders(groups)
    # of the ready steps: a training first, then the data steps of the tasks in order
    training = len(tasks) + 1
    assets: list = [build_group_model(g, root, training) for g in groups]
    for i, task in enumerate(tasks):
        assets.extend(
            build_task_assets(
                task,
                root,
                model_keys.get(task),
                split_leader=leaders.get(task),
                data_priority=len(tasks) - i,
                training_priority=training,
            )
        )
    assets.append(build_leaderboard(tasks, root_problem))
    raw_keys = [dg.AssetKey([task_key(t), "raw_images"]) for t in tasks]
    schedules = [automation.observe_schedule(raw_keys)] if raw_keys else []
    return dg.Definitions(
        assets=assets,
        schedules=schedules,
        sensors=[automation.automation_sensor(), automation.task_folder_sensor(root, tasks)],
        resources=default_resources(artifacts_root),
        executor=step_executor(__name__, *STEP_MODULES),
    )


defs = build_definitions()
