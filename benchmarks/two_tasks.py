"""The whole pipeline on two tasks of about 12,000 small training images each, with defaults.

Writes a data root with two tasks of the demo's drawn textures (28-px grey and 32-px colour,
five classes with Chinese names) in ``train/``, ``val/`` and ``test/`` folders and no
``task.yaml``, then runs ``dagster asset materialize --select '*'`` on it in a fresh Dagster
instance, as CI would, and reports the pipeline's wall time and, per task, the resolved
recipe, its epochs and training seconds, and test accuracy.

    .venv/bin/python benchmarks/two_tasks.py --out /tmp/two-tasks     # ~18 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from mtmc_pipeline.artifacts import read_json
from mtmc_pipeline.demo import PATTERN_CLASSES, _draw

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"纹理_灰": (28, True), "纹理_彩": (32, False)}
SPLITS = {"train": 1.0, "val": 0.125, "test": 0.125}  # of --train-per-class


def write_task(task_dir: Path, size: int, grey: bool, train_per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for split, share in SPLITS.items():
        for kind, name in enumerate(PATTERN_CLASSES):
            folder = task_dir / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(round(train_per_class * share)):
                img = _draw(kind, rng, size)
                (img.convert("L") if grey else img).save(folder / f"{j:05d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="scratch folder (emptied)")
    parser.add_argument("--train-per-class", type=int, default=2_400)
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    data, artifacts, home = args.out / "data", args.out / "artifacts", args.out / "home"
    for seed, (task, (size, grey)) in enumerate(TASKS.items()):
        write_task(data / task, size, grey, args.train_per_class, seed)
    home.mkdir(parents=True)
    shutil.copy(ROOT / ".dagster" / "dagster.yaml", home / "dagster.yaml")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "MTMC_DATA_ROOT": str(data),
        "MTMC_ARTIFACTS": str(artifacts),
        "PYTHONPATH": str(ROOT),
    }
    dagster = Path(sys.executable).parent / "dagster"
    command = [str(dagster), "asset", "materialize", "--select", "*", "-m", "assets.definitions"]
    start = time.perf_counter()
    with open(args.out / "materialize.log", "w") as log:
        rc = subprocess.run(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    print(f"pipeline wall time: {wall:.0f} s ({wall / 60:.1f} min), exit code {rc.returncode}")
    print("\n| task | train images | recipe | epochs | train s | test accuracy |")
    print("|---|---|---|---|---|---|")
    for task in TASKS:
        model = read_json(artifacts / task / "model" / "model.json")
        metrics = read_json(artifacts / task / "evaluation" / "metrics.json")
        recipe = f"{model['arch']} {model['img_size']} px, batch {model['config']['batch_size']}"
        print(
            f"| {task} | {model['recipe_inputs']['data']['train_images']} | {recipe} | "
            f"{model['epochs_run']}/{model['epochs_planned']} | {model['train_seconds']:.0f} | "
            f"{metrics['accuracy']:.4f} ({metrics['split']}) |"
        )


if __name__ == "__main__":
    main()
