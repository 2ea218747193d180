"""Evaluate a model bundle on the manifest's val split (and test split, when there is one).

Produces the metrics, the per-class table, the confusion matrix (counts and row fractions),
the logits of every evaluated image (``predictions.parquet``, what calibration is fitted on)
and a Markdown report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from mtmc_pipeline.config import EvaluationConfig
from mtmc_pipeline.evaluation.calibrate import check_finite
from mtmc_pipeline.evaluation.metrics import (
    confusion,
    cross_entropy,
    one_hot,
    one_vs_rest,
    per_class,
    per_class_average_precision,
    row_fractions,
    sigmoid,
    softmax,
    summary_metrics,
    top_k_accuracy,
)
from mtmc_pipeline.plots import confusion_png
from mtmc_pipeline.runtime import Runtime
from mtmc_pipeline.training.loader import (
    CachedImageDataset,
    DecodedCache,
    Normalize,
    inference_loader,
)
from mtmc_pipeline.training.models import Preprocess, load_bundle, logits_fp32

EVAL_SPLITS = ("val", "test")
ONE_VS_REST_LOSSES = frozenset({"bce", "ghm"})
MEASURED_ON = {
    "test": "test: images that neither training, epoch selection nor calibration saw",
    "val": "val: the images that picked the best epoch and that calibration is fitted on, so "
    "optimistic (add a test/ folder or set split.test_fraction above 0)",
}
CONFUSION_PNG = "confusion.png"
CONFUSION_NORMALIZED_PNG = "confusion_normalized.png"


@torch.no_grad()
def predict_logits(
    model: nn.Module, loader: DataLoader, normalize: Normalize, runtime: Runtime
) -> np.ndarray:
    """Logits (float32, N x C) for every item of ``loader``, in order; one copy to the CPU."""
    model.eval()
    out = []
    for x, _ in loader:
        out.append(logits_fp32(model, normalize(x), runtime))
    return torch.cat(out).cpu().numpy() if out else np.zeros((0, 0), dtype=np.float32)


def ovr_score_kind(config: EvaluationConfig, model_info: dict[str, Any]) -> str:
    """softmax or sigmoid: the per-class probability the model was trained to produce."""
    if config.ovr_scores != "auto":
        return config.ovr_scores
    loss = model_info.get("config", {}).get("loss", "ce")
    return "sigmoid" if loss in ONE_VS_REST_LOSSES else "softmax"


def ovr_scores(logits: np.ndarray, kind: str) -> np.ndarray:
    return sigmoid(logits) if kind == "sigmoid" else softmax(logits)


@dataclass
class Evaluation:
    metrics: dict[str, Any]  # primary split's metrics + "by_split"
    per_class: pd.DataFrame
    confusion: pd.DataFrame
    predictions: pd.DataFrame
    pngs: dict[str, bytes]  # file name -> PNG
    report_md: str


def split_metrics(
    labels: np.ndarray, logits: np.ndarray, num_classes: int, config: EvaluationConfig, kind: str
) -> tuple[dict[str, Any], np.ndarray, pd.DataFrame]:
    """Everything measured on one (non-empty) split: confusion-matrix metrics, top-k, NLL,
    one-vs-rest; with the confusion matrix and the per-class table they came from."""
    cm = confusion(labels, logits.argmax(1), num_classes)
    scores = ovr_scores(logits, kind)
    truth = one_hot(labels, num_classes)
    pc = per_class(cm)
    pc["average_precision"] = per_class_average_precision(scores, truth)
    out: dict[str, Any] = dict(summary_metrics(cm))
    k = min(config.top_k, num_classes)
    out[f"top_{k}_accuracy"] = top_k_accuracy(labels, logits, k)
    out["log_loss"] = cross_entropy(logits, labels)
    out.update(one_vs_rest(scores, truth, config.ovr_threshold))
    out["mAP"] = float(pc["average_precision"].mean())
    out["ovr_scores"] = kind
    out["ovr_threshold"] = config.ovr_threshold
    out["n"] = len(labels)
    return out, cm, pc


def confusion_table(cm: np.ndarray, names: list[str], split: str) -> pd.DataFrame:
    """Long format: one row per (true, predicted) pair with its count and row fraction."""
    k = len(names)
    ii, jj = np.divmod(np.arange(k * k), k)
    return pd.DataFrame(
        {
            "split": split,
            "true_class": [names[i] for i in ii],
            "pred_class": [names[j] for j in jj],
            "true_label": ii,
            "pred_label": jj,
            "count": cm[ii, jj],
            "row_fraction": row_fractions(cm)[ii, jj],
        }
    )


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
    kind = ovr_score_kind(config, info)
    pre = Preprocess.from_info(info)
    cache = DecodedCache(cache_root, pre.img_size, pre.interpolation)
    normalize = Normalize(pre, runtime.device, channels_last=True)
    rows = manifest[manifest["split"].isin(EVAL_SPLITS)].reset_index(drop=True)
    cache.ensure([str(task_dir / r) for r in rows["relpath"]], rows["content_hash"].tolist())

    by_split: dict[str, dict[str, Any]] = {}
    pc_parts, cm_parts, pred_parts = [], [], []
    cms: dict[str, np.ndarray] = {}
    for split in EVAL_SPLITS:
        part = rows[rows["split"] == split].reset_index(drop=True)
        if part.empty:
            continue
        ds = CachedImageDataset(cache, part["content_hash"], part["label"])
        loader = inference_loader(ds, runtime.inference_batch_size, runtime)
        logits = predict_logits(model, loader, normalize, runtime)
        check_finite(logits, f"{split} split", part["relpath"].tolist())
        labels = part["label"].to_numpy()
        by_split[split], cm, pc = split_metrics(labels, logits, len(names), config, kind)
        cms[split] = cm
        pc.insert(0, "class_name", names)
        pc.insert(0, "split", split)
        pc_parts.append(pc)
        cm_parts.append(confusion_table(cm, names, split))
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
    metrics: dict[str, Any] = {
        **by_split[primary],
        "split": primary,
        "measured_on": MEASURED_ON[primary],
        "by_split": by_split,
        "model_fingerprint": info.get("fingerprint"),
    }
    predictions = pd.concat(pred_parts, ignore_index=True)
    per_class_df = pd.concat(pc_parts, ignore_index=True)
    pngs = {
        CONFUSION_PNG: confusion_png(cms[primary], names, f"Confusion matrix ({primary})"),
        CONFUSION_NORMALIZED_PNG: confusion_png(
            cms[primary], names, f"Confusion matrix, % of each true class ({primary})", True
        ),
    }
    report = report_markdown(metrics, per_class_df, cms[primary], names, predictions)
    return Evaluation(
        metrics, per_class_df, pd.concat(cm_parts, ignore_index=True), predictions, pngs, report
    )


def _fmt(x: object) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


HEADLINE = (
    "accuracy",
    "balanced_accuracy",
    "macro_precision",
    "macro_recall",
    "macro_f1",
    "weighted_f1",
    "log_loss",
    "mAP",
)
ONE_VS_REST = ("CP", "CR", "CF1", "OP", "OR", "OF1")


def report_markdown(
    metrics: dict[str, Any],
    per_class_df: pd.DataFrame,
    cm: np.ndarray,
    names: list[str],
    predictions: pd.DataFrame,
    n_worst: int = 5,
    n_pairs: int = 5,
    n_files: int = 10,
) -> str:
    """Headline metrics, worst classes, most confused pairs, the most confident mistakes."""
    split = metrics["split"]
    top_k = [k for k in metrics if k.startswith("top_")]
    lines = [f"## Evaluation on `{split}` ({metrics['n']} images)", ""]
    lines += [f"Measured on {MEASURED_ON[split]}.", ""]
    lines += ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(metrics[k])} |" for k in (*HEADLINE, *top_k) if k in metrics]
    lines += [
        "",
        f"One-vs-rest at {metrics['ovr_scores']} score ≥ {metrics['ovr_threshold']} "
        "(C: mean over classes, O: over all decisions):",
        "",
        "| " + " | ".join(ONE_VS_REST) + " |",
        "|" + "---|" * len(ONE_VS_REST),
        "| " + " | ".join(f"{metrics[k]:.4f}" for k in ONE_VS_REST) + " |",
    ]
    by_split = metrics.get("by_split", {})
    if len(by_split) > 1:
        lines += ["", "### By split", "", "| split | n | accuracy | macro F1 | mAP |"]
        lines += ["|---|---|---|---|---|"]
        lines += [
            f"| {s} | {m['n']} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} | {m['mAP']:.4f} |"
            for s, m in by_split.items()
        ]

    pc = per_class_df[per_class_df["split"] == split]
    present = pc[pc["support"] > 0].sort_values(["f1", "support"], ascending=[True, False])
    lines += ["", "### Worst classes", ""]
    lines += ["| class | precision | recall | F1 | AP | support |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {r.class_name} | {r.precision:.3f} | {r.recall:.3f} | {r.f1:.3f} | "
        f"{r.average_precision:.3f} | {r.support} |"
        for r in present.head(n_worst).itertuples()
    ]
    absent = pc.loc[pc["support"] == 0, "class_name"].tolist()
    if absent:
        lines += ["", f"Classes with no `{split}` images: {', '.join(absent)}."]

    off = cm.copy()
    np.fill_diagonal(off, 0)
    frac = row_fractions(cm)
    pairs = sorted(zip(*np.nonzero(off), strict=True), key=lambda ij: (-off[ij], ij))[:n_pairs]
    lines += ["", "### Most confused pairs", ""]
    lines += [
        f"- {names[i]} → {names[j]}: {off[i, j]} ({frac[i, j]:.0%} of {names[i]})" for i, j in pairs
    ] or ["- none"]

    preds = predictions[predictions["split"] == split]
    wrong = preds[preds["label"] != preds["pred"]]
    lines += ["", f"### Most confident mistakes ({len(wrong)} misclassified in all)", ""]
    if wrong.empty:
        lines.append("- none")
    else:
        probs = softmax(np.stack(wrong["logits"].to_numpy()).astype(np.float64))
        conf = probs.max(1)
        for i in np.argsort(-conf, kind="stable")[:n_files]:
            r = wrong.iloc[i]
            lines.append(
                f"- `{r.relpath}`: {names[r.label]} predicted as {names[r.pred]} ({conf[i]:.2f})"
            )
    lines += [
        "",
        f"![confusion matrix]({CONFUSION_PNG})",
        "",
        f"![confusion matrix, row-normalised]({CONFUSION_NORMALIZED_PNG})",
        "",
    ]
    return "\n".join(lines)
