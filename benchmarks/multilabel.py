"""Multi-label quality: the pipeline against a hand-written BCE baseline given the same time.

Scenes are composed from real images, scikit-learn's handwritten digits: each 32 x 32 scene
holds two or three different digits in a 2 x 2 grid (the other cells blank) and is labelled
with the digits it shows. The pipeline runs every stage on them (iterative stratification,
its multi-label training with ``train.loss``, evaluation); the baseline is a plain PyTorch
loop (the same timm model at the same image size, AdamW, BCE, no augmentation, no sampling
weights) on the pipeline's own train split, trained for as many epochs as fit in the
pipeline's training time. Both report mAP on the same test images, with the pipeline's metric
code. The pipeline's calibration table, fitted on val, is checked on test as the calibration
stage does: how many reachable (class, score, level) thresholds fall short of their level by
more than the tolerance (or the Clopper-Pearson slack of few images). By default every
training setting is ``auto``, as a new user's task gets it; ``--recipe manual`` trains
``--model`` for ``--epochs`` at 32 px instead.

    .venv/bin/python benchmarks/multilabel.py --scenes 800
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from mtmc_pipeline import artifacts as af
from mtmc_pipeline import stages
from mtmc_pipeline.artifacts import TaskArtifacts
from mtmc_pipeline.config import load_task_config
from mtmc_pipeline.data.multilabel_splits import indicator
from mtmc_pipeline.evaluation.metrics import per_class_average_precision
from mtmc_pipeline.runtime import DeviceSettings
from mtmc_pipeline.stages.reporting import run_calibration, run_evaluation
from mtmc_pipeline.stages.training import run_training
from mtmc_pipeline.training import small_models  # noqa: F401  (registers them with timm)
from mtmc_pipeline.training.loader import fit_square, load_rgb


def write_scenes(task_dir: Path, n: int, seed: int = 0) -> None:
    """``n`` digit scenes as PNGs and their labels.csv."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    by_digit = [np.flatnonzero(digits.target == d) for d in range(10)]
    rng = np.random.default_rng(seed)
    lines = ["relpath,labels"]
    for i in range(n):
        shown = rng.choice(10, size=rng.integers(2, 4), replace=False)
        cells = rng.permutation(4)[: len(shown)]
        scene = np.zeros((32, 32), dtype=np.uint8)
        for d, cell in zip(shown, cells, strict=True):
            pixels = digits.images[rng.choice(by_digit[d])] * (255 / 16)
            tile = Image.fromarray(pixels.astype(np.uint8)).resize((16, 16), Image.BICUBIC)
            r, c = divmod(int(cell), 2)
            scene[16 * r : 16 * r + 16, 16 * c : 16 * c + 16] = np.asarray(tile)
        rel = f"scenes/{i:04d}.png"
        (task_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene).convert("RGB").save(task_dir / rel)
        lines.append(f"{rel},{';'.join(str(d) for d in sorted(shown))}")
    (task_dir / "labels.csv").write_text("\n".join(lines) + "\n", "utf-8")


def baseline_map(
    task_dir: Path, manifest: pd.DataFrame, model_name: str, size: int, seconds: float, k: int
) -> tuple[float, int]:
    """Test mAP of a plain BCE loop trained for ``seconds``; and the epochs that took."""
    torch.manual_seed(0)

    def tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        rows = manifest[manifest["split"] == split]
        x = np.stack([fit_square(load_rgb(task_dir / r), size) for r in rows["relpath"]])
        x = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
        return (x - 0.5) / 0.25, torch.from_numpy(indicator(rows["labels"], k)).float()

    (x, y), (xt, yt) = tensors("train"), tensors("test")
    model = timm.create_model(model_name, pretrained=False, num_classes=k)
    opt = torch.optim.AdamW(model.parameters(), lr=0.005, weight_decay=0.05)
    start, epochs = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        model.train()
        for idx in torch.randperm(len(x)).split(32):
            loss = F.binary_cross_entropy_with_logits(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        epochs += 1
    model.eval()
    with torch.no_grad():
        logits = model(xt).numpy().astype(np.float64)
    return float(per_class_average_precision(logits, yt.numpy().astype(bool)).mean()), epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=800)
    parser.add_argument("--recipe", choices=("auto", "manual"), default="auto")
    parser.add_argument("--epochs", type=int, default=15, help="with --recipe manual")
    parser.add_argument("--model", default="resnet10t", help="with --recipe manual")
    parser.add_argument("--losses", default="bce,asl")
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    with tempfile.TemporaryDirectory() as tmp:
        task_dir = Path(tmp) / "data" / "digit_scenes"
        write_scenes(task_dir, args.scenes)
        rows, flagged = [], {}
        for loss in args.losses.split(","):
            manual = (
                f"  model: {args.model}\n  img_size: 32\n  pretrained: false\n"
                f"  epochs: {args.epochs}\n  batch_size: 32\n  lr: 0.005\n"
            )
            (task_dir / "task.yaml").write_text(
                "kind: multilabel\nsplit:\n  test_fraction: 0.2\ntrain:\n"
                + (manual if args.recipe == "manual" else "")
                + f"  hflip: false\n  loss: {loss}\n",
                "utf-8",
            )
            cfg = load_task_config(task_dir)
            art = TaskArtifacts(Path(tmp) / f"art-{loss}", task_dir.name)
            stages.run_inventory(task_dir, art, cfg.scan)
            stages.run_integrity(task_dir, art, cfg.integrity)
            stages.run_splits(art, cfg.split, task_dir)
            stages.run_sampling(art, cfg.sampling)
            run_training(task_dir, art, cfg.train, DeviceSettings("cpu"), lambda _: None)
            run_evaluation(task_dir, art, cfg.evaluation, DeviceSettings("cpu"))
            run_calibration(art, cfg.calibration)
            info = af.read_json(art.model_dir / "model.json")
            m = af.read_json(art.evaluation_dir / "metrics.json")
            realised = pd.read_parquet(art.calibration_dir / "realised_precision.parquet")
            checked = realised[realised["n"] > 0]
            short = (checked["level"] - checked["precision"]).max()
            flagged[loss] = checked[checked["flagged"]]
            rows.append(
                {
                    "run": f"pipeline, loss {loss}",
                    "recipe": f"{info['arch']} {info['img_size']} px",
                    "train_s": info["train_seconds"],
                    "epochs": info["epochs_run"],
                    "mAP": m["mAP"],
                    "CP": m["CP"],
                    "CR": m["CR"],
                    "levels checked on test": len(checked),
                    "flagged": int(checked["flagged"].sum()),
                    "worst short": short,
                }
            )
        manifest = pd.read_parquet(art.splits)
        budget = rows[0]["train_s"]
        model_name, size = info["arch"], info["img_size"]
        base, epochs = baseline_map(task_dir, manifest, model_name, size, budget, 10)
        rows.append(
            {
                "run": "hand-written BCE loop",
                "recipe": f"{model_name} {size} px",
                "train_s": budget,
                "epochs": epochs,
                "mAP": base,
                "CP": None,
                "CR": None,
            }
        )
        print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".4f"))
        for loss, rows_short in flagged.items():
            if len(rows_short):
                cols = ["class_name", "level", "n", "precision", "allowed"]
                print(f"\nflagged on test, loss {loss}:")
                print(rows_short[cols].to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
