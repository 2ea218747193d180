"""One shared backbone, one linear head per task (MTMC-Pytorch's design, without its bug).

Each task keeps its own balanced sampler. By default every step's batch holds a part of
each task's images (one backbone pass, each part through its own head); a part's loss is
cross-entropy (or the configured loss) of its task's head, and every image counts alike,
times its task's loss weight. Batch norm then normalises training batches with statistics of
the same mix of images its running statistics hold at inference: with one task per batch it
normalised each task by its own statistics in training and by the blend at inference, which
cost the demo's texture task 14 points of test accuracy in a group with digits. The
alternative, MTMC-Pytorch's, interleaves one task per batch by a schedule of task ids
shuffled from the seed and the epoch number. Either way an image of task ``k`` reaches head
``k`` only: the other heads get no gradient from it. Every head reads the
backbone's pooled feature (MTMC-Pytorch feeds head ``k`` the previous head's output).

The best epoch is the one with the best mean of the per-task monitors. The optimisation
pieces, the checkpoint and early stopping are :mod:`mtmc_pipeline.training.train`'s. A group
of one task trains exactly what :func:`~mtmc_pipeline.training.train.train_model` trains.

Bundles: the joint bundle (``arch``, one class list per head, all weights) runs every head in
one pass; :func:`task_model` turns one head into a plain timm classifier with the same
weights, which is the member task's ``T/model/`` bundle.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import timm
import torch
from safetensors.torch import load_file
from timm.utils import ModelEmaV3
from torch import nn

from mtmc_pipeline.artifacts import read_json
from mtmc_pipeline.config import ConfigError, SamplingConfig, TrainConfig
from mtmc_pipeline.evaluation.evaluate import predict_logits
from mtmc_pipeline.evaluation.metrics import confusion, cross_entropy, summary_metrics
from mtmc_pipeline.runtime import Runtime
from mtmc_pipeline.training.adaptive import class_shares, draw_weights, per_class_metric
from mtmc_pipeline.training.augment import AugmentSettings, BatchAugment, mixup, randaugment
from mtmc_pipeline.training.budget import EpochPlanner, describe_refit, refit_epochs
from mtmc_pipeline.training.checkpoint import Checkpoint
from mtmc_pipeline.training.loader import (
    CachedImageDataset,
    DecodedCache,
    Normalize,
    inference_loader,
)
from mtmc_pipeline.training.losses import build_loss
from mtmc_pipeline.training.models import (
    MODEL_FILE,
    WEIGHTS_FILE,
    Preprocess,
    _size_kwargs,
    create_model,
)
from mtmc_pipeline.training.schedules import build_schedule, relaid
from mtmc_pipeline.training.train import (
    Log,
    TrainResult,
    _check_input_size,
    _cpu_copy,
    _monitor_value,
    _Parts,
    _stalled,
    _Stepper,
    _train_mode,
    build_optimizer,
    resume,
    seed_everything,
    train_loader,
)


@dataclass
class TaskData:
    """One member task's inputs: its split manifest, classes and sampling weights."""

    name: str
    manifest: pd.DataFrame
    class_names: list[str]
    sample_weights: pd.DataFrame | None
    task_dir: Path
    cache_root: Path
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    loss_weight: float = 1.0
    class_weight: Sequence[float] | None = None


class MultiHeadNet(nn.Module):
    """A timm backbone without classifier (``num_classes=0``) and one head per task."""

    def __init__(self, backbone: nn.Module, heads: Sequence[nn.Module]) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleList(heads)

    def get_classifier(self) -> nn.ModuleList:
        """The heads: what ``train._train_mode`` leaves trainable when the backbone freezes."""
        return self.heads

    def no_weight_decay(self) -> set[str]:
        """The backbone's own exemptions from weight decay (timm's optimizer factory asks)."""
        own = getattr(self.backbone, "no_weight_decay", lambda: set())()
        return {f"backbone.{name}" for name in own}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every head's logits, from one backbone pass."""
        feature = self.backbone(x)
        return [head(feature) for head in self.heads]

    def forward_task(self, x: torch.Tensor, k: int) -> torch.Tensor:
        return self.heads[k](self.backbone(x))

    def forward_parts(
        self, x: torch.Tensor, tasks: Sequence[int], sizes: Sequence[int]
    ) -> list[torch.Tensor]:
        """A batch of consecutive parts, part ``i`` of ``sizes[i]`` images of task
        ``tasks[i]``: one backbone pass, each part through its own task's head only."""
        feature = self.backbone(x)
        return [self.heads[k](f) for k, f in zip(tasks, feature.split(list(sizes)), strict=True)]


class _HeadView(nn.Module):
    """Head ``k`` of a :class:`MultiHeadNet` as a single-output model (for validation)."""

    def __init__(self, net: MultiHeadNet, k: int) -> None:
        super().__init__()
        self.net, self.k = net, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_task(x, self.k)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled feature (``logits_fp32`` runs it under autocast)."""
        return self.net.backbone(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.net.heads[self.k](features)


def _linear_classifier(model: nn.Module, arch: str) -> nn.Linear:
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise ConfigError(
            f"train.model = {arch!r}: a shared backbone needs a model whose classifier is one "
            f"linear layer (this one has {type(head).__name__})"
        )
    return head


def create_multihead(
    arch: str, num_classes: Sequence[int], config: TrainConfig, log: Log = print
) -> MultiHeadNet:
    """The backbone and heads, each head initialised as timm initialises that model's head.

    The first head and the backbone come from one ``create_model`` call (so that a group of
    one starts from the weights a plain task starts from); further heads are the classifiers
    of freshly built models of the same architecture.
    """
    first = create_model(
        arch,
        num_classes[0],
        config.pretrained,
        config.pretrained_path,
        config.drop_rate,
        log,
        config.img_size,
    )
    heads = [copy.deepcopy(_linear_classifier(first, arch))]
    for n in num_classes[1:]:
        donor = timm.create_model(
            arch, pretrained=False, num_classes=n, **_size_kwargs(arch, config.img_size)
        )
        heads.append(_linear_classifier(donor, arch))
    first.reset_classifier(0)
    return MultiHeadNet(first, heads)


def task_model(net: MultiHeadNet, k: int, arch: str, img_size: int) -> nn.Module:
    """Head ``k`` with the backbone as a plain timm classifier: the same weights, the same
    logits, loadable alone by ``load_bundle``."""
    head = net.heads[k]
    model = timm.create_model(
        arch, pretrained=False, num_classes=head.out_features, **_size_kwargs(arch, img_size)
    )
    missing = model.load_state_dict(net.backbone.state_dict(), strict=False).missing_keys
    classifier = _linear_classifier(model, arch)
    classifier.load_state_dict(head.state_dict())
    named = {id(p): name for name, p in model.named_parameters()}
    head_names = {named[id(p)] for p in classifier.parameters()}
    if set(missing) - head_names:
        raise ValueError(f"{arch}: backbone tensors missing from the per-task model: {missing}")
    return model.to(next(net.parameters()).device).eval()


def load_joint_bundle(
    directory: Path, device: str | torch.device = "cpu"
) -> tuple[MultiHeadNet, dict[str, Any]]:
    """Rebuild a saved joint model (eval mode, channels-last) and its ``model.json``."""
    info = read_json(directory / MODEL_FILE)
    state = load_file(str(directory / WEIGHTS_FILE))
    backbone = timm.create_model(
        info["arch"],
        pretrained=False,
        num_classes=0,
        **_size_kwargs(info["arch"], info["img_size"]),
    )
    heads = []
    for k in range(len(info["tasks"])):
        out_features, in_features = state[f"heads.{k}.weight"].shape
        heads.append(nn.Linear(in_features, out_features))
    net = MultiHeadNet(backbone, heads)
    net.load_state_dict(state)
    return net.to(device, memory_format=torch.channels_last).eval(), info


@dataclass
class MultiTaskResult:
    model: MultiHeadNet
    preprocess: Preprocess
    history: pd.DataFrame  # one row per (epoch, task)
    best_epoch: int
    best_metrics: dict[str, dict[str, float]]  # per task
    seconds: float
    images_per_second: float
    parameters: int
    resumed_at_epoch: int | None = None
    epochs_planned: int = 0  # config.epochs, or what fitted the time budget
    plan: str = ""  # how the time budget set epochs_planned ("" without a budget)


TASK_SAMPLING = ("equal", "proportional")
BATCH_MIXING = ("mixed", "interleaved")


def _check_sampling(sampling: str) -> None:
    if sampling not in TASK_SAMPLING:
        raise ValueError(f"task_sampling = {sampling!r}: expected one of {TASK_SAMPLING}")


def part_sizes(train_sizes: Sequence[int], batch_size: int, sampling: str) -> list[int]:
    """Each member's part of a mixed batch of about ``batch_size`` images: equal parts, or
    parts proportional to the members' train splits (at least 2 images each)."""
    _check_sampling(sampling)
    if len(train_sizes) == 1:
        return [batch_size]
    if sampling == "equal":
        return [max(2, round(batch_size / len(train_sizes)))] * len(train_sizes)
    total = sum(train_sizes)
    return [max(2, round(batch_size * n / total)) for n in train_sizes]


def task_batches(loader_batches: Sequence[int], sampling: str) -> list[int]:
    """How many batches each member trains on per epoch, interleaved one task per batch.

    ``proportional``: one pass over each member's train split, so a small task gets a small
    share of the updates. ``equal``: every member as many batches as the largest has, the
    smaller ones drawing again from their (balanced) samplers.
    """
    _check_sampling(sampling)
    if sampling == "equal":
        return [max(loader_batches)] * len(loader_batches)
    return list(loader_batches)


def _next_batch(iterators: list[Any], loaders: Sequence[Any], k: int) -> Any:
    """The next batch of member ``k``, starting a new pass when its loader runs out."""
    try:
        return next(iterators[k])
    except StopIteration:
        iterators[k] = iter(loaders[k])
        return next(iterators[k])


def task_schedule(batches: Sequence[int], seed: int, epoch: int) -> list[int]:
    """The task id of every batch of one epoch: ``batches[k]`` times ``k``, shuffled.

    Drawn from its own generator seeded by (seed, epoch), so a resumed run redraws the same
    schedule and the samplers' random streams stay those of a single-task run.
    """
    ids = torch.cat([torch.full((n,), k) for k, n in enumerate(batches)])
    if len(batches) == 1:
        return ids.tolist()
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return ids[torch.randperm(len(ids), generator=g)].tolist()


@dataclass
class _Member:
    """A task's training pieces: loader, criterion, mixing, validation."""

    data: TaskData
    loader: torch.utils.data.DataLoader
    criterion: nn.Module
    mix: Any
    val_loader: torch.utils.data.DataLoader
    y_val: np.ndarray
    train_labels: np.ndarray


def _member(
    data: TaskData,
    config: TrainConfig,
    runtime: Runtime,
    pre: Preprocess,
    generator: torch.Generator,
    log: Log,
) -> _Member:
    n = len(data.class_names)
    cw = (
        None
        if data.class_weight is None
        else torch.as_tensor(data.class_weight, dtype=torch.float32)
    )
    criterion = build_loss(config, n, cw).to(runtime.device)
    cache = DecodedCache(data.cache_root, config.img_size, pre.interpolation)
    manifest = data.manifest
    decoded = cache.ensure(
        [str(data.task_dir / r) for r in manifest["relpath"]], manifest["content_hash"].tolist()
    )
    log(
        f"{data.name}: decoded {decoded} new images into the cache "
        f"({len(manifest) - decoded} cached)"
    )
    train_rows = manifest[manifest["split"] == "train"].reset_index(drop=True)
    val_rows = manifest[manifest["split"] == "val"].reset_index(drop=True)
    train_ds = CachedImageDataset(
        cache, train_rows["content_hash"], train_rows["label"], randaugment(config)
    )
    val_ds = CachedImageDataset(cache, val_rows["content_hash"], val_rows["label"])
    weights = None
    if config.balanced_sampling and data.sample_weights is not None:
        merged = train_rows[["relpath"]].merge(data.sample_weights, on="relpath", how="left")
        weights = merged["weight"].fillna(1.0).to_numpy()
    if data.sampling.adaptive and weights is None:
        weights = np.ones(len(train_rows))  # a weighted sampler whose weights can be re-set
    return _Member(
        data=data,
        loader=train_loader(train_ds, weights, config, runtime, generator),
        criterion=criterion,
        mix=mixup(config, n),
        val_loader=inference_loader(val_ds, config.batch_size * 2, runtime),
        y_val=val_rows["label"].to_numpy(),
        train_labels=train_rows["label"].to_numpy(),
    )


def _validate(eval_model: MultiHeadNet, m: _Member, k: int, normalize: Normalize, runtime: Runtime):
    logits = predict_logits(_HeadView(eval_model, k), m.val_loader, normalize, runtime)
    cm = confusion(m.y_val, logits.argmax(1), len(m.data.class_names))
    metrics = summary_metrics(cm)
    metrics["val_loss"] = cross_entropy(logits, m.y_val)
    return metrics, cm


def _reset_draws(m: _Member, cm: np.ndarray, log: Log) -> list[float]:
    """Adaptive balancing: new per-class shares from this epoch's validation confusion."""
    s = m.data.sampling
    shares = class_shares(per_class_metric(cm, s.adaptive_metric), s)
    m.loader.sampler.weights = torch.as_tensor(
        draw_weights(m.train_labels, shares), dtype=torch.double
    )
    listed = ", ".join(f"{c} {v:.3f}" for c, v in zip(m.data.class_names, shares, strict=True))
    log(f"{m.data.name}: adaptive balancing from val {s.adaptive_metric}: class shares {listed}")
    return shares.tolist()


def train_multitask(
    tasks: Sequence[TaskData],
    config: TrainConfig,
    runtime: Runtime,
    log: Log = print,
    checkpoint: Checkpoint | None = None,
    freeze_backbone_at: int | None = None,
    task_sampling: str = "equal",
    batch_mixing: str = "mixed",
) -> MultiTaskResult:
    """Train one backbone with a head per task; select the epoch on the mean monitor.

    ``freeze_backbone_at`` (1-based epoch): from then on only the heads train (MTMC-Pytorch
    freezes its backbone late). ``config.freeze_epochs`` still freezes the first epochs.
    ``batch_mixing``: ``mixed``, every step's batch holds a part of every member (sized by
    :func:`part_sizes`), so that batch norm sees in training the mix of images its running
    statistics hold at inference; ``interleaved``, one member per batch, in an order of task
    ids shuffled from the seed and the epoch (MTMC-Pytorch's schedule; each member's number
    of batches by :func:`task_batches`). ``task_sampling``: each member's share of either.
    """
    if not tasks:
        raise ValueError("a shared backbone needs at least one task")
    if batch_mixing not in BATCH_MIXING:
        raise ValueError(f"batch_mixing = {batch_mixing!r}: expected one of {BATCH_MIXING}")
    seed_everything(config.seed)
    net = create_multihead(config.model, [len(t.class_names) for t in tasks], config, log)
    pre = Preprocess.for_model(net.backbone, config.img_size)
    net = net.to(runtime.device)
    if runtime.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if runtime.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    _check_input_size(net, config, runtime.device)
    parameters = sum(p.numel() for p in net.parameters())

    generator = torch.Generator().manual_seed(config.seed)
    mixed = batch_mixing == "mixed"
    if mixed:
        train_sizes = [int((t.manifest["split"] == "train").sum()) for t in tasks]
        sizes = part_sizes(train_sizes, config.batch_size, task_sampling)
    else:
        sizes = [config.batch_size] * len(tasks)
    members = [
        _member(t, config.model_copy(update={"batch_size": b}), runtime, pre, generator, log)
        for t, b in zip(tasks, sizes, strict=True)
    ]
    normalize = Normalize(pre, runtime.device, runtime.channels_last)
    augment = (
        BatchAugment(AugmentSettings(hflip=config.hflip), generator) if config.augment else None
    )
    if mixed:  # the longest member sets the epoch; the others draw again
        steps_per_epoch = max(len(m.loader) for m in members)
    else:
        batches = task_batches([len(m.loader) for m in members], task_sampling)
        steps_per_epoch = sum(batches)
    optimizer = build_optimizer(net, config)
    schedule = build_schedule(optimizer, config, steps_per_epoch)
    stepper = _Stepper(net, optimizer, config, runtime)
    ema = ModelEmaV3(net, decay=config.ema_decay, use_warmup=True) if config.ema else None
    eval_model = ema.module if ema is not None else net
    criteria = nn.ModuleList([m.criterion for m in members])
    parts = _Parts(net, optimizer, schedule, stepper, criteria, ema, generator, runtime.device)

    history: list[dict[str, Any]] = []
    best_value, best_epoch, best_state = -np.inf, -1, None
    best_metrics: dict[str, dict[str, float]] = {}
    start_epoch, updates = 0, 0
    end_epoch, plan = config.epochs, ""
    planner = None
    budget = None  # seconds
    if isinstance(config.time_budget_minutes, float):  # "auto" with epochs set means none
        budget = config.time_budget_minutes * 60
        planner = EpochPlanner(
            budget,
            config.epochs,
            steps_per_epoch,
            sum(sizes) if mixed else config.batch_size,
            sum(len(m.y_val) for m in members),
        )
    saved = resume(parts, checkpoint, config, log)
    if saved is not None:
        start_epoch, updates, history = saved["epoch"], saved["updates"], saved["history"]
        best_value, best_epoch = saved["best_value"], saved["best_epoch"]
        best_metrics, best_state = saved["best_metrics"], saved["best_state"]
        end_epoch, plan, planner = saved["epochs_planned"], saved["plan"], None
        for m, w in zip(members, saved["draw_weights"], strict=True):
            if w is not None:
                m.loader.sampler.weights = w

    if history and _stalled(_epoch_rows(history), best_epoch, config):
        end_epoch = start_epoch  # the killed run had already stopped early
    for epoch in itertools.count(start_epoch):
        if epoch >= end_epoch:  # the time budget may lower end_epoch during the first epoch
            break
        early = epoch < config.freeze_epochs
        frozen = early or (freeze_backbone_at is not None and epoch + 1 >= freeze_backbone_at)
        _train_mode(net, freeze_backbone=frozen)
        t0 = time.perf_counter()
        loss_sums = [torch.zeros((), device=runtime.device) for _ in members]
        counts = [0] * len(members)
        norm_sum = torch.zeros((), device=runtime.device)
        lr = optimizer.param_groups[0]["lr"]
        loaders = [m.loader for m in members]
        iterators = [iter(loader) for loader in loaders]
        steps = (
            [list(range(len(members)))] * steps_per_epoch
            if mixed
            else [[k] for k in task_schedule(batches, config.seed, epoch)]
        )
        if planner is not None:
            planner.begin()
        for ks in steps:
            drawn = [_next_batch(iterators, loaders, k) for k in ks]
            ys = [y.to(runtime.device, non_blocking=True) for _, y in drawn]
            n = [len(y) for y in ys]
            x = normalize.to_device(
                torch.cat([x for x, _ in drawn]) if len(ks) > 1 else drawn[0][0]
            )
            if augment is not None:
                x = augment(x)
            targets = ys
            if any(members[k].mix is not None for k in ks):  # mixup/cutmix within each part
                mixups = [
                    members[k].mix(xk, y) if members[k].mix is not None else (xk, y)
                    for k, xk, y in zip(ks, x.split(n), ys, strict=True)
                ]
                x = torch.cat([xk for xk, _ in mixups])
                targets = [target for _, target in mixups]
            with runtime.autocast():
                logits = net.forward_parts(normalize(x), ks, n)
                losses = [
                    members[k].criterion(out, target)
                    for k, out, target in zip(ks, logits, targets, strict=True)
                ]
            # every image's loss counts alike, times its task's weight
            loss = sum(
                members[k].data.loss_weight * (nk / sum(n)) * part
                for k, nk, part in zip(ks, n, losses, strict=True)
            )
            lr = optimizer.param_groups[0]["lr"]
            norm_sum += stepper(loss).detach()
            updates += 1
            schedule.step_update(updates)
            if ema is not None:
                ema.update(net, step=updates)
            if planner is not None and (planned := planner.step_done()) is not None:
                end_epoch, plan = planned, planner.describe(planned)
                schedule = parts.schedule = relaid(
                    schedule, optimizer, config, end_epoch, steps_per_epoch, updates
                )
                log(plan)
                planner = None
            for k, nk, part in zip(ks, n, losses, strict=True):
                loss_sums[k] += part.detach() * nk
                counts[k] += nk
        if runtime.device.type == "cuda":
            torch.cuda.synchronize(runtime.device)
        train_seconds = time.perf_counter() - t0
        results = [_validate(eval_model, m, k, normalize, runtime) for k, m in enumerate(members)]
        value = float(np.mean([_monitor_value(r[0], config.monitor) for r in results]))
        resets = [
            _reset_draws(m, cm, log)
            if m.data.sampling.adaptive and (epoch + 1) % m.data.sampling.adaptive_period == 0
            else None
            for m, (_, cm) in zip(members, results, strict=True)
        ]
        seconds = time.perf_counter() - t0
        images = sum(counts)
        for k, m in enumerate(members):
            metrics = results[k][0]
            history.append(
                {
                    "epoch": epoch,
                    "task": m.data.name,
                    "train_loss": loss_sums[k].item() / max(counts[k], 1),
                    "val_loss": metrics["val_loss"],
                    "val_accuracy": metrics["accuracy"],
                    "val_macro_f1": metrics["macro_f1"],
                    "val_balanced_accuracy": metrics["balanced_accuracy"],
                    "lr": lr,
                    "grad_norm": norm_sum.item() / max(len(steps), 1),
                    "frozen": frozen,
                    "early_frozen": early,
                    "images": counts[k],
                    "step_seconds": train_seconds,
                    "images_per_second": images / train_seconds if train_seconds > 0 else 0.0,
                    "seconds": seconds,
                    "monitor_mean": value,
                    "class_shares": resets[k],
                }
            )
        schedule.step(epoch + 1, value)
        if budget is not None:
            epoch_seconds = [h["seconds"] for h in history if h["task"] == members[0].data.name]
            fitted = refit_epochs(budget, config.epochs, epoch_seconds)
            if fitted != end_epoch:
                end_epoch, plan = fitted, describe_refit(budget, epoch_seconds, fitted)
                log(plan)
                schedule = parts.schedule = relaid(
                    schedule, optimizer, config, end_epoch, steps_per_epoch, updates
                )
        improved = value > best_value
        if improved:
            best_value, best_epoch = value, epoch
            best_metrics = {m.data.name: r[0] for m, r in zip(members, results, strict=True)}
            best_state = _cpu_copy(eval_model)
        if checkpoint is not None:
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
                    "draw_weights": [
                        m.loader.sampler.weights if m.data.sampling.adaptive else None
                        for m in members
                    ],
                }
            )
        log(
            f"epoch {epoch + 1}/{end_epoch}{' (frozen backbone)' if frozen else ''}: "
            + "; ".join(
                f"{m.data.name} val_acc {r[0]['accuracy']:.4f}"
                for m, r in zip(members, results, strict=True)
            )
            + f"; mean {config.monitor} {value:.4f}{' *' if improved else ''}"
        )
        if _stalled(_epoch_rows(history), best_epoch, config):
            log(
                f"early stop: no gain in mean {config.monitor} or val_loss for {config.patience} "
                "epochs"
            )
            break
    if best_state is not None:
        eval_model.load_state_dict(best_state)
    eval_model.eval()
    frame = pd.DataFrame(history)
    per_epoch = frame.drop_duplicates("epoch")
    step_seconds = per_epoch["step_seconds"].sum()
    return MultiTaskResult(
        model=eval_model,
        preprocess=pre,
        history=frame,
        best_epoch=best_epoch,
        best_metrics=best_metrics,
        seconds=float(per_epoch["seconds"].sum()),
        images_per_second=float(frame["images"].sum() / step_seconds) if step_seconds > 0 else 0.0,
        parameters=parameters,
        resumed_at_epoch=start_epoch if saved is not None else None,
        epochs_planned=end_epoch,
        plan=plan,
    )


def _epoch_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What ``train._stalled`` reads, one row per epoch: the mean of the members' val losses;
    early stopping never waits out the first frozen epochs, and the late freeze does not hold
    it off."""
    frame = pd.DataFrame(history).groupby("epoch", sort=True)
    losses, frozen = frame["val_loss"].mean(), frame["early_frozen"].first()
    return [
        {"epoch": int(e), "val_loss": float(losses[e]), "frozen": bool(frozen[e])}
        for e in losses.index
    ]


def train_as_group_of_one(
    task: TaskData,
    config: TrainConfig,
    runtime: Runtime,
    log: Log = print,
    checkpoint: Checkpoint | None = None,
) -> TrainResult:
    """A plain task trained by the multi-task loop (for ``sampling.adaptive``, which lives
    there), returned as :func:`~mtmc_pipeline.training.train.train_model` returns it."""
    result = train_multitask([task], config, runtime, log, checkpoint)
    return TrainResult(
        model=task_model(result.model, 0, config.model, config.img_size),
        preprocess=result.preprocess,
        history=task_history(result.history, task.name),
        best_epoch=result.best_epoch,
        best_metrics=result.best_metrics.get(task.name, {}),
        seconds=result.seconds,
        images_per_second=result.images_per_second,
        parameters=result.parameters,
        resumed_at_epoch=result.resumed_at_epoch,
        epochs_planned=result.epochs_planned,
        plan=result.plan,
    )


def task_history(history: pd.DataFrame, task: str) -> pd.DataFrame:
    """One member's rows of the joint history, as a per-task bundle's ``history.parquet``."""
    rows = history[history["task"] == task].drop(columns=["task"])
    return rows.reset_index(drop=True)
