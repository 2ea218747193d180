"""How steps run: forked processes on this machine, or one Kubernetes pod each.

``MTMC_EXECUTOR`` chooses (read when the code location loads, as the executor is part of the
definitions): ``multiprocess`` (default) or ``k8s`` (``dagster_k8s.k8s_job_executor``, which
takes its image, namespace and volumes from the ``K8sRunLauncher`` of deploy/k8s/). On
Kubernetes the model step's pod requests ``MTMC_K8S_TRAINING_GPUS`` GPUs (default 1) through
its ``dagster-k8s/config`` tag; other executors ignore that tag.
"""

from __future__ import annotations

import os
from typing import Any

import dagster as dg

# What each forked step finds already imported, besides the modules it is given: the
# instance's SQL storage libraries, which a step otherwise imports itself (most of a step that
# reuses its stored output).
SQL_LIBRARIES = ["sqlalchemy", "alembic"]


class DeploymentSettingError(ValueError):
    """MTMC_EXECUTOR or MTMC_K8S_TRAINING_GPUS holds something this project cannot use."""


def step_executor(*preload: str) -> dg.ExecutorDefinition:
    """The executor; ``preload``: the modules a forked step should find imported."""
    kind = os.environ.get("MTMC_EXECUTOR", "multiprocess").strip()
    if kind == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    if kind != "multiprocess":
        raise DeploymentSettingError(f"MTMC_EXECUTOR={kind!r}: use multiprocess or k8s")
    max_concurrent = int(os.environ.get("MTMC_MAX_CONCURRENT", str(os.cpu_count() or 1)))
    # forkserver: each step forks from a process that has already imported the preloads,
    # instead of paying seconds of imports per step
    return dg.multiprocess_executor.configured(
        {
            "max_concurrent": max_concurrent,
            "start_method": {"forkserver": {"preload_modules": [*preload, *SQL_LIBRARIES]}},
        }
    )


def training_op_tags() -> dict[str, Any]:
    """The model step's ``dagster-k8s/config``: its pod's GPU request and limit."""
    value = os.environ.get("MTMC_K8S_TRAINING_GPUS", "1").strip()
    if not value.isdigit():
        raise DeploymentSettingError(f"MTMC_K8S_TRAINING_GPUS={value!r}: use 0, 1, 2, ...")
    if int(value) == 0:
        return {}
    gpus = {"nvidia.com/gpu": value}
    return {
        "dagster-k8s/config": {
            "container_config": {"resources": {"requests": gpus, "limits": gpus}}
        }
    }
