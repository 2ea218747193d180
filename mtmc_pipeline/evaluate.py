"""Evaluate a model bundle on the manifest's val split (and test split, when there is one).

Produces the metrics, the per-class table, the confusion matrix, the logits of every
evaluated image (``predictions.parquet``, what calibration is fitted on) and a Markdown report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from mtmc_pipeline.config import EvaluationConfig
from mtmc_pipeline.data import CachedImageDataset, DecodedCache, Normalize
from mtmc_pipeline.metrics import (
    confusion,
    cross_entropy,
    per_class,
    softmax,
    summary_metrics,
    top_k_accuracy,
)
from mtmc_pipeline.models import Preprocess, load_bundle
from mtmc_pipeline.plots import confusion_png
from mtmc_pipeline.runtime import Runtime

EVAL_SPLITS = ("val", "test")


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    dataset: CachedImageDataset,
    normalize: Normalize,
    runtime: Runtime,
    batch_size: int,
) -> np.ndarray:
    """Logits (float32, N x C) for every item of ``dataset``, in order."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=runtime.num_workers)
    out = []
    for x, _ in loader:
        with runtime.autocast():
            out.append(model(normalize(x)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


@dataclass
class Evaluation:
    metrics: dict[str, object]  # primary split's metrics + "by_split"
    per_class: pd.DataFrame
    confusion: pd.DataFrame
    predictions: pd.DataFrame
    confusion_png: bytes
    report_md: str


def split_metrics(
    labels: np.ndarray, logits: np.ndarray, num_classes: int, top_k: int
) -> dict[str, float]:
    cm = confusion(labels, logits.argmax(1), num_classes)
    out: dict[str, float] = dict(summary_metrics(cm))
    out[f"top_{min(top_k, num_classes)}_accuracy"] = top_k_accuracy(labels, logits, top_k)
    out["log_loss"] = cross_entropy(logits, labels) if len(labels) else float("nan")
    out["n"] = len(labels)
    return out


def evaluate_model(
    bundle_dir: Path,
    manifest: pd.DataFrame,
    task_dir: Path,
    cache_root: Path,
    runtime: Runtime,
    config: EvaluationConfig | None = None,
) -> Evaluation:
    config = config or EvaluationConfig()
    model, info = load_bundle(bundle_dir, runtime.device)
    names: list[str] = info["class_names"]
    pre = Preprocess(
        info["img_size"], tuple(info["mean"]), tuple(info["std"]), info["interpolation"]
    )
    cache = DecodedCache(cache_root, pre.img_size, pre.interpolation)
    normalize = Normalize(pre, runtime.device, runtime.channels_last)
    rows = manifest[manifest["split"].isin(EVAL_SPLITS)].reset_index(drop=True)
    cache.ensure([str(task_dir / r) for r in rows["relpath"]], rows["content_hash"].tolist())

    by_split: dict[str, dict[str, float]] = {}
    pc_parts, cm_parts, pred_parts = [], [], []
    cms: dict[str, np.ndarray] = {}
    for split in EVAL_SPLITS:
        part = rows[rows["split"] == split].reset_index(drop=True)
        if part.empty:
            continue
        ds = CachedImageDataset(cache, part["content_hash"], part["label"])
        logits = predict_logits(model, ds, normalize, runtime, batch_size=256)
        labels = part["label"].to_numpy()
        by_split[split] = split_metrics(labels, logits, len(names), config.top_k)
        cm = confusion(labels, logits.argmax(1), len(names))
        cms[split] = cm
        pc = per_class(cm)
        pc.insert(0, "class_name", names)
        pc.insert(0, "split", split)
        pc_parts.append(pc)
        ii, jj = np.nonzero(np.ones_like(cm))
        cm_parts.append(
            pd.DataFrame(
                {
                    "split": split,
                    "true_class": [names[i] for i in ii],
                    "pred_class": [names[j] for j in jj],
                    "count": cm[ii, jj],
                    "row_fraction": cm[ii, jj] / np.maximum(cm.sum(1)[ii], 1),
                }
            )
        )
        pred_parts.append(
            pd.DataFrame(
                {
                    "relpath": part["relpath"],
                    "split": split,
                    "label": labels,
                    "pred": logits.argmax(1),
                    "logits": list(logits.astype(np.float32)),
                }
            )
        )
    if not by_split:
        raise ValueError("the split manifest has no val or test images to evaluate on")
    primary = "test" if "test" in by_split else "val"
    metrics: dict[str, object] = {**by_split[primary], "split": primary, "by_split": by_split}
    predictions = pd.concat(pred_parts, ignore_index=True)
    per_class_df = pd.concat(pc_parts, ignore_index=True)
    png = confusion_png(cms[primary], names, f"Confusion matrix ({primary})")
    report = report_markdown(metrics, per_class_df, cms[primary], names, predictions, primary)
    return Evaluation(
        metrics, per_class_df, pd.concat(cm_parts, ignore_index=True), predictions, png, report
    )


def _fmt(x: float) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def report_markdown(
    metrics: dict[str, object],
    per_class_df: pd.DataFrame,
    cm: np.ndarray,
    names: list[str],
    predictions: pd.DataFrame,
    split: str,
    image: str = "confusion.png",
) -> str:
    """Headline metrics, worst classes, most confused pairs, a few misclassified files."""
    head = ["accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "log_loss", "n"]
    lines = [f"## Evaluation on `{split}`", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(metrics[k])} |" for k in head if k in metrics]
    pc = per_class_df[per_class_df["split"] == split].sort_values("f1").head(5)
    lines += ["", "### Worst classes", "", "| class | precision | recall | F1 | support |"]
    lines += ["|---|---|---|---|---|"]
    lines += [
        f"| {r.class_name} | {r.precision:.3f} | {r.recall:.3f} | {r.f1:.3f} | {r.support} |"
        for r in pc.itertuples()
    ]
    off = cm.copy()
    np.fill_diagonal(off, 0)
    pairs = sorted(
        ((int(off[i, j]), names[i], names[j]) for i, j in zip(*np.nonzero(off), strict=True)),
        reverse=True,
    )[:5]
    lines += ["", "### Most confused pairs", ""]
    lines += [f"- {t} → {p}: {n}" for n, t, p in pairs] or ["- none"]
    preds = predictions[predictions["split"] == split]
    wrong = preds[preds["label"] != preds["pred"]].head(10)
    lines += ["", "### Misclassified files (first 10)", ""]
    if wrong.empty:
        lines.append("- none")
    for r in wrong.itertuples():
        conf = softmax(np.asarray(r.logits)[None])[0].max()
        lines.append(f"- `{r.relpath}`: {names[r.label]} predicted as {names[r.pred]} ({conf:.2f})")
    lines += ["", f"![confusion matrix]({image})", ""]
    return "\n".join(lines)
