"""Resources: the torch device training runs on, and where artifacts are written.

A resource for running training out of process (Dagster Pipes) belongs here too, next to
:class:`TorchDevice`, and joins :func:`default_resources`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg
from pydantic import Field

from assets.pipes import training_launcher
from mtmc_pipeline.artifacts import TaskArtifacts
from mtmc_pipeline.runtime import DeviceSettings

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

    def settings(self, lease_dir: Path | None = None) -> DeviceSettings:
        """The request, unresolved: a step that reuses its output never imports torch.

        ``lease_dir`` (the instance's directory): with device auto on several GPUs, each
        training leases its own, so a ``gpu`` pool limit of N uses N different GPUs.
        """
        return DeviceSettings(
            self.device,
            self.precision,  # type: ignore[arg-type]
            self.channels_last,
            self.num_workers,
            lease_dir,
        )

    def runtime(self) -> Runtime:
        return self.settings().resolve()


class ArtifactStore(dg.ConfigurableResource):
    """The artifact root (``MTMC_ARTIFACTS``); each task's outputs sit at fixed paths in it."""

    root: str = "artifacts"

    @property
    def path(self) -> Path:
        return Path(self.root)

    def task(self, name: str) -> TaskArtifacts:
        return TaskArtifacts(self.path, name)


def _from_env(variable: str, default: Any, as_int: bool = False) -> Any:
    """``dg.EnvVar(variable)`` when it is set, so that the run reads it when it starts (and the
    UI shows where the value comes from); else the default."""
    if variable not in os.environ:
        return default
    return dg.EnvVar.int(variable) if as_int else dg.EnvVar(variable)


def default_resources(artifacts_root: Path | None = None) -> dict[str, dg.ConfigurableResource]:
    root = str(artifacts_root) if artifacts_root else _from_env("MTMC_ARTIFACTS", "artifacts")
    return {
        "torch_device": TorchDevice(
            device=_from_env("MTMC_DEVICE", "auto"),
            num_workers=_from_env("MTMC_NUM_WORKERS", 0, as_int=True),
        ),
        "artifacts": ArtifactStore(root=root),
        "training": training_launcher(),
    }
