"""The shared-model stage: train (or reuse) one backbone with a head per member task.

Writes the joint bundle to ``shared/<group>/model/`` and, for every member ``T``, a plain
per-task bundle to ``T/model/`` (that head and the backbone as a timm classifier), so each
member's evaluation, calibration, prediction and leaderboard row work as for any task. The
fingerprint covers every member's splits and sampling weights and the group's settings: new
images in one member retrain the group, and nothing outside it. Members after the first take
the first one's splits for the images they share (:mod:`mtmc_pipeline.data.splits`); the
images one member still trains on and another holds out are counted (``cross_task_leaks``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from mtmc_pipeline import artifacts as af
from mtmc_pipeline.artifacts import TaskArtifacts, fingerprint, group_dir, stored_fingerprint
from mtmc_pipeline.config import TrainConfig, load_task_config
from mtmc_pipeline.data.groups import SharedGroup
from mtmc_pipeline.data.splits import cross_task_leaks, read_manifest
from mtmc_pipeline.plots import history_png
from mtmc_pipeline.runtime import Runtime
from mtmc_pipeline.stages.common import (
    Png,
    StageResult,
    record_elapsed,
    stage_fingerprint,
    upstream_fingerprint,
)
from mtmc_pipeline.stages.training import (
    CHECKPOINT_FILE,
    HISTORY_COLUMNS,
    HISTORY_FILE,
    data_profile,
    sampling_config,
)
from mtmc_pipeline.training.checkpoint import Checkpoint
from mtmc_pipeline.training.models import MODEL_FILE, find_pretrained, save_bundle
from mtmc_pipeline.training.multitask import (
    MultiTaskResult,
    TaskData,
    task_history,
    task_model,
    train_multitask,
)
from mtmc_pipeline.training.recipe import DataProfile, DeviceProfile, Recipe, resolve_recipe


def group_train_config(
    group: SharedGroup, data_root: Path, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """The first member's ``train`` section, then the group's ``train`` in ``mtmc.yaml``,
    then the run config."""
    settings = {**group.train, **(overrides or {})}
    return load_task_config(data_root / group.tasks[0], {"train": settings}).train


def run_shared_training(
    group: SharedGroup,
    data_root: Path,
    artifacts_root: Path,
    config: TrainConfig,
    runtime: Runtime,
    log: Callable[[str], None] = print,
) -> StageResult:
    start = time.perf_counter()
    members = [TaskArtifacts(artifacts_root, t) for t in group.tasks]
    manifests = [read_manifest(art.splits) for art in members]
    leaks = cross_task_leaks([m for m, _ in manifests])
    if leaks:
        log(
            f"warning: group {group.name!r}: {leaks} images are in one member's train split "
            "and in another's val or test split: the scores of the members that hold them "
            "out are optimistic"
        )
    data = DataProfile.combined(
        [data_profile(art, m, len(c)) for art, (m, c) in zip(members, manifests, strict=True)]
    )
    recipe = resolve_recipe(
        config,
        data,
        DeviceProfile.from_runtime(runtime),
        lambda m: find_pretrained(m, log),
    )
    config = recipe.config
    for line in recipe.lines():
        log(f"recipe: {line}")
    fp = stage_fingerprint(
        "shared_model",
        group.model_dump(exclude={"train"}),
        [
            (
                art.task,
                upstream_fingerprint(art.splits, f"{art.task}/splits"),
                upstream_fingerprint(art.sampling_weights, f"{art.task}/sampling_weights"),
            )
            for art in members
        ],
        config.model_dump(),
        runtime.precision,
    )
    out = group_dir(artifacts_root, group.name)
    member_fps = {art.task: fingerprint(fp, art.task) for art in members}
    reused = stored_fingerprint(out / "model" / MODEL_FILE) == fp and all(
        stored_fingerprint(art.model_dir / MODEL_FILE) == member_fps[art.task] for art in members
    )
    if not reused:
        tasks = []
        for art, (manifest, classes) in zip(members, manifests, strict=True):
            class_weight = None
            if config.class_weights:
                table = af.read_parquet(art.class_weights).sort_values("label")
                class_weight = table["class_weight"].tolist()
            tasks.append(
                TaskData(
                    name=art.task,
                    manifest=manifest,
                    class_names=classes,
                    sample_weights=af.read_parquet(art.sampling_weights),
                    task_dir=data_root / art.task,
                    cache_root=art.work_dir / "cache",
                    sampling=sampling_config(art),
                    loss_weight=group.weight(art.task),
                    class_weight=class_weight,
                )
            )
        log(
            f"training {config.model} on {runtime.describe()} for group {group.name!r}: "
            f"{', '.join(group.tasks)}"
        )
        checkpoint = Checkpoint(out / ".work" / CHECKPOINT_FILE, fp)
        result = train_multitask(
            tasks,
            config,
            runtime,
            log,
            checkpoint,
            group.freeze_backbone_at,
            group.task_sampling,
            group.batch_mixing,
        )
        common = _bundle_info(result, config, runtime, recipe)
        for k, (art, data) in enumerate(zip(members, tasks, strict=True)):
            model = task_model(result.model, k, config.model, config.img_size)
            info = {
                **common,
                "class_names": data.class_names,
                "fingerprint": member_fps[art.task],
                "metrics": result.best_metrics.get(art.task, {}),
                "parameters": sum(p.numel() for p in model.parameters()),
                "shared_group": group.name,
            }
            with af.atomic_dir(art.model_dir) as tmp:
                save_bundle(tmp, model, info)
                af.write_parquet(tmp / HISTORY_FILE, task_history(result.history, art.task))
        joint = {
            **common,
            "kind": "shared_backbone",
            "group": group.name,
            "tasks": [
                {"task": d.name, "class_names": d.class_names, "loss_weight": d.loss_weight}
                for d in tasks
            ],
            "fingerprint": fp,
            "metrics": result.best_metrics,
            "parameters": result.parameters,
            "freeze_backbone_at": group.freeze_backbone_at,
            "task_sampling": group.task_sampling,
            "batch_mixing": group.batch_mixing,
        }
        with af.atomic_dir(out / "model") as tmp:
            save_bundle(tmp, result.model, joint)
            af.write_parquet(tmp / HISTORY_FILE, result.history)
        checkpoint.clear()
    else:
        joint = af.read_json(out / "model" / MODEL_FILE)
    history = af.read_parquet(out / "model" / HISTORY_FILE)
    md = _metadata(joint, history, out, start)
    md["cross_task_leaks"] = leaks
    return StageResult(fp, reused, md)


def _bundle_info(
    result: MultiTaskResult, config: TrainConfig, runtime: Runtime, recipe: Recipe
) -> dict[str, Any]:
    """What the joint bundle and every per-task bundle record alike."""
    return {
        "arch": config.model,
        "img_size": config.img_size,
        "recipe": recipe.as_json(),
        "epochs_planned": result.epochs_planned,
        "time_budget": result.plan,
        "mean": list(result.preprocess.mean),
        "std": list(result.preprocess.std),
        "interpolation": result.preprocess.interpolation,
        "config": config.model_dump(),
        "best_epoch": result.best_epoch,
        "epochs_run": int(result.history["epoch"].nunique()),
        "device": runtime.describe(),
        "precision": runtime.precision,
        "train_seconds": round(result.seconds, 2),
        "images_per_second": round(result.images_per_second, 1),
        "resumed_at_epoch": result.resumed_at_epoch,
        "trained_at": pd.Timestamp.now(tz="UTC").isoformat(),
    }


def _metadata(
    joint: dict[str, Any], history: pd.DataFrame, out: Path, start: float
) -> dict[str, Any]:
    md: dict[str, Any] = {
        "arch": joint["arch"],
        "tasks": ", ".join(t["task"] for t in joint["tasks"]),
        "parameters": joint["parameters"],
        "device": joint["device"],
        "precision": joint["precision"],
        "best_epoch": joint["best_epoch"] + 1,
        "epochs_run": joint["epochs_run"],
        "train_images_per_s": joint["images_per_second"],
        "train_seconds": joint["train_seconds"],
        "path": str(out / "model"),
    }
    for task, metrics in joint["metrics"].items():
        md[f"val_accuracy/{task}"] = metrics.get("accuracy")
        md[f"val_macro_f1/{task}"] = metrics.get("macro_f1")
    for t in joint["tasks"]:
        rows = task_history(history, t["task"])
        md[f"curves/{t['task']}"] = Png(history_png(rows))
        md[f"history/{t['task']}"] = rows[HISTORY_COLUMNS].assign(epoch=rows["epoch"] + 1)
    resets = history[history["class_shares"].notna()]
    if len(resets):
        md["adaptive_resets"] = resets[["epoch", "task", "class_shares"]].assign(
            epoch=resets["epoch"] + 1, class_shares=resets["class_shares"].map(list)
        )
    if joint.get("resumed_at_epoch") is not None:
        md["resumed_at_epoch"] = joint["resumed_at_epoch"] + 1
    record_elapsed(md, start)
    return md
