"""Resources: the torch device training runs on, and where artifacts are written."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from mtmc_pipeline.artifacts import TaskArtifacts
from mtmc_pipeline.runtime import Runtime, resolve_runtime


class TorchDevice(dg.ConfigurableResource):
    """Where tensors live. ``auto`` picks CUDA when present (then MPS), else the CPU."""

    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = False
    num_workers: int = 0

    def runtime(self) -> Runtime:
        return resolve_runtime(
            self.device,
            self.precision,
            self.channels_last,
            self.num_workers,  # type: ignore[arg-type]
        )


class ArtifactStore(dg.ConfigurableResource):
    """The artifact root (``MTMC_ARTIFACTS``); each task's outputs sit at fixed paths in it."""

    root: str = "artifacts"

    @property
    def path(self) -> Path:
        return Path(self.root)

    def task(self, name: str) -> TaskArtifacts:
        return TaskArtifacts(self.path, name)


def default_resources(artifacts_root: Path | None = None) -> dict[str, dg.ConfigurableResource]:
    root = artifacts_root or Path(os.environ.get("MTMC_ARTIFACTS", "artifacts"))
    return {
        "torch_device": TorchDevice(
            device=os.environ.get("MTMC_DEVICE", "auto"),
            num_workers=int(os.environ.get("MTMC_NUM_WORKERS", "0")),
        ),
        "artifacts": ArtifactStore(root=str(root)),
    }
