"""The automatic training recipe: every ``auto`` setting resolved from the data and the machine.

:func:`resolve_recipe` is a pure function of the task's settings, a :class:`DataProfile`, a
:class:`DeviceProfile` and a probe that says where pretrained weights for a model can be
found, so the same inputs always give the same recipe. Explicit settings are never changed.
Each resolved value comes with the reason it was picked; the model stage records them in
``model.json``, the run log and the UI, and fingerprints the resolved settings: another device
class, other image sizes or weights that became reachable re-resolve the recipe and retrain.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from mtmc_pipeline.config import AUTO, TrainConfig
from mtmc_pipeline.runtime import Runtime  # a type only: this module imports no torch

SMALL_SIDE = 64
"""Images up to about this many pixels train at their own size on a resolution-keeping stem;
on a CPU, larger images trained from scratch are resized to it (more epochs fit the budget)."""
CPU_BUDGET_MINUTES_PER_IMAGE = 7.5 / 12_000
"""Under auto on a CPU: 7.5 minutes of training for 12,000 images (about 8 with decoding and
validation), proportionally less for fewer: two such tasks fit in 18 minutes of pipeline."""
MIN_BUDGET_MINUTES = 0.75
"""The CPU floor: a few hundred images make few updates per epoch, and need more epochs. The
demo's 471-image texture task reached 0.63-0.84 validation accuracy in the 16-23 epochs of
30 s, 0.865-0.901 in the 33-40 of 45 s."""
MAX_EPOCHS = 40
"""Upper bound on epochs under auto; the time budget usually stops before it. A task of a few
hundred images at the CPU floor fits more, to no gain: the demo's 232-image multi-label task
had reached its best validation mAP by epoch 38 of 58."""
CPU_MODELS = ("resnet18", "resnet10t")
"""Larger images on a CPU: the model to fine-tune when its weights are found, and the one to
train from scratch when ``img_size`` is set above the small models' range and none are."""
GPU_MODELS = ("resnet50", "resnet26d")
SMALL_IMAGE_MODELS = ("small_resnet_s1", "small_resnet_s2")
"""This project's models for small images (``training/small_models.py``): no weights are
published for them, so ``pretrained: auto`` does not look (nor import timm to ask)."""
SGD_MAX_SIDE = 80
"""Under auto, from-scratch training up to this size (the small-image models' range) uses SGD."""
SGD_MAX_LR = 0.4
"""SGD's learning rate is not scaled past this for large (GPU) batches."""
SGD_WEIGHT_DECAY = 5e-3
"""From scratch in short budgets, 5e-3 beat SGD's usual 5e-4 on the demo's texture task."""
ADAMW_WEIGHT_DECAY = 0.05
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})

WeightsProbe = Callable[[str], str | None]
"""Model name -> a local weights file to start from, or None when none can be reached."""


@dataclass(frozen=True)
class DataProfile:
    """What the recipe needs to know about the training images."""

    median_side: int  # median over train images of the shorter side, in pixels
    grey: bool  # most train images are single-channel
    num_classes: int
    train_images: int
    min_per_class: int  # train images of the rarest class

    @classmethod
    def from_manifests(
        cls, integrity: pd.DataFrame, splits: pd.DataFrame, num_classes: int
    ) -> DataProfile:
        """From integrity's width, height and mode, for the train rows of the split manifest
        (multi-label manifests count an image once for each of its labels per class)."""
        train = splits[splits["split"] == "train"]
        rows = integrity.merge(train[["relpath"]], on="relpath", how="inner")
        sides = rows[["width", "height"]].min(axis=1).dropna()
        labels = train["labels"].explode() if "labels" in train.columns else train["label"]
        per_class = labels.value_counts()
        return cls(
            median_side=int(sides.median()) if len(sides) else 224,
            grey=bool(len(rows)) and rows["mode"].isin(GREY_MODES).mean() >= 0.5,
            num_classes=num_classes,
            train_images=len(train),
            min_per_class=int(per_class.min()) if len(per_class) else 0,
        )

    @classmethod
    def combined(cls, profiles: list[DataProfile]) -> DataProfile:
        """The profile of several tasks trained together (a shared backbone): their images
        pooled, the side of the member with the largest images (so that no member trains
        below the size it would get alone), the most classes any head has, the rarest class
        of any task."""
        return cls(
            median_side=max(p.median_side for p in profiles),
            grey=all(p.grey for p in profiles),
            num_classes=max(p.num_classes for p in profiles),
            train_images=sum(p.train_images for p in profiles),
            min_per_class=min(p.min_per_class for p in profiles),
        )


def _cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def _nvidia_gpus() -> list[tuple[str, float]]:
    """(name, memory in GiB) of each GPU this process may use, as ``nvidia-smi`` lists them
    (in ``CUDA_VISIBLE_DEVICES`` order when that holds indices); none without the tool."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        name, _, mib = line.rpartition(",")
        try:
            gpus.append((name.strip(), round(float(mib) / 1024, 1)))
        except ValueError:
            continue
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        picked = [int(i) for i in visible.split(",") if i.strip().isdigit()]
        gpus = [gpus[i] for i in picked if i < len(gpus)]
    return gpus


@dataclass(frozen=True)
class DeviceProfile:
    """The device class the recipe is resolved for."""

    kind: str  # cpu, cuda or mps
    cpu_cores: int
    gpu_name: str | None = None
    gpu_memory_gb: float | None = None

    @classmethod
    def from_runtime(cls, runtime: Runtime) -> DeviceProfile:
        if runtime.device.type != "cuda":
            return cls(runtime.device.type, _cores())
        import torch

        props = torch.cuda.get_device_properties(runtime.device)
        return cls("cuda", _cores(), props.name, round(props.total_memory / 1024**3, 1))

    @classmethod
    def probe(cls, device: str) -> DeviceProfile:
        """The device class a ``device`` setting (auto, cpu, cuda, cuda:N, mps) trains on,
        found without importing torch (so that a stage which reuses its bundle never does):
        the GPUs ``nvidia-smi`` lists, else the CPU. ``auto`` picks CUDA when present, as
        :func:`~mtmc_pipeline.runtime.resolve_runtime` does."""
        if device in ("cpu", "mps"):
            return cls(device, _cores())
        gpus = _nvidia_gpus()
        index = int(device.partition(":")[2] or 0) if device.startswith("cuda") else 0
        if index < len(gpus):
            name, memory_gb = gpus[index]
            return cls("cuda", _cores(), name, memory_gb)
        if device.startswith("cuda"):  # a GPU nvidia-smi does not show: ask torch
            from mtmc_pipeline.runtime import resolve_runtime

            return cls.from_runtime(resolve_runtime(device))
        return cls("cpu", _cores())

    def describe(self) -> str:
        if self.kind == "cuda":
            return f"{self.gpu_name} ({self.gpu_memory_gb:g} GiB)"
        return f"{self.kind} with {self.cpu_cores} core(s)"


@dataclass(frozen=True)
class Recipe:
    """The resolved settings and, for each setting that was ``auto``, why it has its value."""

    config: TrainConfig
    reasons: Mapping[str, str]
    data: DataProfile
    device: DeviceProfile

    def as_json(self) -> dict[str, dict[str, Any]]:
        """``{setting: {"value": ..., "reason": ...}}`` for model.json and the UI."""
        return {
            k: {"value": getattr(self.config, k), "reason": why} for k, why in self.reasons.items()
        }

    def lines(self) -> list[str]:
        return [f"{k} = {getattr(self.config, k)}: {why}" for k, why in self.reasons.items()]


def _img_size(data: DataProfile, device: DeviceProfile, from_scratch: bool) -> tuple[int, str]:
    """``from_scratch``: on a CPU, no weights to start from, and the model left to auto."""
    side = data.median_side
    if side <= SMALL_SIDE:
        size = max(16, side - side % 4)
        colour = "grey" if data.grey else "colour"
        return size, (
            f"median image side {side} px ({colour}): small images keep their size (halving "
            "loses their finest detail)"
        )
    if from_scratch:
        return SMALL_SIDE, (
            f"median image side {side} px on a CPU with no pretrained weights: {SMALL_SIDE} px, "
            "where training from scratch fits about 4x the epochs of 128 px in the same budget"
        )
    cap = 224 if device.kind == "cuda" else 128
    size = max(SMALL_SIDE, min(side, cap) // 32 * 32)
    where = "on a GPU" if device.kind == "cuda" else "on a CPU, to keep epochs short"
    return size, f"median image side {side} px, at most {cap} px {where}"


def _model(
    img_size: int, device: DeviceProfile, weights: WeightsProbe
) -> tuple[str, str | None, str]:
    """(model, weights file or None, reason)."""
    if img_size <= 40:
        return (
            SMALL_IMAGE_MODELS[0],
            None,
            (
                f"{img_size} px: a ResNet whose stride-1 stem and missing max-pool keep the "
                "resolution (an ImageNet stem would shrink the image to 1x1)"
            ),
        )
    if img_size <= 80:
        return (
            SMALL_IMAGE_MODELS[1],
            None,
            (
                f"{img_size} px: a ResNet with a stride-2 stem and no max-pool, so its first stage "
                "sees a 32-px map"
            ),
        )
    on_gpu = device.kind == "cuda"
    preferred, fallback = GPU_MODELS if on_gpu else CPU_MODELS
    found = weights(preferred)
    if found:
        return preferred, found, f"{img_size} px on {device.describe()}: pretrained weights found"
    return (
        fallback,
        None,
        (
            f"{img_size} px on {device.describe()}: no pretrained {preferred} weights reachable, "
            f"so a network that trains well from scratch"
        ),
    )


def _batch_size(img_size: int, data: DataProfile, device: DeviceProfile) -> tuple[int, str]:
    if device.kind == "cuda":
        memory = device.gpu_memory_gb or 8
        size = 256 if img_size <= 64 else 128 if img_size <= 160 else 64
        size = size * 2 if memory >= 40 else size
        why = f"{img_size} px on {memory:g} GiB of GPU memory"
    else:
        size = 32 if data.train_images < 1000 else 64
        why = "CPU: small batches give more updates for the same compute"
    # at least ~8 updates per epoch, so small data sets still get a schedule
    size = max(8, min(size, 2 ** int(math.log2(max(data.train_images // 8, 2)))))
    return size, (
        f"{why}; {data.train_images} train images, {data.min_per_class} in the rarest class"
    )


def _budget(data: DataProfile, device: DeviceProfile) -> tuple[float | str, str]:
    if device.kind == "cpu":
        minutes = max(MIN_BUDGET_MINUTES, data.train_images * CPU_BUDGET_MINUTES_PER_IMAGE)
        return round(minutes, 2), (
            f"{data.train_images} train images on {device.describe()}: "
            f"7.5 minutes per 12,000 images, at least {MIN_BUDGET_MINUTES:g}"
        )
    minutes = max(2.0, data.train_images / 1000)
    return round(minutes, 2), f"{data.train_images} train images on a GPU: 1 minute per 1,000"


def _lr(optimizer: str, pretrained: bool, batch_size: int) -> tuple[float, str]:
    """The peak learning rate: a base at a reference batch, scaled by sqrt(batch / reference)."""
    start = "fine-tuning" if pretrained else "from scratch"
    if optimizer == "sgd":
        base, reference = (0.02 if pretrained else 0.2), 32
        lr = min(SGD_MAX_LR, base * math.sqrt(batch_size / reference))
        cap = f", at most {SGD_MAX_LR:g}"
    else:
        base, reference = (1e-3 if pretrained else 8e-3), 64
        lr, cap = base * math.sqrt(batch_size / reference), ""
    return round(lr, 6), (
        f"{optimizer} {start}: {base:g} at batch {reference}, scaled by "
        f"sqrt(batch / {reference}){cap}"
    )


def _no_weights(model: str) -> None:
    return None


def resolve_recipe(
    config: TrainConfig,
    data: DataProfile,
    device: DeviceProfile,
    weights: WeightsProbe,
) -> Recipe:
    """Resolve every ``auto`` setting of ``config``; explicit settings are kept as they are."""
    values: dict[str, Any] = {}
    reasons: dict[str, str] = {}

    def pick(name: str, value: Any, reason: str) -> None:
        values[name], reasons[name] = value, reason

    weights = _no_weights if config.pretrained is False else functools.cache(weights)
    img_size = config.img_size
    if img_size == AUTO:
        from_scratch = (  # on a CPU, larger images with no weights to start from
            device.kind == "cpu"
            and data.median_side > SMALL_SIDE
            and config.model == AUTO
            and config.pretrained is not True
            and not config.pretrained_path
            and not weights(CPU_MODELS[0])
        )
        img_size, why = _img_size(data, device, from_scratch)
        pick("img_size", img_size, why)
    model = config.model
    found: str | None = None
    if model == AUTO:
        model, found, why = _model(img_size, device, weights)
        pick("model", model, why)
    if config.pretrained == AUTO:
        if config.pretrained_path:
            pick("pretrained", True, f"weights from train.pretrained_path {config.pretrained_path}")
        elif model in SMALL_IMAGE_MODELS:
            pick("pretrained", False, f"{model} has no published weights: from scratch")
        else:
            found = found or weights(model)
            if found:
                pick("pretrained", True, f"weights for {model} found at {found}")
                values["pretrained_path"] = found
            else:
                pick("pretrained", False, f"no weights for {model} reachable: from scratch")
    pretrained = values.get("pretrained", config.pretrained) or bool(config.pretrained_path)
    if config.batch_size == AUTO:
        pick("batch_size", *_batch_size(img_size, data, device))
    batch_size = values.get("batch_size", config.batch_size)
    if config.optimizer == AUTO:
        if pretrained:
            pick("optimizer", "adamw", "fine-tuning pretrained weights: AdamW")
        elif img_size <= SGD_MAX_SIDE:
            pick(
                "optimizer",
                "sgd",
                f"{img_size} px from scratch: SGD with Nesterov momentum, which learnt faster "
                "than AdamW on small images in short budgets",
            )
        else:
            pick(
                "optimizer",
                "adamw",
                f"{img_size} px from scratch: AdamW (in the few epochs a budget fits at this "
                "size, SGD learnt slower)",
            )
    optimizer = values.get("optimizer", config.optimizer)
    if config.lr == AUTO:
        pick("lr", *_lr(optimizer, pretrained, batch_size))
    if config.weight_decay == AUTO:
        decay = SGD_WEIGHT_DECAY if optimizer == "sgd" else ADAMW_WEIGHT_DECAY
        pick("weight_decay", decay, f"{optimizer}: {decay:g} (none on norm layers and biases)")
    if config.epochs == AUTO:
        pick("epochs", MAX_EPOCHS, "the most epochs under auto; the time budget picks fewer")
    if config.time_budget_minutes == AUTO:
        if config.epochs != AUTO:
            pick("time_budget_minutes", "none", "epochs was set: train for that many")
        else:
            pick("time_budget_minutes", *_budget(data, device))
    return Recipe(config.model_copy(update=values), reasons, data, device)
