"""How steps run: forked processes on this machine, or one Kubernetes pod each.

``MTMC_EXECUTOR`` chooses (read when the code location loads, as the executor is part of the
definitions): ``multiprocess`` (default) or ``k8s`` (``dagster_k8s.k8s_job_executor``, which
takes its image, namespace and volumes from the ``K8sRunLauncher`` of deploy/k8s/). On
Kubernetes the model step's pod requests ``MTMC_K8S_TRAINING_GPUS`` GPUs (default 1) through
its ``dagster-k8s/config`` tag; other executors ignore that tag.

Every step that trains (model, shared_model, label_issues) is in the ``gpu`` pool, which
limits trainings across runs. Within a run the multiprocess executor also holds them back
itself, ``MTMC_TRAININGS_PER_RUN`` at a time (default 1, the pool's default limit): a step it
holds back makes no pool claim, whereas a step waiting on its claim is retried at intervals
that grow to 15 s, which left the chain of trainings idle for seconds between models.
"""

from __future__ import annotations

import os
from typing import Any

import dagster as dg

# What each forked step finds already imported, besides the modules it is given: the
# instance's SQL storage libraries, which a step otherwise imports itself (most of a step that
# reuses its stored output).
SQL_LIBRARIES = ["sqlalchemy", "alembic"]
TRAINING_POOL = "gpu"
TRAINING_TAG = "mtmc/training"
"""Op tag on every step in the training pool, for the executor's per-run limit."""
PRIORITY_TAG = "dagster/priority"
"""Op tag: of the steps ready to run, the multiprocess and k8s executors start higher values
first (untagged: 0)."""


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
    max_concurrent = _count_setting("MTMC_MAX_CONCURRENT", os.cpu_count() or 1)
    trainings = _count_setting("MTMC_TRAININGS_PER_RUN", 1)
    # forkserver: each step forks from a process that has already imported the preloads,
    # instead of paying seconds of imports per step
    return dg.multiprocess_executor.configured(
        {
            "max_concurrent": max_concurrent,
            "tag_concurrency_limits": [{"key": TRAINING_TAG, "limit": trainings}],
            "start_method": {"forkserver": {"preload_modules": [*preload, *SQL_LIBRARIES]}},
        }
    )


def _count_setting(name: str, default: int) -> int:
    value = os.environ.get(name, str(default)).strip()
    if not value.isdigit() or int(value) < 1:
        raise DeploymentSettingError(f"{name}={value!r}: use a whole number, 1 or more")
    return int(value)


def training_step(priority: int = 0) -> dict[str, Any]:
    """``@asset`` arguments for a step that trains: the ``gpu`` pool, the per-run training
    tag, its ``priority`` and, on Kubernetes, its pod's GPU request and limit
    (``dagster-k8s/config``)."""
    tags = {TRAINING_TAG: "true", **_k8s_gpu_tags()}
    if priority:
        tags[PRIORITY_TAG] = str(priority)
    return {"pool": TRAINING_POOL, "op_tags": tags}


def _k8s_gpu_tags() -> dict[str, Any]:
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
