"""The model stage: train (or reuse) the task's classifier and write its bundle.

Training checkpoints after every epoch under the task's work directory, keyed by the stage's
input fingerprint: a materialisation that was killed continues from its last finished epoch
the next time the same inputs and settings are materialised. The checkpoint is removed once
the bundle is in place.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from mtmc_pipeline import artifacts as af
from mtmc_pipeline.artifacts import MODEL_FILE, TaskArtifacts, stored_fingerprint
from mtmc_pipeline.config import TrainConfig
from mtmc_pipeline.data.splits import read_manifest
from mtmc_pipeline.plots import history_png
from mtmc_pipeline.runtime import DeviceSettings
from mtmc_pipeline.stages.common import (
    Png,
    StageResult,
    record_elapsed,
    stage_fingerprint,
    upstream_fingerprint,
)

CHECKPOINT_FILE = "model-checkpoint.safetensors"
HISTORY_FILE = "history.parquet"
HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1", "lr"]


def run_training(
    task_dir: Path,
    art: TaskArtifacts,
    config: TrainConfig,
    device: DeviceSettings,
    log: Callable[[str], None] = print,
) -> StageResult:
    """Train, or reuse the stored bundle: torch is imported only to train.

    The fingerprint holds the *requested* precision (``auto`` stays ``auto``), so a bundle is
    reused on any machine that asks for the same; ``model.json`` records what was used.
    """
    start = time.perf_counter()
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
        from mtmc_pipeline.training.models import save_bundle
        from mtmc_pipeline.training.train import train_model

        manifest, classes = read_manifest(art.splits)
        weights = af.read_parquet(art.sampling_weights)
        class_weight = None
        if config.class_weights:
            table = af.read_parquet(art.class_weights).sort_values("label")
            class_weight = table["class_weight"].tolist()
        with device.acquire() as runtime:  # several GPUs: this training's own
            log(f"training {config.model} on {runtime.describe()} for task {art.task!r}")
            checkpoint = Checkpoint(art.work_dir / CHECKPOINT_FILE, fp)
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
            )
        info = {
            "arch": config.model,
            "class_names": classes,
            "img_size": config.img_size,
            "mean": list(result.preprocess.mean),
            "std": list(result.preprocess.std),
            "interpolation": result.preprocess.interpolation,
            "config": config.model_dump(),
            "fingerprint": fp,
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "metrics": result.best_metrics,
            "parameters": result.parameters,
            "device": runtime.describe(),
            "precision": runtime.precision,
            "train_seconds": round(result.seconds, 2),
            "images_per_second": round(result.images_per_second, 1),
            "resumed_at_epoch": result.resumed_at_epoch,
            "trained_at": pd.Timestamp.now(tz="UTC").isoformat(),
        }
        history = result.history
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
