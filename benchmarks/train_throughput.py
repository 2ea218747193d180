"""Training throughput: the pipeline's training loop against a bare timm + PyTorch loop.

Both train the same timm model with the same batch size, optimizer and learning rate on the
same decoded images held in memory (scikit-learn's digits, resized to ``--img-size``):

- pipeline: :func:`mtmc_pipeline.training.train.train_model` with the given recipe (its loader,
  sampler, on-device augmentation, schedule, gradient-norm tracking, AMP), images/s of its training
  phase as recorded in its history (validation excluded);
- bare: a loop a practitioner would write: shuffle indices, slice the uint8 tensor, normalise,
  forward, backward, AdamW step. No augmentation.

Rounds alternate the two so drifting machine load hits both alike. Load from other processes
only ever slows an epoch down, so besides the median the script compares the fastest epoch of
each side, which is the steadier figure on a shared machine.

    .venv/bin/python benchmarks/train_throughput.py                      # CPU, resnet10t, 32 px
    .venv/bin/python benchmarks/train_throughput.py --no-augment         # loop overhead only
    .venv/bin/python benchmarks/train_throughput.py --device cuda --precision bf16 \\
        --model resnet50 --img-size 224 --batch-size 128 --synthetic    # GPU: loader vs synthetic
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
from mtmc_pipeline.demo import write_digits
from mtmc_pipeline.runtime import Runtime, resolve_runtime
from mtmc_pipeline.training.loader import CachedImageDataset, DecodedCache, Normalize
from mtmc_pipeline.training.models import Preprocess
from mtmc_pipeline.training.train import train_model


def digits_manifest(root: Path, train_images: int) -> tuple[pd.DataFrame, list[str]]:
    """The digits as PNG files and a split manifest the pipeline can read: ``train_images``
    for training, 100 for validation, the rest unused."""
    write_digits(root)
    rows = []
    paths = sorted(root.glob("*/*.png"), key=lambda p: (p.stem, p.parent.name))  # mixed classes
    for i, path in enumerate(paths):
        label = int(path.parent.name)
        rows.append(
            {
                "relpath": path.relative_to(root).as_posix(),
                "class_name": path.parent.name,
                "label": label,
                "split": "val" if i < 100 else "train" if i < 100 + train_images else "test",
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
    synthetic: bool = False,
) -> list[float]:
    """Images/s of each epoch of a plain timm + PyTorch loop over in-memory uint8 images, or
    (``synthetic``) over one batch kept on the device: the compute ceiling."""
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
            if synthetic and i == 0:
                x, y = normalize(images[idx].to(runtime.device)), labels[idx].to(runtime.device)
            elif not synthetic:
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
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per loop and round")
    parser.add_argument("--train-images", type=int, default=640)
    parser.add_argument("--no-augment", action="store_true", help="pipeline without augmentation")
    parser.add_argument(
        "--synthetic", action="store_true", help="bare loop on one batch kept on the device"
    )
    args = parser.parse_args()

    runtime = resolve_runtime(args.device, args.precision, args.channels_last)
    config = TrainConfig(
        model=args.model,
        img_size=args.img_size,
        pretrained=False,
        batch_size=args.batch_size,
        epochs=args.epochs,
        patience=args.epochs,
        optimizer="adamw",
        lr=0.005,
        weight_decay=0.05,
        hflip=False,
        augment=not args.no_augment,
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest, classes = digits_manifest(root / "digits", args.train_images)
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
        pipe_rates: list[float] = []
        bare_rates: list[float] = []
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
            pipe = result.history["images_per_second"].tolist()
            bare = bare_epochs(
                data.images, data.labels, config, runtime, pre, args.epochs, args.synthetic
            )
            pipe_rates += pipe
            bare_rates += bare
            print(
                f"round {r + 1}: pipeline {statistics.median(pipe):8.1f} img/s   "
                f"bare {statistics.median(bare):8.1f} img/s   (median epoch)"
            )
        best, median = (
            max(pipe_rates) / max(bare_rates),
            (statistics.median(pipe_rates) / statistics.median(bare_rates)),
        )
        print(
            f"pipeline / bare: fastest epoch {max(pipe_rates):.1f} / {max(bare_rates):.1f} img/s "
            f"= {best:.3f}; median epoch {median:.3f}; "
            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        )


if __name__ == "__main__":
    main()
