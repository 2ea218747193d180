"""Training out of process through Dagster Pipes: in a local subprocess, or in a Kubernetes pod.

The ``training`` resource decides where the ``model`` asset trains:

- ``in_process`` (the default): in the step's own process, as every other asset;
- ``subprocess``: :class:`dagster.PipesSubprocessClient` starts
  ``python -m assets.pipes_training`` (under ``torchrun`` when ``processes`` > 1);
- ``k8s``: :class:`dagster_k8s.PipesK8sClient` starts the same command in a pod of ``image``,
  with ``gpus`` GPUs as the container's ``nvidia.com/gpu`` limit and the data and artifact
  volumes mounted at the paths the orchestrating step uses.

Out of process, the step never imports torch: the training process streams its log lines
back as it goes, reports the materialisation with its data version, and leaves the stage's
result (history table, curves, numbers) on the artifact storage, which becomes the same
metadata as an in-process run's. Choose the mode with ``MTMC_TRAINING_MODE`` or the
resource's run config; no code changes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg
from pydantic import Field

from mtmc_pipeline.artifacts import TaskArtifacts, read_json
from mtmc_pipeline.config import ConfigError, TrainConfig
from mtmc_pipeline.stages import StageResult
from mtmc_pipeline.stages.result_json import from_json

if TYPE_CHECKING:
    from assets.resources import TorchDevice

MODES = ("in_process", "subprocess", "k8s")
ENTRY_MODULE = "assets.pipes_training"
DATA_VOLUME, ARTIFACTS_VOLUME = "mtmc-data", "mtmc-artifacts"


class TrainingLauncher(dg.ConfigurableResource):
    """Where the model asset trains; see :mod:`assets.pipes`."""

    mode: str = Field("in_process", description="in_process, subprocess or k8s.")
    processes: int = Field(
        1,
        description="Training processes (torchrun --nproc-per-node; DDP, one per GPU) out of "
        "process.",
    )
    image: str | None = Field(None, description="k8s: the training image (torch, this project).")
    namespace: str | None = Field(None, description="k8s: the pod's namespace.")
    gpus: int = Field(0, ge=0, description="k8s: nvidia.com/gpu limit of the training container.")
    data_claim: str | None = Field(
        None, description="k8s: PersistentVolumeClaim holding MTMC_DATA_ROOT (read-only)."
    )
    artifacts_claim: str | None = Field(
        None, description="k8s: PersistentVolumeClaim holding MTMC_ARTIFACTS (every node mounts)."
    )

    @property
    def out_of_process(self) -> bool:
        if self.mode not in MODES:
            raise ConfigError(f"resources.training.mode = {self.mode!r}: use one of {MODES}")
        return self.mode != "in_process"

    def command(
        self, python: str, task_dir: Path, art: TaskArtifacts, train: TrainConfig, device: dict
    ) -> list[str]:
        """The training process's command line (every torchrun process runs it)."""
        if self.processes < 1:
            raise ConfigError(f"resources.training.processes = {self.processes}: use 1 or more")
        launcher = [python]
        if self.processes > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone"]
            launcher += [f"--nproc-per-node={self.processes}"]
        return [
            *launcher,
            "-m",
            ENTRY_MODULE,
            str(task_dir),
            str(art.root),
            json.dumps(train.model_dump(mode="json"), ensure_ascii=False),
            json.dumps(device),
        ]

    def pod_spec(self, data_root: Path, artifacts_root: Path) -> dict[str, Any]:
        """The pod: GPU limits, and the data and artifact claims at the step's own paths."""
        volumes, mounts = [], []
        for name, claim, path, read_only in (
            (DATA_VOLUME, self.data_claim, data_root, True),
            (ARTIFACTS_VOLUME, self.artifacts_claim, artifacts_root, False),
        ):
            if claim:
                volumes.append({"name": name, "persistentVolumeClaim": {"claimName": claim}})
                mounts.append({"name": name, "mountPath": str(path), "readOnly": read_only})
        container: dict[str, Any] = {"name": "training", "volumeMounts": mounts}
        if self.gpus:
            container["resources"] = {"limits": {"nvidia.com/gpu": str(self.gpus)}}  # a quantity
        return {"containers": [container], "volumes": volumes, "restartPolicy": "Never"}

    def k8s_request(
        self, task_dir: Path, art: TaskArtifacts, train: TrainConfig, device: dict
    ) -> dict[str, Any]:
        """``PipesK8sClient.run``'s arguments besides the context."""
        if not self.image:
            raise ConfigError("resources.training.image: the k8s mode needs a training image")
        return {
            "image": self.image,
            "command": self.command("python", task_dir, art, train, device),
            "namespace": self.namespace,
            "base_pod_spec": self.pod_spec(task_dir.parent, art.root),
        }

    def train(
        self,
        context: dg.AssetExecutionContext,
        task_dir: Path,
        art: TaskArtifacts,
        train: TrainConfig,
        torch_device: TorchDevice,
    ) -> StageResult:
        """Run the model stage out of process; its result, with the data version it reported."""
        device = {
            "device": torch_device.device,
            "precision": torch_device.precision,
            "channels_last": torch_device.channels_last,
            "num_workers": torch_device.num_workers,
        }
        if self.mode == "subprocess":
            command = self.command(sys.executable, task_dir, art, train, device)
            invocation = dg.PipesSubprocessClient().run(context=context, command=command)
        else:
            from dagster_k8s import PipesK8sClient  # the k8s extra: pip install .[k8s]

            request = self.k8s_request(task_dir, art, train, device)
            invocation = PipesK8sClient().run(context=context, **request)
        reported = invocation.get_materialize_result(implicit_materialization=False)
        (message,) = invocation.get_custom_messages()
        result = from_json(read_json(Path(message["result"])))
        if reported.data_version is None or reported.data_version.value != result.fingerprint:
            raise dg.Failure(f"{task_dir}: the training process reported another data version")
        return result


def training_launcher() -> TrainingLauncher:
    """In process unless ``MTMC_TRAINING_MODE`` is set; ``MTMC_TRAINING_PROCESSES`` sets the
    process count. Dagster reads the variables when a run starts."""
    settings: dict[str, Any] = {}
    if "MTMC_TRAINING_MODE" in os.environ:
        settings["mode"] = dg.EnvVar("MTMC_TRAINING_MODE")
    if "MTMC_TRAINING_PROCESSES" in os.environ:
        settings["processes"] = dg.EnvVar.int("MTMC_TRAINING_PROCESSES")
    return TrainingLauncher(**settings)
