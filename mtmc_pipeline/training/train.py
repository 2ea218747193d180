"""The training loop: balanced sampling, warmup + schedule, frozen-backbone epochs, AMP,
gradient clipping, EMA, Mixup/CutMix, early stopping on a validation metric, and resuming.

The best epoch's weights are what the loop returns. Images come from the decoded cache
(:mod:`mtmc_pipeline.training.loader`); augmentation and normalisation happen on the device once per
batch. After every epoch the whole training state goes into a :class:`Checkpoint`, so a
killed run continues from its last finished epoch; on the CPU (with ``num_workers=0``) the
continued run ends with exactly the weights an uninterrupted run would have.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, WeightedRandomSampler

from mtmc_pipeline.config import AUTO, ConfigError, TrainConfig
from mtmc_pipeline.data.multilabel_splits import is_multilabel
from mtmc_pipeline.data.splits import TaskDataError
from mtmc_pipeline.evaluation.evaluate import predict_logits
from mtmc_pipeline.evaluation.metrics import confusion, cross_entropy, summary_metrics
from mtmc_pipeline.evaluation.multilabel_metrics import multilabel_metrics
from mtmc_pipeline.runtime import Runtime
from mtmc_pipeline.training.augment import AugmentSettings, BatchAugment, mixup, randaugment
from mtmc_pipeline.training.budget import EpochPlanner, describe_refit, refit_epochs
from mtmc_pipeline.training.checkpoint import Checkpoint
from mtmc_pipeline.training.distributed import SINGLE, Distributed
from mtmc_pipeline.training.loader import (
    CachedImageDataset,
    DecodedCache,
    Normalize,
    inference_loader,
)
from mtmc_pipeline.training.losses import build_loss
from mtmc_pipeline.training.models import Preprocess, create_model
from mtmc_pipeline.training.multilabel import build_multilabel_loss, multi_hot, positive_weight
from mtmc_pipeline.training.schedules import Schedule, build_schedule, relaid

Log = Callable[[str], None]
RESOLVED_BY_RECIPE = (
    "model",
    "img_size",
    "pretrained",
    "epochs",
    "batch_size",
    "optimizer",
    "lr",
    "weight_decay",
)


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
    resumed_at_epoch: int | None = None  # first epoch this process ran, when it resumed
    epochs_planned: int = 0  # config.epochs, or what fitted the time budget
    plan: str = ""  # how the time budget set epochs_planned ("" without a budget)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)  # timm's Mixup draws from numpy's global generator


def _monitor(config: TrainConfig, multilabel: bool) -> str:
    """The monitored quantity: multi-label tasks use mAP unless val_loss is asked for."""
    if multilabel:
        return "val_loss" if config.monitor == "val_loss" else "mAP"
    if config.monitor == "mAP":
        raise ConfigError("train.monitor = mAP: only for multi-label tasks (kind: multilabel)")
    return config.monitor


def _monitor_value(metrics: dict[str, float], monitor: str) -> float:
    """Larger is better for every monitored quantity (the validation loss is negated)."""
    return -metrics["val_loss"] if monitor == "val_loss" else metrics[monitor]


def _train_mode(model: nn.Module, freeze_backbone: bool) -> None:
    """``model.train()``, with everything outside the classifier head frozen or trainable.

    A frozen backbone keeps its running statistics too, not only its weights: its batch norm
    layers go to eval mode.
    """
    head = model.get_classifier()
    in_head = {id(m) for m in head.modules()} if isinstance(head, nn.Module) else set()
    model.train()
    for m in model.modules():
        if id(m) in in_head:
            continue
        for p in m.parameters(recurse=False):
            p.requires_grad_(not freeze_backbone)
        if freeze_backbone and isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """timm's optimizer with two parameter groups: weight decay on weight matrices and
    kernels, none on 1-D parameters (norm scales and shifts, biases)."""
    opt = config.optimizer
    if opt == "sgd" and not config.nesterov:
        opt = "momentum"  # timm's name for SGD with classical momentum
    return create_optimizer_v2(
        model,
        opt=opt,
        lr=config.lr,
        weight_decay=config.weight_decay,
        momentum=config.momentum,
        filter_bias_and_bn=True,
    )


def _check_input_size(model: nn.Module, config: TrainConfig, device: torch.device) -> None:
    """Fail before any decoding when the network cannot take ``img_size`` inputs."""
    size = config.img_size
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, 3, size, size, device=device))
    except (AssertionError, RuntimeError, ValueError) as e:
        raise ConfigError(
            f"train.img_size = {size}: {config.model} cannot take {size}x{size} images "
            f"({str(e).splitlines()[0]})"
        ) from None


def train_loader(
    dataset: CachedImageDataset,
    weights: Sequence[float] | None,
    config: TrainConfig,
    runtime: Runtime,
    generator: torch.Generator,
    dist: Distributed = SINGLE,
) -> DataLoader:
    """Batches of the train split: drawn by ``weights`` (balanced sampling) or shuffled.

    ``config.batch_size`` is the global batch; under DDP each rank loads its share of it.
    """
    n = len(dataset)
    if n < 2:
        raise TaskDataError(f"the train split has {n} usable image(s); at least 2 are needed")
    batch_size = min(config.batch_size, n)
    if config.mixup_alpha or config.cutmix_alpha:
        batch_size -= batch_size % 2  # images are mixed in pairs
    batch_size = dist.global_batch(batch_size)
    if weights is not None:
        sampler = WeightedRandomSampler(
            torch.tensor(np.asarray(weights, dtype=np.float64)),
            num_samples=n,
            replacement=True,
            generator=generator,
        )
    else:
        sampler = RandomSampler(dataset, generator=generator)  # what shuffle=True builds
    return DataLoader(
        dataset,
        batch_size=batch_size // dist.world_size,
        sampler=dist.shard(sampler, batch_size, drop_last=n > batch_size),
        generator=generator if weights is None else None,
        num_workers=runtime.num_workers,
        drop_last=n > batch_size,
        pin_memory=runtime.device.type == "cuda",
        persistent_workers=runtime.num_workers > 0,
    )


class _Stepper:
    """Backward, optional unscale + clip, optimizer step, scaler update; keeps the grad norm."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: TrainConfig,
        runtime: Runtime,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.clip = config.clip_grad_norm
        self.runtime = runtime
        # fp16 needs loss scaling; bf16 and fp32 do not
        self.scaler = torch.amp.GradScaler(
            runtime.device.type, enabled=runtime.amp_dtype == torch.float16
        )

    def __call__(self, loss: torch.Tensor) -> torch.Tensor:
        """One update; returns the gradient norm before clipping (a 0-dim tensor)."""
        self.optimizer.zero_grad(set_to_none=True)
        with self.runtime.backward_kernels():
            self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        if self.clip is not None:
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        else:
            norm = nn.utils.get_total_norm(
                [p.grad for p in self.model.parameters() if p.grad is not None]
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return norm


@dataclass
class _Parts:
    """Everything whose state a resumed run needs back, beyond the history and best epoch."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    stepper: _Stepper
    criterion: nn.Module
    ema: ModelEmaV3 | None
    generator: torch.Generator
    device: torch.device

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.stepper.scaler.state_dict(),
            "criterion": self.criterion.state_dict(),  # GHM-C's running bin counts
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "rng": {
                "torch": torch.get_rng_state(),
                "generator": self.generator.get_state(),
                "numpy": np.random.get_state(),
                "cuda": torch.cuda.get_rng_state(self.device)
                if self.device.type == "cuda"
                else None,
            },
        }

    def restore(self, saved: dict[str, Any]) -> None:
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.schedule.load_state_dict(saved["schedule"])
        self.stepper.scaler.load_state_dict(saved["scaler"])
        self.criterion.load_state_dict(saved["criterion"])
        if self.ema is not None:
            self.ema.module.load_state_dict(saved["ema"])
        rng = saved["rng"]
        torch.set_rng_state(rng["torch"])
        self.generator.set_state(rng["generator"])
        np.random.set_state(rng["numpy"])
        if rng["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)


def resume(
    parts: _Parts, checkpoint: Checkpoint | None, config: TrainConfig, log: Log
) -> dict[str, Any] | None:
    """Restore ``parts`` from ``checkpoint`` when it was made from the same inputs; the saved
    loop state (epoch, updates, history, best epoch...), or None to start afresh."""
    saved, why = checkpoint.load() if checkpoint is not None else (None, "")
    if saved is not None:
        parts.restore(saved)
        parts.schedule.step_update(saved["updates"])
        log(f"resuming from the checkpoint after epoch {saved['epoch']}/{config.epochs}")
    elif checkpoint is not None and why != "no checkpoint":
        log(f"starting afresh: {why}")
    return saved


def _cpu_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def train_model(
    manifest: pd.DataFrame,
    class_names: list[str],
    sample_weights: pd.DataFrame | None,
    task_dir: Path,
    cache_root: Path,
    config: TrainConfig,
    runtime: Runtime,
    log: Log = print,
    checkpoint: Checkpoint | None = None,
    class_weight: Sequence[float] | None = None,
    dist: Distributed = SINGLE,
) -> TrainResult:
    """Train on the manifest's train split, select the best epoch on its val split.

    ``sample_weights`` (the sampling stage's per-image table) drives balanced sampling when
    ``config.balanced_sampling``; ``class_weight`` (one per class) weights the loss. With a
    ``checkpoint`` the run continues from it when it was made from the same inputs. Under
    ``dist`` (DDP, see :mod:`mtmc_pipeline.training.distributed`) every rank trains on its share
    of each global batch and only rank 0 writes the checkpoint.
    """
    unresolved = [k for k in RESOLVED_BY_RECIPE if getattr(config, k) == AUTO]
    if unresolved:
        raise ConfigError(
            f"train.{', train.'.join(unresolved)} = auto: resolve the recipe first "
            "(mtmc_pipeline.training.recipe.resolve_recipe)"
        )
    seed_everything(config.seed)
    num_classes = len(class_names)
    model = create_model(
        config.model,
        num_classes,
        config.pretrained,
        config.pretrained_path,
        config.drop_rate,
        log,
        config.img_size,
    )
    pre = Preprocess.for_model(model, config.img_size)
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if runtime.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    _check_input_size(model, config, runtime.device)
    cw = None if class_weight is None else torch.as_tensor(class_weight, dtype=torch.float32)
    multilabel = is_multilabel(manifest)
    if multilabel:  # one sigmoid per class, multi-hot targets
        pos_weight = positive_weight(manifest, num_classes) if config.pos_weight else None
        criterion = build_multilabel_loss(config, num_classes, cw, pos_weight)
    else:
        criterion = build_loss(config, num_classes, cw)  # fails before decoding
    criterion = criterion.to(runtime.device)
    monitor = _monitor(config, multilabel)

    def targets(rows: pd.DataFrame) -> Sequence[Any]:
        return multi_hot(rows, num_classes) if multilabel else rows["label"]

    parameters = sum(p.numel() for p in model.parameters())

    cache = DecodedCache(cache_root, config.img_size, pre.interpolation)
    with dist.main_first():
        decoded = cache.ensure(
            [str(task_dir / r) for r in manifest["relpath"]], manifest["content_hash"].tolist()
        )
    log(f"decoded {decoded} new images into the cache ({len(manifest) - decoded} cached)")
    train_rows = manifest[manifest["split"] == "train"].reset_index(drop=True)
    val_rows = manifest[manifest["split"] == "val"].reset_index(drop=True)
    train_ds = CachedImageDataset(
        cache, train_rows["content_hash"], targets(train_rows), randaugment(config)
    )
    val_ds = CachedImageDataset(cache, val_rows["content_hash"], targets(val_rows))
    val_loader = inference_loader(val_ds, config.batch_size * 2, runtime)
    y_val = np.asarray(targets(val_rows))

    generator = torch.Generator().manual_seed(config.seed)
    weights = None
    if config.balanced_sampling and sample_weights is not None:
        merged = train_rows[["relpath"]].merge(sample_weights, on="relpath", how="left")
        weights = merged["weight"].fillna(1.0).to_numpy()
    loader = train_loader(train_ds, weights, config, runtime, generator, dist)
    normalize = Normalize(pre, runtime.device, runtime.channels_last)
    augment = (
        BatchAugment(AugmentSettings(hflip=config.hflip), generator, dist.rank, dist.world_size)
        if config.augment
        else None
    )
    mix = mixup(config, num_classes)
    optimizer = build_optimizer(model, config)
    schedule = build_schedule(optimizer, config, len(loader))
    stepper = _Stepper(model, optimizer, config, runtime)
    ema = ModelEmaV3(model, decay=config.ema_decay, use_warmup=True) if config.ema else None
    eval_model = ema.module if ema is not None else model
    parts = _Parts(model, optimizer, schedule, stepper, criterion, ema, generator, runtime.device)
    net = dist.wrap(model, runtime.device, find_unused=config.freeze_epochs > 0)
    end_epoch, plan = config.epochs, ""
    planner = None
    budget = None  # seconds
    if isinstance(config.time_budget_minutes, float):  # "auto" with epochs set means none
        budget = config.time_budget_minutes * 60
        planner = EpochPlanner(
            budget,
            config.epochs,
            len(loader),
            loader.batch_size,
            len(val_ds),
        )

    history: list[dict[str, Any]] = []
    best_value, best_epoch, best_state = -np.inf, -1, None
    best_metrics: dict[str, float] = {}
    start_epoch, updates = 0, 0
    saved = resume(parts, checkpoint, config, log)
    if saved is not None:
        start_epoch, updates, history = saved["epoch"], saved["updates"], saved["history"]
        best_value, best_epoch = saved["best_value"], saved["best_epoch"]
        best_metrics, best_state = saved["best_metrics"], saved["best_state"]
        end_epoch, plan, planner = saved["epochs_planned"], saved["plan"], None

    if history and _stalled(history, best_epoch, config):
        end_epoch = start_epoch  # the killed run had already stopped early
    for epoch in itertools.count(start_epoch):
        if epoch >= end_epoch:  # the time budget may lower end_epoch during the first epoch
            break
        frozen = epoch < config.freeze_epochs
        _train_mode(model, freeze_backbone=frozen)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=runtime.device)
        norm_sum = torch.zeros((), device=runtime.device)
        count, steps, lr = 0, 0, optimizer.param_groups[0]["lr"]
        if planner is not None:
            planner.begin()
        for x, y in loader:
            y = y.to(runtime.device, non_blocking=True)
            x = normalize.to_device(x)
            if augment is not None:
                x = augment(x)
            target = y
            if mix is not None:
                x, target = mix(x, y)
            with runtime.autocast():
                loss = criterion(net(normalize(x)), target)
            lr = optimizer.param_groups[0]["lr"]
            norm_sum += stepper(loss).detach()
            updates += 1
            schedule.step_update(updates)
            if ema is not None:
                ema.update(model, step=updates)
            if planner is not None:
                if runtime.device.type == "cuda":
                    torch.cuda.synchronize(runtime.device)
                planned = planner.step_done()  # on the same step on every rank
                if planned is not None:
                    planned = dist.from_main(planned)
                    end_epoch, plan = planned, planner.describe(planned)
                    schedule = parts.schedule = relaid(
                        schedule, optimizer, config, end_epoch, len(loader), updates
                    )
                    log(plan)
                    planner = None
            loss_sum += loss.detach() * len(y)
            count += len(y)
            steps += 1
        if runtime.device.type == "cuda":
            torch.cuda.synchronize(runtime.device)  # count the queued kernels in the epoch
        train_seconds = time.perf_counter() - t0
        loss_sum = dist.all_sum(loss_sum)
        count = dist.all_sum_int(count)
        logits = predict_logits(eval_model, val_loader, normalize, runtime)
        if multilabel:
            metrics = multilabel_metrics(logits, y_val)
            metrics["val_loss"] = metrics["log_loss"]
        else:
            metrics = summary_metrics(confusion(y_val, logits.argmax(1), num_classes))
            metrics["val_loss"] = cross_entropy(logits, y_val)
        row = {
            "epoch": epoch,
            "train_loss": loss_sum.item() / max(count, 1),
            "val_loss": metrics["val_loss"],
            "val_accuracy": metrics["accuracy"],
            "val_macro_f1": metrics["macro_f1"],
            "val_balanced_accuracy": metrics["balanced_accuracy"],
            "lr": lr,  # of the epoch's last update
            "grad_norm": norm_sum.item() / max(steps, 1),
            "frozen": frozen,
            "images": count,
            "step_seconds": train_seconds,
            "images_per_second": count / train_seconds if train_seconds > 0 else 0.0,
            "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        value = _monitor_value(metrics, monitor)
        schedule.step(epoch + 1, value)
        if budget is not None:
            fitted = dist.from_main(refit_epochs(budget, config.epochs, _seconds(history)))
            if fitted != end_epoch:
                end_epoch, plan = fitted, describe_refit(budget, _seconds(history), fitted)
                log(plan)
                schedule = parts.schedule = relaid(
                    schedule, optimizer, config, end_epoch, len(loader), updates
                )
        improved = value > best_value
        if improved:
            best_value, best_epoch, best_metrics = value, epoch, metrics
            best_state = _cpu_copy(eval_model)
        if checkpoint is not None and dist.is_main:
            checkpoint.save(
                {
                    **parts.state(),
                    "epoch": epoch + 1,
                    "updates": updates,
                    "history": history,
                    "best_value": best_value,
                    "best_epoch": best_epoch,
                    "best_metrics": best_metrics,
                    "best_state": best_state,
                    "epochs_planned": end_epoch,
                    "plan": plan,
                }
            )
        log(
            f"epoch {epoch + 1}/{end_epoch}{' (frozen backbone)' if frozen else ''}: "
            f"train_loss {row['train_loss']:.4f} val_loss {row['val_loss']:.4f} "
            f"val_acc {row['val_accuracy']:.4f} val_macro_f1 {row['val_macro_f1']:.4f} "
            f"lr {row['lr']:.2e} {row['images_per_second']:.0f} img/s{' *' if improved else ''}"
        )
        if _stalled(history, best_epoch, config):
            log(f"early stop: no gain in {monitor} or val_loss for {config.patience} epochs")
            break
    if best_state is not None:
        eval_model.load_state_dict(best_state)
    eval_model.eval()
    frame = pd.DataFrame(history)
    return TrainResult(
        model=eval_model,
        preprocess=pre,
        history=frame,
        best_epoch=best_epoch,
        best_metrics=best_metrics,
        seconds=float(frame["seconds"].sum()),
        images_per_second=_overall_rate(frame),
        parameters=parameters,
        resumed_at_epoch=start_epoch if saved is not None else None,
        epochs_planned=end_epoch,
        plan=plan,
    )


def _stalled(history: list[dict[str, Any]], best_epoch: int, config: TrainConfig) -> bool:
    """Early stopping: ``patience`` epochs in which neither the monitor (best at
    ``best_epoch``) nor the validation loss improved; never while the backbone is frozen.

    ``history`` has a row per epoch with ``epoch``, ``val_loss`` and ``frozen``. On a small
    val split the monitor swings while the lr is high, and a falling loss says the run is
    still learning: on the demo's multi-label task, mAP stopped the run at epoch 25 of 50 on
    its own, at half the peak lr.
    """
    last = history[-1]
    losses = [(row["val_loss"], row["epoch"]) for row in history if math.isfinite(row["val_loss"])]
    loss_best = min(losses)[1] if losses else -1
    return last["epoch"] - max(best_epoch, loss_best) >= config.patience and not last["frozen"]


def _seconds(history: list[dict[str, Any]]) -> list[float]:
    return [row["seconds"] for row in history]


def _overall_rate(history: pd.DataFrame) -> float:
    """Training images per second over all epochs (validation time excluded)."""
    seconds = history["step_seconds"].sum()
    return float(history["images"].sum() / seconds) if seconds > 0 else 0.0
