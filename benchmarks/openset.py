"""Open-set rejection on a class the model never saw: train a demo task without one class,
then tell that class's images (unknown) from held-out images of the known classes.

Reports, per unknown score (energy, max logit, kNN distance in feature space), the AUROC and
the false-accept rate of unknown images at the threshold fitted on val at 5% false rejects,
with the false-reject rate that threshold really has on the known test images.

    .venv/bin/python benchmarks/openset.py --task digits --hold-out 9
    .venv/bin/python benchmarks/openset.py --task pattern --hold-out 波点
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mtmc_pipeline import artifacts as af
from mtmc_pipeline import stages
from mtmc_pipeline.artifacts import TaskArtifacts
from mtmc_pipeline.config import load_task_config
from mtmc_pipeline.demo import write_demo
from mtmc_pipeline.evaluation.openset import auroc, knn_scores, threshold_at, unknown_scores
from mtmc_pipeline.runtime import DeviceSettings
from mtmc_pipeline.serving.predict import decode_image, expand_inputs
from mtmc_pipeline.stages.reporting import run_calibration, run_evaluation
from mtmc_pipeline.stages.training import run_training
from mtmc_pipeline.training.models import Preprocess, load_bundle


def train_without(data: Path, art: TaskArtifacts, task: str, overrides: dict) -> None:
    task_dir = data / task
    cfg = load_task_config(task_dir, overrides)
    stages.run_inventory(task_dir, art, cfg.scan)
    stages.run_integrity(task_dir, art, cfg.integrity)
    stages.run_splits(art, cfg.split)
    stages.run_sampling(art, cfg.sampling)
    run_training(task_dir, art, cfg.train, DeviceSettings("cpu"), lambda _: None)
    run_evaluation(task_dir, art, cfg.evaluation, DeviceSettings("cpu"))
    run_calibration(art, cfg.calibration)


@torch.no_grad()
def logits_and_features(model, pre: Preprocess, paths: list[Path]) -> tuple[np.ndarray, ...]:
    pixels = [decode_image(p, pre) for p in paths]
    x = torch.from_numpy(np.stack([p for p in pixels if not isinstance(p, str)]))
    x = x.permute(0, 3, 1, 2).float()
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(pre.std).view(1, 3, 1, 1) * 255
    feats = model.forward_head(model.forward_features((x - mean) / std), pre_logits=True)
    return model.get_classifier()(feats).numpy(), feats.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", default="digits")
    parser.add_argument("--hold-out", default="9", help="class folder left out of training")
    parser.add_argument("--false-reject-rate", type=float, default=0.05)
    parser.add_argument("--small", action="store_true", help="the tiny test data set")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data, root = Path(tmp) / "data", Path(tmp) / "artifacts"
        write_demo(data, small=args.small)
        unknown_paths = []
        for folder in sorted((data / args.task).rglob(args.hold_out)):
            if folder.is_dir():
                moved = Path(tmp) / "unknown" / folder.relative_to(data)
                moved.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(folder, moved)
                unknown_paths += sorted(expand_inputs([moved]))
        art = TaskArtifacts(root, args.task)
        start = time.perf_counter()
        split = {} if (data / args.task / "val").is_dir() else {"test_fraction": 0.2}
        train_without(data, art, args.task, {"split": {**split, "seed": 0}})
        seconds = time.perf_counter() - start

        model, info = load_bundle(art.model_dir)
        model = model.to(memory_format=torch.contiguous_format)
        pre = Preprocess.from_info(info)
        manifest = af.read_parquet(art.splits)
        task_dir = data / args.task

        def of(split: str) -> list[Path]:
            return [task_dir / r for r in manifest.loc[manifest["split"] == split, "relpath"]]

        held = "test" if (manifest["split"] == "test").any() else "val"
        _, train_feats = logits_and_features(model, pre, of("train"))
        val_logits, val_feats = logits_and_features(model, pre, of("val"))
        known_logits, known_feats = logits_and_features(model, pre, of(held))
        unk_logits, unk_feats = logits_and_features(model, pre, unknown_paths)
        metrics = af.read_json(art.evaluation_dir / "metrics.json")
        print(
            f"{args.task} without {args.hold_out!r}: trained in {seconds:.0f} s, "
            f"{metrics['split']} accuracy {metrics['accuracy']:.4f}; threshold fitted on val "
            f"({len(val_logits)} known images), measured on {held} ({len(known_logits)} known) "
            f"and {len(unk_logits)} images of the held-out class"
        )
        print("\n| score | AUROC | false accepts of unknown at val FRR 5% | FRR on known |")
        print("|---|---|---|---|")
        rows = {
            "energy": lambda lg, ft: unknown_scores(lg, "energy"),
            "max logit": lambda lg, ft: unknown_scores(lg, "max_logit"),
            "max softmax": lambda lg, ft: (
                -torch.softmax(torch.from_numpy(lg), 1).max(1).values.numpy()
            ),
            "kNN (k=5, cosine)": lambda lg, ft: knn_scores(train_feats, ft, 5),
        }
        for name, score in rows.items():
            val_s = score(val_logits, val_feats)
            known_s, unk_s = score(known_logits, known_feats), score(unk_logits, unk_feats)
            t = threshold_at(val_s, args.false_reject_rate)
            far, frr = float((unk_s <= t).mean()), float((known_s > t).mean())
            print(f"| {name} | {auroc(known_s, unk_s):.3f} | {far:.3f} | {frr:.3f} |")


if __name__ == "__main__":
    main()
