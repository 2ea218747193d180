"""Export stage: the calibrated model as a self-describing ONNX file, promoted only when the
retrain does not regress against the one being served.

``T/export/`` is what ``mtmc serve`` serves. A candidate is built in full (ONNX, parity on every
val image, speed, open-set threshold, promotion decision) before anything is swapped in. It
replaces ``T/export/`` only when parity holds and it is promoted; otherwise it is kept in
``T/export_rejected/`` for inspection, and ``T/export/`` (the previous model) stays served.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from mtmc_pipeline import artifacts as af
from mtmc_pipeline.artifacts import (
    MODEL_FILE,
    ONNX_FILE,
    SIDECAR_FILE,
    TaskArtifacts,
    stored_fingerprint,
)
from mtmc_pipeline.config import ExportConfig, PromotionConfig
from mtmc_pipeline.evaluation.calibrate import CALIBRATOR_FILE
from mtmc_pipeline.evaluation.openset import OpenSet
from mtmc_pipeline.evaluation.promote import Promotion, compare, map_predictions

if TYPE_CHECKING:
    from mtmc_pipeline.serving.export import OnnxModel
    from mtmc_pipeline.training.models import Preprocess

from mtmc_pipeline.stages.common import (
    CheckOutcome,
    StageResult,
    record_elapsed,
    stage_fingerprint,
    upstream_fingerprint,
)


def _pixels(rows: pd.DataFrame, task_dir: Path, cache_root: Path, pre: Preprocess) -> np.ndarray:
    """The model-sized uint8 images of ``rows`` (decoded once into the shared cache)."""
    from mtmc_pipeline.training.loader import DecodedCache

    cache = DecodedCache(cache_root, pre.img_size, pre.interpolation)
    hashes = rows["content_hash"].tolist()
    cache.ensure([str(task_dir / r) for r in rows["relpath"]], hashes)
    shape = (0, pre.img_size, pre.img_size, 3)
    return np.stack([cache.load(h) for h in hashes]) if hashes else np.zeros(shape, np.uint8)


def fit_openset(art: TaskArtifacts, config: ExportConfig) -> OpenSet:
    """The unknown threshold, fitted on the val logits of known classes (evaluation's)."""
    path = art.evaluation_dir / "predictions.parquet"
    preds = af.read_parquet(path)
    return OpenSet.from_predictions(
        preds, config.unknown_score, config.false_reject_rate, str(path)
    )


def _promotion(
    served: OnnxModel | None,
    info: dict[str, Any],
    rows: pd.DataFrame,
    candidate_pred: np.ndarray,
    served_pixels: np.ndarray | None,
    images: str,
    config: PromotionConfig,
) -> Promotion:
    from mtmc_pipeline.serving.export import batched

    if served is None:
        return Promotion(True, "nothing is served yet: the first export is promoted")
    if served.info.get("model_fingerprint") == info.get("fingerprint"):
        return Promotion(True, "the served export has the same model (re-export)")
    assert served_pixels is not None
    served_pred = map_predictions(
        batched(served.logits, served_pixels).argmax(1),
        served.info["class_names"],
        info["class_names"],
    )
    return compare(
        rows["label"].to_numpy(),
        candidate_pred,
        served_pred,
        info["class_names"],
        config.macro_f1_tolerance,
        config.recall_tolerance,
        images,
    )


def _served(art: TaskArtifacts) -> OnnxModel | None:
    from mtmc_pipeline.serving.export import ExportError, OnnxModel

    if not (art.export_dir / SIDECAR_FILE).is_file():
        return None
    try:
        return OnnxModel.load(art.export_dir)
    except ExportError:
        return None  # an unreadable export cannot be what anyone is served


def build_export(
    task_dir: Path, art: TaskArtifacts, config: ExportConfig, promo: PromotionConfig, fp: str
) -> dict[str, Any]:
    """Build the candidate export in a staging directory and swap it into place if it may be.

    Returns the sidecar written (``promoted`` says where it went). The only part of the stage
    that imports torch: a reused export does not.
    """
    import torch

    from mtmc_pipeline.serving.export import (
        TORCH_EXPORT_FILE,
        OnnxModel,
        PixelsToLogits,
        batched,
        export_onnx,
        export_torch_program,
        parity,
        preprocessing,
        speed,
        torch_logits,
    )
    from mtmc_pipeline.training.models import Preprocess, load_bundle

    torch.manual_seed(0)
    model, info = load_bundle(art.model_dir, "cpu")
    pre = Preprocess.from_info(info)
    module = PixelsToLogits(model, pre).eval()
    manifest = af.read_parquet(art.splits)
    cache_root = art.work_dir / "cache"
    val = manifest[manifest["split"] == "val"].reset_index(drop=True)
    held = manifest[manifest["split"] == "test"].reset_index(drop=True)
    images = f"test ({len(held)} images)"
    if held.empty:
        held, images = val, f"val ({len(val)} images; no test split)"
    calibrator = af.read_json(art.calibration_dir / CALIBRATOR_FILE)
    calibrator.pop("fingerprint", None)
    openset = fit_openset(art, config)
    meta = {
        "task": art.task,
        "arch": info["arch"],
        "class_names": info["class_names"],
        "model_fingerprint": info.get("fingerprint"),
        "preprocessing": preprocessing(pre),
        "temperature": calibrator["temperature"],
        "calibrator": calibrator,
        "openset": openset.to_json(),
    }
    served = _served(art)
    served_pixels = None
    if served is not None and served.info.get("model_fingerprint") != info.get("fingerprint"):
        served_pixels = _pixels(held, task_dir, cache_root, served.preprocess)
    val_pixels = _pixels(val, task_dir, cache_root, pre)
    held_pixels = val_pixels if held is val else _pixels(held, task_dir, cache_root, pre)

    with tempfile.TemporaryDirectory(prefix=".export.", dir=art.dir) as staging:
        tmp = Path(staging)
        sha = export_onnx(module, pre, tmp / ONNX_FILE, meta)
        if config.torch_export:
            export_torch_program(module, pre, tmp / TORCH_EXPORT_FILE)
        sidecar = {**meta, "onnx_file": ONNX_FILE, "onnx_sha256": sha, "fingerprint": fp}
        af.write_json(tmp / SIDECAR_FILE, sidecar)
        onnx = OnnxModel.load(tmp)
        checked = parity(
            torch_logits(module, val_pixels),
            batched(onnx.logits, val_pixels),
            val["relpath"].tolist(),
            config.parity_atol,
        )
        decision = _promotion(
            served,
            info,
            held,
            batched(onnx.logits, held_pixels).argmax(1),
            served_pixels,
            images,
            promo,
        )
        promoted = checked["passed"] and (decision.promoted or promo.force)
        sidecar |= {
            "parity": checked,
            "speed": speed(module, onnx, val_pixels, config.speed_seconds),
            "promotion": {
                "promoted": promoted,
                "passed": decision.promoted,
                "forced": promo.force and not decision.promoted,
                "reason": decision.reason,
                **decision.summary,
            },
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        af.write_json(tmp / SIDECAR_FILE, sidecar)
        if not decision.table.empty:
            af.write_parquet(tmp / "promotion.parquet", decision.table)
        final = art.export_dir if promoted else art.rejected_export_dir
        with af.atomic_dir(final) as swap:  # swapped in whole: a reader sees old or new
            for item in sorted(tmp.iterdir()):
                item.rename(swap / item.name)
    if promoted:
        shutil.rmtree(art.rejected_export_dir, ignore_errors=True)
    return sidecar


def run_export(
    task_dir: Path, art: TaskArtifacts, config: ExportConfig, promo: PromotionConfig
) -> StageResult:
    start = time.perf_counter()
    fp = stage_fingerprint(
        "export",
        upstream_fingerprint(art.model_dir / MODEL_FILE, "model"),
        upstream_fingerprint(art.splits, "splits"),
        upstream_fingerprint(art.calibration_dir / "temperature.json", "calibration"),
        upstream_fingerprint(art.evaluation_dir / "metrics.json", "evaluation"),
        config.model_dump(),
        promo.model_dump(),
    )
    reused = None
    for where in (art.export_dir, art.rejected_export_dir):
        if stored_fingerprint(where / SIDECAR_FILE) == fp:
            reused = af.read_json(where / SIDECAR_FILE)
    sidecar = reused or build_export(task_dir, art, config, promo, fp)
    promotion, checked = sidecar["promotion"], sidecar["parity"]
    where = art.export_dir if promotion["promoted"] else art.rejected_export_dir
    md: dict[str, Any] = {
        "promoted": promotion["promoted"],
        "promotion": promotion["reason"],
        "parity_max_abs_diff": checked["max_abs_diff"],
        "parity_images": checked["images"],
        "top1_agree": checked["top1_agree"],
        **{k: v for k, v in sidecar["speed"].items() if k.endswith("_per_s")},
        "onnx_speedup": sidecar["speed"]["speedup"],
        "unknown_threshold": sidecar["openset"]["threshold"],
        "unknown_score": sidecar["openset"]["kind"],
        "path": str(where / ONNX_FILE),
    }
    record_elapsed(md, start)
    return StageResult(fp, reused is not None, md, export_checks(sidecar))


def export_checks(sidecar: dict[str, Any]) -> dict[str, CheckOutcome]:
    checked, promotion = sidecar["parity"], sidecar["promotion"]
    return {
        "onnx_parity": CheckOutcome(
            checked["passed"],
            f"onnxruntime vs PyTorch on {checked['images']} val images: max |logit difference| "
            f"{checked['max_abs_diff']:.2e} (export.parity_atol {checked['atol']:g}), same top-1 "
            f"on {checked['top1_agree']}",
            "error",
            {k: checked[k] for k in ("max_abs_diff", "top1_disagree", "worst_image")},
        ),
        "no_regression": CheckOutcome(
            promotion["passed"] or promotion["forced"],
            ("forced by promotion.force: " if promotion["forced"] else "")
            + promotion["reason"]
            + ("" if promotion["promoted"] else "; the previous export stays served"),
            "warn" if promotion["forced"] else "error",
        ),
    }
