"""Learning-rate schedules: linear warmup from lr / 100, then the configured decay.

cosine, step, multistep and warm_restarts are timm schedulers stepped per optimizer update,
so the learning rate is a pure function of the update count (which also makes resuming
exact). plateau decays when the monitored validation metric stalls; it is torch's
``ReduceLROnPlateau`` behind the same warmup, because timm's plateau scheduler is deprecated.

Every schedule has ``step_update(updates)`` (after each optimizer step), ``step(epoch,
metric)`` (after each validation, larger metric is better) and a state dict.
"""

from __future__ import annotations

from typing import Any, Protocol

from timm.scheduler import create_scheduler_v2
from torch.optim import Optimizer
from torch.optim.lr_scheduler import ReduceLROnPlateau

from mtmc_pipeline.config import TrainConfig

WARMUP_START = 0.01  # warmup starts at this fraction of lr


class Schedule(Protocol):
    def step_update(self, num_updates: int, metric: float | None = None) -> None: ...
    def step(self, epoch: int, metric: float | None = None) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class PlateauSchedule:
    """Linear warmup per update, then decay by ``decay_rate`` when the metric stops rising."""

    def __init__(self, optimizer: Optimizer, config: TrainConfig, updates_per_epoch: int):
        self.optimizer = optimizer
        self.warmup_epochs = config.warmup_epochs
        self.warmup_updates = config.warmup_epochs * updates_per_epoch
        self.peak = config.lr
        self.plateau = ReduceLROnPlateau(
            optimizer,
            mode="max",
            factor=config.decay_rate,
            patience=config.plateau_patience,
            min_lr=config.lr * config.min_lr_ratio,
        )
        self.step_update(0)

    def step_update(self, num_updates: int, metric: float | None = None) -> None:
        if num_updates <= self.warmup_updates:
            done = num_updates / self.warmup_updates if self.warmup_updates else 1.0
            lr = self.peak * (WARMUP_START + (1 - WARMUP_START) * done)
            for group in self.optimizer.param_groups:
                group["lr"] = lr

    def step(self, epoch: int, metric: float | None = None) -> None:
        """After ``epoch`` finished epochs were validated; warmup epochs never count as stalls."""
        if metric is not None and epoch >= self.warmup_epochs:
            self.plateau.step(metric)

    def state_dict(self) -> dict[str, Any]:
        return self.plateau.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.plateau.load_state_dict(state_dict)


def build_schedule(optimizer: Optimizer, config: TrainConfig, updates_per_epoch: int) -> Schedule:
    """The schedule named by ``config.scheduler``, stepped per update (plateau: per epoch)."""
    if config.scheduler == "plateau":
        return PlateauSchedule(optimizer, config, updates_per_epoch)
    restarts = config.scheduler == "warm_restarts"
    cosine = config.scheduler == "cosine"
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched="cosine" if restarts else config.scheduler,
        # cosine decays over the epochs after warmup, so it reaches its floor at the last one
        num_epochs=(
            config.restart_epochs
            if restarts
            else max(config.epochs - config.warmup_epochs, 1)
            if cosine
            else config.epochs
        ),
        decay_epochs=config.decay_epochs,
        decay_milestones=config.decay_milestones,
        decay_rate=config.decay_rate,
        cycle_mul=config.restart_mult,
        cycle_decay=config.restart_decay,
        cycle_limit=config.epochs if restarts else 1,
        warmup_epochs=config.warmup_epochs,
        warmup_prefix=cosine or restarts,  # step and multistep count epochs from the start
        warmup_lr=config.lr * WARMUP_START,
        min_lr=config.lr * config.min_lr_ratio,
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )
    return scheduler


def relaid(
    schedule: Schedule,
    optimizer: Optimizer,
    config: TrainConfig,
    epochs: int,
    updates_per_epoch: int,
    updates: int,
) -> Schedule:
    """``schedule`` laid out over ``epochs`` instead of ``config.epochs`` (a time budget fitted
    them), at update ``updates``. Its warmup is the same, so nothing done changes; a plateau
    schedule counts no epochs and is returned as it is."""
    if isinstance(schedule, PlateauSchedule):
        return schedule
    laid = build_schedule(
        optimizer, config.model_copy(update={"epochs": epochs}), updates_per_epoch
    )
    laid.step_update(updates)
    return laid
