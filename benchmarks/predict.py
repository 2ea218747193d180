"""Batch inference throughput of ``mtmc predict``: images/s end to end (decode, resize, model,
calibration) by batch size, and its two parts alone: decoding by number of threads, the model
by batch size, in the channels-last (NHWC) layout the pipeline infers in and, for comparison,
in PyTorch's default NCHW layout.

Uses a task's real bundle and calibrator (``--artifacts A --task T``), or by default builds a
throwaway bundle of ``--model`` with random weights: speed does not depend on the weights.

    .venv/bin/python benchmarks/predict.py --images 256 --model mobilenetv3_large_100
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mtmc_pipeline.artifacts import write_json
from mtmc_pipeline.config import default_levels
from mtmc_pipeline.evaluation.calibrate import CALIBRATOR_FILE, Calibrator, threshold_table
from mtmc_pipeline.runtime import Runtime, resolve_runtime
from mtmc_pipeline.serving.predict import Predictor, decode_image
from mtmc_pipeline.training.loader import Normalize
from mtmc_pipeline.training.models import Preprocess, create_model, save_bundle


def write_images(folder: Path, n: int, side: int) -> list[Path]:
    """``n`` random-texture JPEGs of ``side`` x ``side`` (what a camera folder costs to decode)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        small = rng.integers(0, 255, (side // 8, side // 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((side, side), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        paths.append(folder / f"{i:05d}.jpg")
        paths[-1].write_bytes(buf.getvalue())
    return paths


def build_task(folder: Path, arch: str, img_size: int, classes: int) -> Path:
    """A model bundle and a calibrator laid out as the pipeline writes them."""
    names = [f"class_{i}" for i in range(classes)]
    model = create_model(arch, classes)
    pre = Preprocess.for_model(model, img_size)
    info = {
        "arch": arch,
        "class_names": names,
        "img_size": img_size,
        "mean": list(pre.mean),
        "std": list(pre.std),
        "interpolation": pre.interpolation,
        "fingerprint": "benchmark",
    }
    (folder / "model").mkdir(parents=True)
    save_bundle(folder / "model", model, info)
    rng = np.random.default_rng(1)
    labels = rng.integers(0, classes, 2000)
    logits = rng.normal(size=(2000, classes)) + 3.0 * np.eye(classes)[labels]
    table = threshold_table(logits, labels, names, default_levels())
    calibrator = Calibrator.from_table(table, names, 1.5, "benchmark")
    write_json(folder / "calibration" / CALIBRATOR_FILE, calibrator.to_json())
    return folder


def best_times(
    runs: dict[str, Callable[[], object]], rounds: int
) -> dict[str, tuple[float, float]]:
    """(wall, CPU) seconds of the fastest of ``rounds`` runs of each, taken in turn (A B C A B C
    ...) after one warm-up each, so drift in the machine's speed hits every run alike. CPU
    time (this process, all threads) is shown too: other processes on a shared machine stretch
    the wall time far more than they stretch it."""
    for fn in runs.values():
        fn()
    best = dict.fromkeys(runs, (float("inf"), float("inf")))
    for _ in range(rounds):
        for name, fn in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            took = (time.perf_counter() - wall, time.process_time() - cpu)
            best[name] = min(best[name], took)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", type=Path, help="artifact root of a materialized task")
    parser.add_argument("--task", help="the task under --artifacts to load")
    parser.add_argument("--model", default="mobilenetv3_large_100", help="timm model (no task)")
    parser.add_argument("--img-size", type=int, default=224, help="model input side (no task)")
    parser.add_argument("--classes", type=int, default=24, help="number of classes (no task)")
    parser.add_argument("--images", type=int, default=256, help="images per measurement")
    parser.add_argument("--side", type=int, default=512, help="side of the generated JPEGs")
    parser.add_argument("--batch-sizes", default="1,8,16,64")
    parser.add_argument("--threads", default="1,2,4", help="decode threads to compare")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the best is kept")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    runtime = resolve_runtime(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        if args.task:
            task_dir = args.artifacts / args.task
        else:
            task_dir = build_task(tmp_dir / "task", args.model, args.img_size, args.classes)
        paths = write_images(tmp_dir / "images", args.images, args.side)
        predictor = Predictor(task_dir, runtime)
        pre = predictor.pre
        print(
            f"device {runtime.describe()}, torch threads {torch.get_num_threads()}, "
            f"model {predictor.model.__class__.__name__} at {pre.img_size} px, "
            f"{len(predictor.class_names)} classes, {args.images} JPEGs of {args.side} px"
        )
        batches = [int(b) for b in args.batch_sizes.split(",")]
        x = np.stack([decode_image(p, pre) for p in paths])
        runs: dict[str, tuple[int, Callable[[], object]]] = {}
        for threads in map(int, args.threads.split(",")):
            runs[f"decode only | - | {threads}"] = (
                len(paths),
                partial(decode, paths, pre, threads),
            )
        nchw = nchw_predictor(task_dir, runtime)
        for batch in batches:
            runs[f"model only | {batch} | -"] = (len(x), partial(in_batches, predictor, x, batch))
            runs[f"model only, NCHW | {batch} | -"] = (len(x), partial(in_batches, nchw, x, batch))
        for batch in batches:
            runs[f"mtmc predict | {batch} | {predictor.decode_threads}"] = (
                len(paths),
                partial(predictor.predict, paths, 0.9, batch),
            )
        times = best_times({name: fn for name, (_, fn) in runs.items()}, args.repeats)

    print("\n| what | batch | decode threads | images/s | images per CPU-second |")
    print("|---|---|---|---|---|")
    for name, (n, _) in runs.items():
        wall, cpu = times[name]
        print(f"| {name} | {n / wall:.1f} | {n / cpu:.1f} |")


def nchw_predictor(task_dir: Path, runtime: Runtime) -> Predictor:
    """The same predictor with the model and its input in PyTorch's default layout."""
    predictor = Predictor(task_dir, runtime)
    predictor.model.to(memory_format=torch.contiguous_format)
    predictor.normalize = Normalize(predictor.pre, runtime.device, channels_last=False)
    return predictor


def in_batches(predictor: Predictor, x: np.ndarray, batch: int) -> None:
    for i in range(0, len(x), batch):
        predictor.logits(x[i : i + batch])


def decode(paths: list[Path], pre: Preprocess, threads: int) -> None:
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(partial(decode_image, pre=pre), paths))


if __name__ == "__main__":
    main()
