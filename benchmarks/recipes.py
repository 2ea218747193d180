"""The automatic recipe on generated data of several shapes, next to a plain timm script.

For each shape (28-px grey, 32-px colour, 96 px and 224 px colour textures, the demo's drawn
classes) the script writes a task folder with no ``task.yaml``, runs the pipeline's stages on
it with every training setting at ``auto``, and reports the resolved recipe, validation
accuracy and the training stage's wall time. Then a plain script a practitioner might write
(timm ``resnet18`` at the image size, at most 128 px, AdamW 1e-3, batch 64, shuffled, no
augmentation) trains on the same train split, decoded the same way, for the same wall time,
and is scored on the same validation images.

    .venv/bin/python benchmarks/recipes.py                        # ~5 minutes on 2 cores
    .venv/bin/python benchmarks/recipes.py --per-class 40 --shapes 28g,32c   # a quick look
"""

from __future__ import annotations

# isort: off
import mtmc_pipeline  # noqa: F401  first: it sets OpenMP's wait policy before torch loads
# isort: on

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F

from mtmc_pipeline import stages
from mtmc_pipeline.artifacts import TaskArtifacts, read_json
from mtmc_pipeline.config import load_task_config
from mtmc_pipeline.data.splits import read_manifest
from mtmc_pipeline.demo import PATTERN_CLASSES, _draw
from mtmc_pipeline.runtime import DeviceSettings
from mtmc_pipeline.stages.training import run_training
from mtmc_pipeline.training.loader import fit_square, load_rgb

SHAPES = {"28g": (28, True), "32c": (32, False), "96c": (96, False), "224c": (224, False)}


def write_task(task_dir: Path, size: int, grey: bool, per_class: int) -> None:
    """Drawn textures, ``per_class`` images of each of the five demo classes, flat layout."""
    rng = np.random.default_rng(size)
    for kind, name in enumerate(PATTERN_CLASSES):
        for j in range(per_class):
            img = _draw(kind, rng, size)
            img = img.convert("L") if grey else img
            path = task_dir / name / f"{j:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path)


def pipeline(task_dir: Path, art: TaskArtifacts) -> tuple[dict, float]:
    """Prepare and train with the defaults; model.json and the training stage's seconds."""
    cfg = load_task_config(task_dir)
    stages.run_inventory(task_dir, art, cfg.scan)
    stages.run_integrity(task_dir, art, cfg.integrity)
    stages.run_splits(art, cfg.split)
    stages.run_sampling(art, cfg.sampling)
    start = time.perf_counter()
    run_training(task_dir, art, cfg.train, DeviceSettings("cpu"), lambda _: None)
    return read_json(art.model_dir / "model.json"), time.perf_counter() - start


def plain_script(task_dir: Path, art: TaskArtifacts, size: int, seconds: float) -> float:
    """Validation accuracy of a plain timm + PyTorch loop trained for ``seconds``."""
    manifest, classes = read_manifest(art.splits)
    size = min(size, 128)

    def tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        rows = manifest[manifest["split"] == split]
        pixels = [fit_square(load_rgb(task_dir / r), size) for r in rows["relpath"]]
        x = torch.tensor(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255
        return (x - 0.45) / 0.225, torch.tensor(rows["label"].to_numpy())

    (xt, yt), (xv, yv) = tensors("train"), tensors("val")
    model = timm.create_model("resnet18", num_classes=len(classes))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        model.train()
        for idx in torch.randperm(len(xt)).split(64):
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if time.perf_counter() - start >= seconds:
                break
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(b).argmax(1) for b in xv.split(128)])
    return float((pred == yv).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=120, help="images per class")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated keys")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    print("| data | images | resolved recipe | accuracy | train s | plain resnet18 accuracy |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.shapes.split(","):
            size, grey = SHAPES[key]
            task_dir = Path(tmp) / "data" / key
            write_task(task_dir, size, grey, args.per_class)
            art = TaskArtifacts(Path(tmp) / "artifacts", key)
            info, seconds = pipeline(task_dir, art)
            plain = plain_script(task_dir, art, size, seconds)
            c = info["config"]
            recipe = (
                f"{c['model']} {c['img_size']} px, batch {c['batch_size']}, lr {c['lr']:g}, "
                f"{info['epochs_run']}/{info['epochs_planned']} epochs in "
                f"{c['time_budget_minutes']} min"
            )
            print(
                f"| {size} px {'grey' if grey else 'colour'} | {5 * args.per_class} | {recipe} "
                f"| {info['metrics']['accuracy']:.3f} | {seconds:.0f} | {plain:.3f} |",
                flush=True,
            )
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
