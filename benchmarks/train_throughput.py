"""Training throughput: the pipeline's training loop against a bare timm + PyTorch loop.

Both train the same timm model with the same batch size, optimizer and learning rate on the
same decoded images held in memory (scikit-learn's digits, resized to ``--img-size``):

- pipeline: :func:`mtmc_pipeline.train.train_model` with the given recipe (its loader, sampler,
  on-device augmentation, schedule, gradient-norm tracking, AMP), images/s of its training
  phase as recorded in its history (validation excluded);
- bare: a loop a practitioner would write: shuffle indices, slice the uint8 tensor, normalise,
  forward, backward, AdamW step. No augmentation.

Rounds alternate the two so drifting machine load hits both alike; the ratio is per round.

    .venv/bin/python benchmarks/train_throughput.py                      # CPU, resnet10t, 32 px
    .venv/bin/python benchmarks/train_throughput.py --no-augment         # loop overhead only
    .venv/bin/python benchmarks/train_throughput.py --device cuda --precision bf16 \\
        --model resnet50 --img-size 224 --batch-size 128                # on a GPU
"""

from __future__ import annotations

# isort: off
import mtmc_pipeline  # noqa: F401  first: it sets OpenMP's wait policy before torch loads
# isort: on

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

from mtmc_pipeline.config import TrainConfig
from mtmc_pipeline.data import CachedImageDataset, DecodedCache, Normalize
from mtmc_pipeline.demo import write_digits
from mtmc_pipeline.models import Preprocess
from mtmc_pipeline.runtime import Runtime, resolve_runtime
from mtmc_pipeline.train import train_model


def digits_manifest(root: Path) -> tuple[pd.DataFrame, list[str]]:
    """The digits as PNG files and a split manifest (90 % train) the pipeline can read."""
    write_digits(root)
    rows = []
    for i, path in enumerate(sorted(root.glob("*/*.png"))):
        label = int(path.parent.name)
        rows.append(
            {
                "relpath": path.relative_to(root).as_posix(),
                "class_name": path.parent.name,
                "label": label,
                "split": "val" if i % 10 == 0 else "train",
                "content_hash": hashlib.sha256(path.read_bytes()).hexdigest(),
            }
        )
    return pd.DataFrame(rows), [str(c) for c in range(10)]


def bare_epochs(
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    runtime: Runtime,
    pre: Preprocess,
    epochs: int,
) -> list[float]:
    """Images/s of each epoch of a plain timm + PyTorch loop over in-memory uint8 images."""
    model = timm.create_model(config.model, num_classes=10).to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(
        model, opt="adamw", lr=config.lr, weight_decay=config.weight_decay
    )
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16)
    normalize = Normalize(pre, runtime.device, runtime.channels_last)
    model.train()
    rates = []
    n = len(images) - len(images) % config.batch_size
    for _ in range(epochs):
        order = torch.randperm(len(images))[:n]
        start = time.perf_counter()
        for i in range(0, n, config.batch_size):
            idx = order[i : i + config.batch_size]
            x = normalize(images[idx].to(runtime.device, non_blocking=True))
            y = labels[idx].to(runtime.device, non_blocking=True)
            with runtime.autocast():
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        loss.item()  # wait for the device
        rates.append(n / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=1, help="epochs per loop and round")
    parser.add_argument("--no-augment", action="store_true", help="pipeline without augmentation")
    args = parser.parse_args()

    runtime = resolve_runtime(args.device, args.precision, args.channels_last)
    config = TrainConfig(
        model=args.model,
        img_size=args.img_size,
        pretrained=False,
        batch_size=args.batch_size,
        epochs=args.epochs,
        patience=args.epochs,
        lr=0.005,
        hflip=False,
        augment=not args.no_augment,
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest, classes = digits_manifest(root / "digits")
        weights = manifest[manifest["split"] == "train"][["relpath", "label"]].assign(weight=1.0)
        train = manifest[manifest["split"] == "train"]
        probe = timm.create_model(args.model, num_classes=10)
        pre = Preprocess.for_model(probe, args.img_size)
        cache = DecodedCache(root / "cache", args.img_size, pre.interpolation)
        cache.ensure(
            [str(root / "digits" / r) for r in manifest["relpath"]], manifest["content_hash"]
        )
        data = CachedImageDataset(cache, train["content_hash"], train["label"])
        assert data.images is not None, "the benchmark data must fit in memory"

        print(
            f"{args.model} @ {args.img_size}px, batch {args.batch_size}, {runtime.describe()}, "
            f"{len(train)} train images, torch threads {torch.get_num_threads()}"
        )
        ratios = []
        for r in range(args.rounds):
            result = train_model(
                manifest,
                classes,
                weights,
                root / "digits",
                root / "cache",
                config,
                runtime,
                log=lambda _: None,
            )
            pipe = statistics.fmean(result.history["images_per_second"])
            bare = statistics.fmean(
                bare_epochs(data.images, data.labels, config, runtime, pre, args.epochs)
            )
            ratios.append(pipe / bare)
            print(
                f"round {r + 1}: pipeline {pipe:8.1f} img/s   bare {bare:8.1f} img/s   "
                f"ratio {pipe / bare:.3f}"
            )
        print(
            f"ratio pipeline / bare: median {statistics.median(ratios):.3f} "
            f"(min {min(ratios):.3f}, max {max(ratios):.3f}); "
            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        )


if __name__ == "__main__":
    main()
