"""Resources: the torch device training runs on, and where artifacts are written."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg
from pydantic import Field

from assets.pipes import training_launcher
from mtmc_pipeline.artifacts import TaskArtifacts

if TYPE_CHECKING:
    from mtmc_pipeline.runtime import Runtime


class TorchDevice(dg.ConfigurableResource):
    """Where tensors live and how they are computed; bad values fail naming the setting."""

    device: str = Field(
        "auto", description="auto (CUDA, then MPS, else CPU), cpu, cuda, cuda:N or mps."
    )
    precision: str = Field(
        "auto",
        description="auto (bf16 on GPUs that have it, else fp16 with a gradient scaler; fp32 "
        "on the CPU), fp32, bf16 or fp16.",
    )
    channels_last: bool = Field(False, description="NHWC memory format (faster convs on GPUs).")
    num_workers: int = Field(0, description="Data loader processes (0: load in the main process).")

    def runtime(self) -> Runtime:
        from mtmc_pipeline.runtime import resolve_runtime  # torch: only in the steps that use it

        return resolve_runtime(
            self.device,
            self.precision,  # type: ignore[arg-type]
            self.channels_last,
            self.num_workers,
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
        "training": training_launcher(),
    }
