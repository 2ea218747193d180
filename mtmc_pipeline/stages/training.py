"""The model stage: train (or reuse) the task's classifier and write its bundle.

Training checkpoints after every epoch under the task's work directory, keyed by the stage's
input fingerprint: a materialisation that was killed continues from its last finished epoch
the next time the same inputs and settings are materialised. The checkpoint is removed once
the bundle is in place. Under torchrun every rank runs this stage and only rank 0 writes.

Settings left at ``auto`` are resolved first (:mod:`mtmc_pipeline.training.recipe`), from the
train images' sizes and modes in the integrity manifest, the device class and the reachable
pretrained weights; the resolved settings are what the fingerprint covers. Resolving them, and
reusing a stored bundle, import no torch: the device class is probed without it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from mtmc_pipeline import artifacts as af
from mtmc_pipeline.artifacts import MODEL_FILE, TaskArtifacts, stored_fingerprint
from mtmc_pipeline.config import SamplingConfig, TrainConfig
from mtmc_pipeline.data.multilabel_splits import is_multilabel
from mtmc_pipeline.data.splits import read_manifest
from mtmc_pipeline.plots import history_png
from mtmc_pipeline.runtime import DeviceSettings
from mtmc_pipeline.stages.common import (
    Markdown,
    Png,
    StageResult,
    record_elapsed,
    stage_fingerprint,
    upstream_fingerprint,
)
from mtmc_pipeline.training.recipe import DataProfile, DeviceProfile, Recipe, resolve_recipe

if TYPE_CHECKING:
    from mtmc_pipeline.training.distributed import Distributed

CHECKPOINT_FILE = "model-checkpoint.safetensors"
HISTORY_FILE = "history.parquet"
HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1", "lr"]


def sampling_config(art: TaskArtifacts) -> SamplingConfig:
    """The sampling settings the task's sampling weights were made with."""
    return SamplingConfig.model_validate(af.parquet_meta(art.sampling_weights).get("sampling", {}))


def run_training(
    task_dir: Path,
    art: TaskArtifacts,
    config: TrainConfig,
    device: DeviceSettings,
    log: Callable[[str], None] = print,
    dist: Distributed | None = None,
) -> StageResult:
    """Train, or reuse the stored bundle: torch is imported only to train.

    The fingerprint holds the *requested* precision (``auto`` stays ``auto``), so a bundle is
    reused on any machine that asks for the same; ``model.json`` records what was used.
    """
    start = time.perf_counter()
    manifest, classes = read_manifest(art.splits)
    probed = DeviceProfile.probe(device.device)
    recipe = task_recipe(art, manifest, len(classes), config, probed, log)
    config = recipe.config
    for line in recipe.lines():
        log(f"recipe: {line}")
    fp = stage_fingerprint(
        "model",
        upstream_fingerprint(art.splits, "splits"),
        upstream_fingerprint(art.sampling_weights, "sampling_weights"),
        config.model_dump(),
        device.precision,
    )
    model_json = art.model_dir / MODEL_FILE
    reused = stored_fingerprint(model_json) == fp
    if not reused:
        from mtmc_pipeline.training.checkpoint import Checkpoint
        from mtmc_pipeline.training.distributed import SINGLE
        from mtmc_pipeline.training.models import save_bundle
        from mtmc_pipeline.training.multitask import TaskData, train_as_group_of_one
        from mtmc_pipeline.training.train import train_model

        dist = dist or SINGLE
        weights = af.read_parquet(art.sampling_weights)
        class_weight = None
        if config.class_weights:
            table = af.read_parquet(art.class_weights).sort_values("label")
            class_weight = table["class_weight"].tolist()
        sampling = sampling_config(art)
        with device.acquire() as runtime:  # several GPUs: this training's own
            log(f"training {config.model} on {runtime.describe()} for task {art.task!r}")
            if runtime.device.type != recipe.device.kind:
                log(
                    f"warning: the recipe was resolved for {recipe.device.describe()}, but "
                    f"training runs on {runtime.describe()}"
                )
            checkpoint = Checkpoint(art.work_dir / CHECKPOINT_FILE, fp)
            if sampling.adaptive:  # adaptive balancing is the multi-task loop's: a group of one
                task = TaskData(
                    art.task,
                    manifest,
                    classes,
                    weights,
                    task_dir,
                    art.work_dir / "cache",
                    sampling,
                    class_weight=class_weight,
                )
                result = train_as_group_of_one(task, config, runtime, log, checkpoint)
            else:
                result = train_model(
                    manifest,
                    classes,
                    weights,
                    task_dir,
                    art.work_dir / "cache",
                    config,
                    runtime,
                    log,
                    checkpoint,
                    class_weight,
                    dist,
                )
        info = {
            "arch": config.model,
            "class_names": classes,
            "kind": "multilabel" if is_multilabel(manifest) else "single",
            "img_size": config.img_size,
            "mean": list(result.preprocess.mean),
            "std": list(result.preprocess.std),
            "interpolation": result.preprocess.interpolation,
            "config": config.model_dump(),
            "recipe": recipe.as_json(),
            "recipe_inputs": {"data": asdict(recipe.data), "device": asdict(recipe.device)},
            "fingerprint": fp,
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "epochs_planned": result.epochs_planned,
            "time_budget": result.plan,
            "metrics": result.best_metrics,
            "parameters": result.parameters,
            "device": runtime.describe(),
            "processes": dist.world_size,
            "precision": runtime.precision,
            "train_seconds": round(result.seconds, 2),
            "images_per_second": round(result.images_per_second, 1),
            "resumed_at_epoch": result.resumed_at_epoch,
            "trained_at": pd.Timestamp.now(tz="UTC").isoformat(),
        }
        history = result.history
        if dist.is_main:
            with af.atomic_dir(art.model_dir) as tmp:
                save_bundle(tmp, result.model, info)
                af.write_parquet(tmp / HISTORY_FILE, history)
            checkpoint.clear()
    else:
        info = af.read_json(model_json)
        history = af.read_parquet(art.model_dir / HISTORY_FILE)
    md = {
        "arch": info["arch"],
        "parameters": info["parameters"],
        "device": info["device"],
        "precision": info["precision"],
        "best_epoch": info["best_epoch"] + 1,
        "epochs_run": info["epochs_run"],
        "recipe": recipe_table(info.get("recipe", {}), info.get("time_budget", "")),
        "val_accuracy": info["metrics"].get("accuracy"),
        "val_macro_f1": info["metrics"].get("macro_f1"),
        "train_images_per_s": info["images_per_second"],
        "train_seconds": info["train_seconds"],
        "curves": Png(history_png(history)),
        "history": history[HISTORY_COLUMNS].assign(epoch=history["epoch"] + 1),
        "path": str(art.model_dir),
    }
    if info.get("resumed_at_epoch") is not None:
        md["resumed_at_epoch"] = info["resumed_at_epoch"] + 1
    record_elapsed(md, start)
    return StageResult(fp, reused, md)


def run_training_process(
    task_dir: Path,
    art: TaskArtifacts,
    config: TrainConfig,
    device: dict[str, Any],
    log: Callable[[str], None] = print,
) -> StageResult | None:
    """The model stage as one training process: alone, or one of ``torchrun``'s processes.

    ``device`` holds :func:`resolve_runtime`'s settings; under torchrun, ``auto`` means this
    process's own GPU. Returns the result on rank 0 (the one that logs and writes), None on
    the other ranks.
    """
    from mtmc_pipeline.training import distributed

    settings = DeviceSettings(
        **{**device, "device": distributed.local_device(device.get("device", "auto"))}
    )
    dist = distributed.from_env(settings.resolve().device)
    try:
        quiet = log if dist.is_main else _quiet
        result = run_training(task_dir, art, config, settings, quiet, dist)
        dist.barrier()  # the bundle is in place before any process reports success
    finally:
        distributed.shutdown()
    return result if dist.is_main else None


def _quiet(_: str) -> None:
    """The log of ranks other than 0 (rank 0 speaks for all)."""


def task_recipe(
    art: TaskArtifacts,
    manifest: pd.DataFrame,
    num_classes: int,
    config: TrainConfig,
    device: DeviceProfile,
    log: Callable[[str], None] = print,
) -> Recipe:
    """The resolved training settings of a task on this device class."""
    return resolve_recipe(
        config, data_profile(art, manifest, num_classes), device, lambda m: _weights(m, log)
    )


def _weights(model: str, log: Callable[[str], None]) -> str | None:
    """Where pretrained weights for ``model`` can be had (timm, and so torch, only asked when
    the recipe wants weights)."""
    from mtmc_pipeline.training.models import find_pretrained

    return find_pretrained(model, log)


def data_profile(art: TaskArtifacts, manifest: pd.DataFrame, num_classes: int) -> DataProfile:
    """What the recipe reads of a task's data: its train images' sizes and modes."""
    integrity = af.read_parquet(art.integrity, columns=["relpath", "width", "height", "mode"])
    return DataProfile.from_manifests(integrity, manifest, num_classes)


def recipe_table(recipe: dict[str, dict[str, object]], plan: str) -> Markdown:
    """The resolved settings as a Markdown table for the UI."""
    rows = ["| setting | value | why |", "|---|---|---|"]
    rows += [f"| {k} | `{v['value']}` | {v['reason']} |" for k, v in recipe.items()]
    if plan:
        rows.append(f"| epochs run | | {plan} |")
    if not recipe:
        rows.append("| (every setting was explicit) | | |")
    return Markdown("\n".join(rows))
