"""Evaluate a multi-label bundle on the manifest's val split (and test split, when there is one).

``predictions.parquet`` rows: relpath, split, label (-1), labels (true class indices), pred
(class indices whose probability reaches ``evaluation.ovr_threshold``) and logits. Every value
in ``metrics.json`` can be recomputed from that file alone (:mod:`multilabel_metrics`).
The confusion table and plot are the co-occurrence matrix: images with true label i (rows)
for which j is predicted (columns), ``row_fraction`` = count / images with label i.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mtmc_pipeline.config import EvaluationConfig
from mtmc_pipeline.data.multilabel_splits import indicator
from mtmc_pipeline.evaluation.calibrate import check_finite
from mtmc_pipeline.evaluation.evaluate import (
    CONFUSION_PNG,
    EVAL_SPLITS,
    Evaluation,
    confusion_table,
    predict_logits,
)
from mtmc_pipeline.evaluation.multilabel_metrics import (
    co_occurrence,
    multilabel_metrics,
    multilabel_per_class,
    predicted_sets,
)
from mtmc_pipeline.plots import confusion_png
from mtmc_pipeline.runtime import Runtime
from mtmc_pipeline.training.loader import (
    CachedImageDataset,
    DecodedCache,
    Normalize,
    inference_loader,
)
from mtmc_pipeline.training.models import Preprocess, load_bundle

HEADLINE = ("mAP", "CP", "CR", "CF1", "OP", "OR", "OF1", "subset_accuracy", "hamming_loss")


def logit_threshold(probability: float) -> float:
    """The logit at which the sigmoid reaches ``probability``."""
    return float(np.log(probability / (1 - probability)))


def evaluate_multilabel(
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
    k = len(names)
    threshold = logit_threshold(config.ovr_threshold)
    pre = Preprocess.from_info(info)
    cache = DecodedCache(cache_root, pre.img_size, pre.interpolation)
    normalize = Normalize(pre, runtime.device, channels_last=True)
    rows = manifest[manifest["split"].isin(EVAL_SPLITS)].reset_index(drop=True)
    cache.ensure([str(task_dir / r) for r in rows["relpath"]], rows["content_hash"].tolist())

    by_split: dict[str, dict[str, Any]] = {}
    pc_parts, cm_parts, pred_parts, cms = [], [], [], {}
    for split in EVAL_SPLITS:
        part = rows[rows["split"] == split].reset_index(drop=True)
        if part.empty:
            continue
        ds = CachedImageDataset(cache, part["content_hash"], [-1] * len(part))
        loader = inference_loader(ds, runtime.inference_batch_size, runtime)
        logits = predict_logits(model, loader, normalize, runtime)
        check_finite(logits, f"{split} split", part["relpath"].tolist())
        truth = indicator(part["labels"], k)
        pred = predicted_sets(logits, threshold)
        m = multilabel_metrics(logits, truth, threshold)
        by_split[split] = {
            **m,
            "ovr_scores": "sigmoid",
            "ovr_threshold": config.ovr_threshold,
            "n": len(part),
        }
        pc = multilabel_per_class(logits, truth, names, threshold)
        pc.insert(0, "split", split)
        pc_parts.append(pc)
        cms[split] = co_occurrence(pred, truth)
        table = confusion_table(cms[split], names, split)
        support = truth.sum(0)[table["true_label"]]
        table["row_fraction"] = np.divide(
            table["count"], support, out=np.zeros(len(table)), where=support > 0
        )
        cm_parts.append(table)
        pred_parts.append(
            pd.DataFrame(
                {
                    "relpath": part["relpath"],
                    "split": split,
                    "label": -1,
                    "labels": [list(map(int, ix)) for ix in part["labels"]],
                    "pred": [np.flatnonzero(p).tolist() for p in pred],
                    "logits": list(logits.astype(np.float32)),
                }
            )
        )
    if not by_split:
        raise ValueError("the split manifest has no val or test images to evaluate on")
    primary = "test" if "test" in by_split else "val"
    metrics: dict[str, Any] = {
        **by_split[primary],
        "kind": "multilabel",
        "split": primary,
        "by_split": by_split,
        "model_fingerprint": info.get("fingerprint"),
    }
    predictions = pd.concat(pred_parts, ignore_index=True)
    per_class_df = pd.concat(pc_parts, ignore_index=True)
    title = f"Co-occurrence: true label (rows) x predicted label ({primary})"
    pngs = {CONFUSION_PNG: confusion_png(cms[primary], names, title)}
    report = report_markdown(metrics, per_class_df, predictions, names)
    return Evaluation(
        metrics, per_class_df, pd.concat(cm_parts, ignore_index=True), predictions, pngs, report
    )


def report_markdown(
    metrics: dict[str, Any],
    per_class_df: pd.DataFrame,
    predictions: pd.DataFrame,
    names: list[str],
    n_files: int = 10,
) -> str:
    """Headline metrics per split, the per-class table, the images with most wrong labels."""
    split = metrics["split"]
    lines = [f"## Multi-label evaluation on `{split}` ({metrics['n']} images)", ""]
    lines += [
        f"A class is predicted at sigmoid ≥ {metrics['ovr_threshold']} (C: mean over classes, "
        "O: over all (image, class) decisions). Thresholds per precision level are in the "
        "calibration report.",
        "",
        "| split | n | " + " | ".join(HEADLINE) + " |",
        "|---|---|" + "---|" * len(HEADLINE),
    ]
    for s, m in metrics["by_split"].items():
        lines.append(
            f"| {s} | {m['n']} | " + " | ".join(f"{m[key]:.4f}" for key in HEADLINE) + " |"
        )
    pc = per_class_df[per_class_df["split"] == split]
    lines += ["", "### Per class", ""]
    lines += ["| class | precision | recall | F1 | AP | support | predicted |"]
    lines += ["|---|---|---|---|---|---|---|"]
    lines += [
        f"| {r.class_name} | {r.precision:.3f} | {r.recall:.3f} | {r.f1:.3f} | "
        f"{r.average_precision:.3f} | {r.support} | {r.predicted} |"
        for r in pc.itertuples()
    ]
    preds = predictions[predictions["split"] == split]
    wrong = [
        (len(set(t) ^ set(p)), r, t, p)
        for r, t, p in zip(preds["relpath"], preds["labels"], preds["pred"], strict=True)
        if set(t) != set(p)
    ]
    wrong.sort(key=lambda w: -w[0])
    lines += ["", f"### Images with the most wrong labels ({len(wrong)} not exactly right)", ""]
    lines += [
        f"- `{r}`: true {{{', '.join(names[i] for i in t)}}}, "
        f"predicted {{{', '.join(names[i] for i in p)}}}"
        for _, r, t, p in wrong[:n_files]
    ] or ["- none"]
    lines += ["", f"![co-occurrence matrix]({CONFUSION_PNG})", ""]
    return "\n".join(lines)
