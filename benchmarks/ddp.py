"""DDP throughput: ``torchrun --nproc-per-node N mtmc train`` against one ``mtmc train`` process.

Both train the same task (scikit-learn's digits as PNG files, prepared once by the pipeline's
own stages) with the same recipe and global batch; each round starts from the same prepared
artifacts, so every run trains (nothing is reused). The figure is the training phase's
images/s over all ranks, from the bundle's ``model.json`` (validation excluded), and the wall
time of the whole command (process start, imports, cache, validation included). Rounds
alternate the contenders so drifting machine load hits both alike.

    .venv/bin/python benchmarks/ddp.py                                   # CPU: 2 gloo ranks
    .venv/bin/python benchmarks/ddp.py --device cuda --processes 1 \\
        --model resnet18 --img-size 64 --batch-size 256 --epochs 3        # 1 GPU: DDP vs none
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mtmc_pipeline import stages
from mtmc_pipeline.artifacts import TaskArtifacts
from mtmc_pipeline.config import load_task_config
from mtmc_pipeline.demo import write_digits


def prepare(root: Path) -> tuple[Path, Path]:
    """The digits task folder and its artifacts up to the sampling weights."""
    task_dir = root / "data" / "digits"
    write_digits(task_dir)
    art = TaskArtifacts(root / "prepared", "digits")
    cfg = load_task_config(task_dir)
    stages.run_inventory(task_dir, art, cfg.scan)
    stages.run_integrity(task_dir, art, cfg.integrity)
    stages.run_splits(art, cfg.split)
    stages.run_sampling(art, cfg.sampling)
    return task_dir, art.root


def run(
    task_dir: Path, prepared: Path, work: Path, processes: int, args: argparse.Namespace
) -> dict[str, float]:
    """One training command on a fresh copy of the prepared artifacts."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(prepared, work)
    sets = [
        f"--set=model={args.model}",
        f"--set=img_size={args.img_size}",
        f"--set=batch_size={args.batch_size}",
        f"--set=epochs={args.epochs}",
        "--set=pretrained=false",
    ]
    train = ["-m", "mtmc_pipeline.cli", "train", str(task_dir), f"--artifacts={work}", *sets]
    train.append(f"--device={args.device}")
    env = dict(os.environ)
    if processes == 0:  # no torchrun: the plain process
        command = [sys.executable, *train]
    else:
        launcher = ["-m", "torch.distributed.run", "--standalone"]
        command = [sys.executable, *launcher, f"--nproc-per-node={processes}", *train]
    if args.device == "cpu":  # split the cores between the ranks
        env["OMP_NUM_THREADS"] = str(max(1, args.threads // max(processes, 1)))
    t0 = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    info = json.loads((work / "digits" / "model" / "model.json").read_text("utf-8"))
    return {"images_per_second": info["images_per_second"], "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu (gloo ranks) or cuda (one GPU per rank)")
    p.add_argument("--processes", type=int, default=2, help="torchrun --nproc-per-node")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU: total threads")
    p.add_argument("--model", default="resnet10t")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64, help="global batch")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        task_dir, prepared = prepare(Path(tmp))
        results: dict[str, list[dict[str, float]]] = {"one process": [], "ddp": []}
        for _ in range(args.rounds):
            results["one process"].append(run(task_dir, prepared, Path(tmp) / "a", 0, args))
            results["ddp"].append(run(task_dir, prepared, Path(tmp) / "b", args.processes, args))
    label = f"torchrun x{args.processes}"
    print(f"{args.model} {args.img_size}px, global batch {args.batch_size}, {args.device}")
    for name, rows in results.items():
        rate = statistics.median(r["images_per_second"] for r in rows)
        wall = statistics.median(r["wall_s"] for r in rows)
        print(
            f"{label if name == 'ddp' else name:>14}: {rate:8.1f} img/s (median), {wall:.1f} s wall"
        )
    ratio = statistics.median(
        b["images_per_second"] / a["images_per_second"]
        for a, b in zip(results["one process"], results["ddp"], strict=True)
    )
    print(f"images/s ratio ({label} / one process), median of rounds: {ratio:.2f}")


if __name__ == "__main__":
    main()
