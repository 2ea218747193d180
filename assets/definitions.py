"""The code location: one asset group per task folder under ``MTMC_DATA_ROOT``.

Tasks are discovered when the code location loads; a new task folder appears after a reload
(``dagster dev`` reloads on the UI's "Reload" button).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import dagster as dg

from assets.factory import build_leaderboard, build_task_assets
from assets.resources import default_resources
from mtmc_pipeline.layout import DataRootError, discover_tasks

log = logging.getLogger(__name__)


def data_root() -> Path:
    return Path(os.environ.get("MTMC_DATA_ROOT", "data/demo"))


def build_definitions(
    root: Path | None = None, artifacts_root: Path | None = None
) -> dg.Definitions:
    """Definitions for every task under ``root`` (default ``MTMC_DATA_ROOT``)."""
    root = root or data_root()
    try:
        tasks = discover_tasks(root)
    except DataRootError as e:
        log.warning("%s; the code location has no task assets", e)
        tasks = []
    assets: list = []
    for task in tasks:
        assets.extend(build_task_assets(task, root))
    assets.append(build_leaderboard(tasks))
    max_concurrent = int(os.environ.get("MTMC_MAX_CONCURRENT", str(os.cpu_count() or 1)))
    return dg.Definitions(
        assets=assets,
        resources=default_resources(artifacts_root),
        # forkserver: each step forks from a process that has already imported torch and this
        # module, instead of paying several seconds of imports per step
        executor=dg.multiprocess_executor.configured(
            {
                "max_concurrent": max_concurrent,
                "start_method": {"forkserver": {"preload_modules": [__name__]}},
            }
        ),
    )


defs = build_definitions()
