"""The training loop: balanced sampling, warmup + cosine, frozen-backbone epochs, AMP,
no weight decay on norm layers and biases, early stopping on a validation metric.

The best epoch's weights are what the loop returns. Images come from the decoded cache
(:mod:`mtmc_pipeline.data`), normalisation happens on the device once per batch.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn
from torch.utils.data import DataLoader, WeightedRandomSampler

from mtmc_pipeline.augment import AugmentSettings, BatchAugment
from mtmc_pipeline.config import TrainConfig
from mtmc_pipeline.data import CachedImageDataset, DecodedCache, Normalize
from mtmc_pipeline.evaluate import predict_logits
from mtmc_pipeline.losses import build_loss
from mtmc_pipeline.metrics import confusion, cross_entropy, summary_metrics
from mtmc_pipeline.models import Preprocess, create_model, head_parameters
from mtmc_pipeline.runtime import Runtime

Log = Callable[[str], None]


@dataclass
class TrainResult:
    model: nn.Module
    preprocess: Preprocess
    history: pd.DataFrame
    best_epoch: int
    best_metrics: dict[str, float]
    seconds: float
    images_per_second: float
    parameters: int


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def _monitor_value(metrics: dict[str, float], monitor: str) -> float:
    """Larger is better for every monitored quantity (the validation loss is negated)."""
    return -metrics["val_loss"] if monitor == "val_loss" else metrics[monitor]


def _set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    head = {id(p) for p in head_parameters(model)}
    for p in model.parameters():
        if id(p) not in head:
            p.requires_grad_(trainable)


def train_model(
    manifest: pd.DataFrame,
    class_names: list[str],
    sample_weights: pd.DataFrame | None,
    task_dir: Path,
    cache_root: Path,
    config: TrainConfig,
    runtime: Runtime,
    log: Log = print,
) -> TrainResult:
    """Train on the manifest's train split, select the best epoch on its val split."""
    seed_everything(config.seed)
    num_classes = len(class_names)
    model = create_model(
        config.model, num_classes, config.pretrained, config.pretrained_path, config.drop_rate, log
    )
    pre = Preprocess.for_model(model, config.img_size)
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    parameters = sum(p.numel() for p in model.parameters())

    cache = DecodedCache(cache_root, config.img_size, pre.interpolation)
    decoded = cache.ensure(
        [str(task_dir / r) for r in manifest["relpath"]], manifest["content_hash"].tolist()
    )
    log(f"decoded {decoded} new images into the cache ({len(manifest) - decoded} cached)")
    train_rows = manifest[manifest["split"] == "train"].reset_index(drop=True)
    val_rows = manifest[manifest["split"] == "val"].reset_index(drop=True)
    train_ds = CachedImageDataset(cache, train_rows["content_hash"], train_rows["label"])
    val_ds = CachedImageDataset(cache, val_rows["content_hash"], val_rows["label"])

    generator = torch.Generator().manual_seed(config.seed)
    sampler = None
    if config.balanced_sampling and sample_weights is not None:
        weights = train_rows[["relpath"]].merge(sample_weights, on="relpath", how="left")["weight"]
        sampler = WeightedRandomSampler(
            torch.tensor(weights.fillna(1.0).to_numpy(), dtype=torch.double),
            num_samples=len(train_rows),
            replacement=True,
            generator=generator,
        )
    loader = DataLoader(
        train_ds,
        batch_size=min(config.batch_size, len(train_ds)),
        sampler=sampler,
        shuffle=sampler is None,
        generator=generator if sampler is None else None,
        num_workers=runtime.num_workers,
        drop_last=len(train_ds) > config.batch_size,
        pin_memory=runtime.device.type == "cuda",
        persistent_workers=runtime.num_workers > 0,
    )
    normalize = Normalize(pre, runtime.device, runtime.channels_last)
    augment = (
        BatchAugment(AugmentSettings(hflip=config.hflip), generator) if config.augment else None
    )
    criterion = build_loss(config, num_classes).to(runtime.device)
    optimizer = create_optimizer_v2(
        model,
        opt=config.optimizer,
        lr=config.lr,
        weight_decay=config.weight_decay,
        momentum=config.momentum,
        filter_bias_and_bn=True,
    )
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched="cosine",
        num_epochs=config.epochs,
        warmup_epochs=config.warmup_epochs,
        warmup_lr=config.lr * 0.01,
        min_lr=config.lr * 0.01,
        step_on_epochs=False,
        updates_per_epoch=len(loader),
    )
    scaler = torch.amp.GradScaler(enabled=runtime.amp_dtype == torch.float16)

    history: list[dict[str, float]] = []
    best_value, best_epoch, best_state = -np.inf, -1, None
    best_metrics: dict[str, float] = {}
    updates, start, seen = 0, time.perf_counter(), 0
    for epoch in range(config.epochs):
        frozen = epoch < config.freeze_epochs
        _set_backbone_trainable(model, not frozen)
        model.train()
        t0, losses, count = time.perf_counter(), 0.0, 0
        for x, y in loader:
            y = y.to(runtime.device, non_blocking=True)
            x = normalize.to_device(x)
            if augment is not None:
                x = augment(x)
            with runtime.autocast():
                loss = criterion(model(normalize(x)), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            updates += 1
            scheduler.step_update(updates)
            losses += loss.item() * len(y)
            count += len(y)
        train_seconds = time.perf_counter() - t0
        seen += count
        logits = predict_logits(model, val_ds, normalize, runtime, config.batch_size * 2)
        y_val = val_rows["label"].to_numpy()
        metrics = summary_metrics(confusion(y_val, logits.argmax(1), num_classes))
        metrics["val_loss"] = cross_entropy(logits, y_val)
        row = {
            "epoch": epoch,
            "train_loss": losses / max(count, 1),
            "val_loss": metrics["val_loss"],
            "val_accuracy": metrics["accuracy"],
            "val_macro_f1": metrics["macro_f1"],
            "val_balanced_accuracy": metrics["balanced_accuracy"],
            "lr": optimizer.param_groups[0]["lr"],
            "frozen": frozen,
            "images_per_second": count / train_seconds if train_seconds > 0 else 0.0,
            "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        value = _monitor_value(metrics, config.monitor)
        improved = value > best_value
        if improved:
            best_value, best_epoch, best_metrics = value, epoch, metrics
            best_state = copy.deepcopy(model.state_dict())
        log(
            f"epoch {epoch + 1}/{config.epochs}{' (frozen backbone)' if frozen else ''}: "
            f"train_loss {row['train_loss']:.4f} val_loss {row['val_loss']:.4f} "
            f"val_acc {row['val_accuracy']:.4f} val_macro_f1 {row['val_macro_f1']:.4f} "
            f"{row['images_per_second']:.0f} img/s{' *' if improved else ''}"
        )
        if epoch - best_epoch >= config.patience and not frozen:
            log(f"early stop: no gain in {config.monitor} for {config.patience} epochs")
            break
    seconds = time.perf_counter() - start
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return TrainResult(
        model=model,
        preprocess=pre,
        history=pd.DataFrame(history),
        best_epoch=best_epoch,
        best_metrics=best_metrics,
        seconds=seconds,
        images_per_second=seen / sum(h["seconds"] for h in history),
        parameters=parameters,
    )
