"""Shared backbone against separate models, in one run on the demo data.

Three tasks: ``digits`` and ``pattern`` from the demo, and ``parity``, the digits images again
labelled even / odd. Each is trained alone with the automatic recipe, and the three are
trained as one group (one backbone, three heads) with the automatic recipe of their pooled
data (its time budget follows the pooled images); every model is then evaluated by the
pipeline's evaluation stage (test accuracy). Reported: per-task accuracy, total training
time, and model images/s for N tasks, shared (one backbone pass, N heads, at the group's
size) against separate (N passes, each at its own bundle's size).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/shared_backbone.py --out /tmp/shared-bench

``--quick``, ``--max-epochs`` and ``--model`` shrink the run for a busy machine
(``--max-epochs`` trains that many epochs instead of a time budget).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from mtmc_pipeline import artifacts as af
from mtmc_pipeline import stages
from mtmc_pipeline.artifacts import TaskArtifacts, group_dir
from mtmc_pipeline.config import TrainConfig, load_task_config
from mtmc_pipeline.data.groups import SharedGroup, split_leaders
from mtmc_pipeline.data.splits import cross_task_leaks, read_manifest
from mtmc_pipeline.demo import write_demo, write_digits, write_pattern
from mtmc_pipeline.runtime import DeviceSettings, resolve_runtime
from mtmc_pipeline.stages.reporting import run_evaluation
from mtmc_pipeline.stages.shared import group_train_config, run_shared_training
from mtmc_pipeline.stages.training import run_training
from mtmc_pipeline.training.models import load_bundle
from mtmc_pipeline.training.multitask import (
    BATCH_MIXING,
    TASK_SAMPLING,
    MultiHeadNet,
    load_joint_bundle,
)

TASKS = ["digits", "pattern", "parity"]

CPU = DeviceSettings("cpu")  # the stages take device settings, not a runtime


def write_data(root: Path, quick: bool, recipe: dict) -> None:
    if quick:  # 30 digits per class; pattern at about a third of its size
        write_digits(root / "digits", 30)
        write_pattern(root / "pattern", (60, 40, 30, 20, 15), (15, 10, 8, 6, 5))
    else:
        write_demo(root)
    parity = root / "parity"
    for digit in range(10):
        dst = parity / ("even" if digit % 2 == 0 else "odd")
        dst.mkdir(parents=True, exist_ok=True)
        for src in (root / "digits" / str(digit)).glob("*.png"):
            shutil.copy2(src, dst / f"{digit}_{src.name}")
    shutil.copy2(root / "digits" / "task.yaml", parity / "task.yaml")
    for task in TASKS:  # the automatic recipe, with the command line's settings over it
        path = root / task / "task.yaml"
        sections = yaml.safe_load(path.read_text("utf-8")) if path.is_file() else None
        sections = sections or {}
        sections["train"] = {**sections.get("train", {}), **recipe}
        path.write_text(yaml.safe_dump(sections, allow_unicode=True), "utf-8")


def prepare(data: Path, root: Path) -> None:
    """Every task's data stages, parity's splits led by digits' as in a declared group (the
    separate models get the same splits, so both sides are scored on the same images)."""
    leaders = split_leaders([SharedGroup(name="demo", tasks=TASKS)])
    for task in TASKS:
        cfg = load_task_config(data / task)
        art = TaskArtifacts(root, task)
        leader = TaskArtifacts(root, leaders[task]) if task in leaders else None
        stages.run_inventory(data / task, art, cfg.scan)
        stages.run_integrity(data / task, art, cfg.integrity)
        stages.run_splits(art, cfg.split, leader=leader)
        stages.run_sampling(art, cfg.sampling)


def leaks(root: Path) -> int:
    """Images one task trains on and another holds out (same bytes)."""
    return cross_task_leaks([read_manifest(TaskArtifacts(root, t).splits)[0] for t in TASKS])


def accuracy(data: Path, root: Path, task: str, runtime) -> float:
    art = TaskArtifacts(root, task)
    run_evaluation(data / task, art, load_task_config(data / task).evaluation, CPU)
    return af.read_json(art.evaluation_dir / "metrics.json")["accuracy"]


def best_seconds(runs: dict[str, list[tuple[torch.nn.Module, torch.Tensor]]], repeats: int):
    """Best time of each entry's models (each on its own input batch) over ``repeats`` rounds,
    the entries interleaved in every round so that a change of machine load hits all alike."""
    best = dict.fromkeys(runs, np.inf)
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first round warms up
            for name, models in runs.items():
                t0 = time.perf_counter()
                for m, x in models:
                    m(x)
                best[name] = min(best[name], time.perf_counter() - t0)
    return best


def _batch(n: int, img_size: int) -> torch.Tensor:
    x = torch.randn(n, 3, img_size, img_size)
    return x.contiguous(memory_format=torch.channels_last)


def inference_table(separate: Path, shared: Path, batch: int, repeats: int) -> None:
    """Images/s of N separate bundles (each at its own input size, as each is deployed)
    against the joint model with N heads at the group's size."""
    joint, info = load_joint_bundle(group_dir(shared, "demo") / "model")
    x_shared = _batch(batch, info["img_size"])
    alone = []
    for t in TASKS:
        model, model_info = load_bundle(TaskArtifacts(separate, t).model_dir)
        alone.append((model, _batch(batch, model_info["img_size"])))
    sizes = ", ".join(f"{t} {x.shape[-1]} px" for t, (_, x) in zip(TASKS, alone, strict=True))
    print(f"\ninputs: separate {sizes}; shared {info['img_size']} px")
    print("\n| tasks | separate images/s | shared images/s | shared / separate |")
    print("|---|---|---|---|")
    for n in (1, 2, 3):
        runs = {"separate": alone[:n], "shared": [(_first_heads(joint, n), x_shared)]}
        best = best_seconds(runs, repeats)
        sep, sha = batch / best["separate"], batch / best["shared"]
        print(f"| {n} | {sep:.0f} | {sha:.0f} | {sha / sep:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="scratch folder (emptied)")
    parser.add_argument("--batch", type=int, default=64, help="inference batch size")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="a third of the demo's images")
    parser.add_argument("--max-epochs", type=int, help="cap every recipe's epochs")
    parser.add_argument("--model", help="another timm model for every task and the group")
    parser.add_argument(
        "--task-sampling", choices=TASK_SAMPLING, default="equal", help="the group's draw shares"
    )
    parser.add_argument("--batch-mixing", choices=BATCH_MIXING, default="mixed")
    parser.add_argument(
        "--inference-only", action="store_true", help="time the models of a previous run in --out"
    )
    args = parser.parse_args()
    if args.inference_only:
        separate, shared = args.out / "separate", args.out / "shared"
        inference_table(separate, shared, args.batch, args.repeats)
        return
    recipe = {k: v for k, v in (("epochs", args.max_epochs), ("model", args.model)) if v}
    shutil.rmtree(args.out, ignore_errors=True)
    data, separate, shared = args.out / "data", args.out / "separate", args.out / "shared"
    write_data(data, args.quick, recipe)
    prepare(data, separate)
    shutil.copytree(separate, shared)
    runtime = resolve_runtime("cpu")
    print(f"cross-task leaks (trained on by one task, held out by another): {leaks(separate)}")

    seconds: dict[str, float] = {}
    for task in TASKS:
        cfg = load_task_config(data / task).train
        t0 = time.perf_counter()
        run_training(data / task, TaskArtifacts(separate, task), cfg, CPU, lambda _: None)
        seconds[task] = time.perf_counter() - t0
        print(f"separate {task}: {seconds[task]:.1f} s")
    group = SharedGroup(
        name="demo",
        tasks=TASKS,
        train=recipe,
        task_sampling=args.task_sampling,
        batch_mixing=args.batch_mixing,
    )
    config: TrainConfig = group_train_config(group, data)
    t0 = time.perf_counter()
    run_shared_training(group, data, shared, config, runtime, print)
    shared_seconds = time.perf_counter() - t0

    print("\n| task | separate accuracy | shared accuracy | separate epochs | shared epochs |")
    print("|---|---|---|---|---|")
    joint_info = af.read_json(group_dir(shared, "demo") / "model" / "model.json")
    for task in TASKS:
        a = accuracy(data, separate, task, runtime)
        b = accuracy(data, shared, task, runtime)
        ea = af.read_json(TaskArtifacts(separate, task).model_dir / "model.json")["epochs_run"]
        print(f"| {task} | {a:.4f} | {b:.4f} | {ea} | {joint_info['epochs_run']} |")
    arch, size = joint_info["arch"], joint_info["img_size"]
    print(
        f"group recipe: {arch} at {size} px, {group.batch_mixing} batches, "
        f"task_sampling {group.task_sampling}"
    )
    total = sum(seconds.values())
    print(
        f"\ntraining time (stage wall s, cache decoding included): separate {total:.1f} "
        f"({', '.join(f'{t} {s:.1f}' for t, s in seconds.items())}), shared {shared_seconds:.1f} "
        f"({shared_seconds / total:.2f}x)"
    )

    inference_table(separate, shared, args.batch, args.repeats)


def _first_heads(joint: MultiHeadNet, n: int) -> MultiHeadNet:
    """The joint model with only its first ``n`` heads (N tasks from one backbone pass)."""
    return MultiHeadNet(joint.backbone, list(joint.heads)[:n]).eval()


if __name__ == "__main__":
    main()
