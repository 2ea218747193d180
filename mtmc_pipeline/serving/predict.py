"""Inference with calibrated confidences, from a task's model bundle and calibrator.

Loads only safetensors and JSON (nothing is unpickled). Files that cannot be read become rows
with an ``error``. A few threads decode the next batch (Pillow releases the GIL while it
decodes) while the model runs on the current one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mtmc_pipeline.artifacts import read_json, read_parquet
from mtmc_pipeline.evaluation.calibrate import CALIBRATOR_FILE, Calibrator
from mtmc_pipeline.evaluation.metrics import softmax
from mtmc_pipeline.evaluation.multilabel_calibrate import MultiLabelCalibrator
from mtmc_pipeline.evaluation.openset import OpenSet
from mtmc_pipeline.runtime import Runtime, resolve_runtime
from mtmc_pipeline.training.loader import Normalize, fit_square, load_rgb
from mtmc_pipeline.training.models import MODEL_FILE, Preprocess, load_bundle, logits_fp32

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
COLUMNS = (
    "path",
    "label",
    "softmax_prob",
    "temperature_prob",
    "calibrated_confidence",
    "precision_lower",
    "labels_at_min_precision",
    "confidences_at_min_precision",
    "unknown_score",
    "unknown",
    "error",
)


class StaleCalibratorError(ValueError):
    """The calibrator was fitted for another model than the one next to it."""


def expand_inputs(inputs: Iterable[str | Path]) -> Iterator[Path]:
    """Files as given; directories walked recursively for image extensions, sorted."""
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                        yield Path(root) / name
        else:
            yield path


def _batches(paths: Iterable[Path], size: int) -> Iterator[tuple[Path, ...]]:
    it = iter(paths)
    while chunk := tuple(islice(it, size)):
        yield chunk


def decode_image(path: Path, pre: Preprocess) -> np.ndarray | str:
    """The model-sized HxWx3 image, or the reason it cannot be read."""
    try:
        return fit_square(load_rgb(path), pre.img_size, pre.interpolation)
    except Exception as e:  # any unreadable file is a row, never a crash
        return f"{type(e).__name__}: {e}"


def decoded_batches(
    paths: Iterable[Path], pre: Preprocess, batch_size: int, threads: int
) -> Iterator[tuple[tuple[Path, ...], list[np.ndarray | str]]]:
    """Batches of paths with their decoded images (or why not); a thread pool decodes the
    next batch while the caller runs the model on this one."""
    chunks = _batches(paths, batch_size)
    with ThreadPoolExecutor(threads) as pool:

        def submit(chunk: tuple[Path, ...] | None) -> list[Future[np.ndarray | str]]:
            return [pool.submit(decode_image, p, pre) for p in chunk or ()]

        chunk = next(chunks, None)
        pending = submit(chunk)
        while chunk:
            decoded = [f.result() for f in pending]
            following = next(chunks, None)
            pending = submit(following)
            yield chunk, decoded
            chunk = following


class Predictor:
    """A loaded model + calibrator for one task (``<artifacts>/<task>``)."""

    def __init__(
        self,
        task_artifacts: Path,
        runtime: Runtime | None = None,
        decode_threads: int = 4,
        unknown_score: str = "energy",
        false_reject_rate: float = 0.05,
    ) -> None:
        self.runtime = runtime or resolve_runtime()
        self.decode_threads = decode_threads
        self.model, info = load_bundle(task_artifacts / "model", self.runtime.device)
        self.class_names: list[str] = info["class_names"]
        self.pre = Preprocess.from_info(info)
        path = task_artifacts / "calibration" / CALIBRATOR_FILE
        data = read_json(path)
        self.multilabel = data.get("kind") == "multilabel"
        loader = MultiLabelCalibrator if self.multilabel else Calibrator
        self.calibrator = loader.from_json(data, str(path))
        model_fp = info.get("fingerprint")
        if self.calibrator.class_names != self.class_names or (
            self.calibrator.model_fingerprint not in (None, model_fp)
        ):
            raise StaleCalibratorError(
                f"{path} was fitted for another model than {task_artifacts / 'model' / MODEL_FILE}"
                " (retrained since?): materialize the task's evaluation and calibration again"
            )
        self.normalize = Normalize(self.pre, self.runtime.device, channels_last=True)
        preds = task_artifacts / "evaluation" / "predictions.parquet"
        self.openset = (  # fitted like the export stage's: on the evaluation's val logits
            OpenSet.from_predictions(
                read_parquet(preds), unknown_score, false_reject_rate, str(preds)
            )
            if preds.is_file()
            else None
        )

    @torch.no_grad()
    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw logits (N x C) of a uint8 NxHxWx3 batch."""
        x = torch.from_numpy(batch).permute(0, 3, 1, 2)
        return logits_fp32(self.model, self.normalize(x), self.runtime).cpu().numpy()

    def check_min_precision(self, min_precision: float) -> None:
        top = max(self.calibrator.levels)
        if not 0 < min_precision <= top:
            raise ValueError(
                f"--min-precision {min_precision}: must be above 0 and at most the highest "
                f"calibrated level, {top} (calibration.levels)"
            )

    def predict(
        self,
        paths: Iterable[Path],
        min_precision: float = 0.9,
        batch_size: int | None = None,
        use_lower_bound: bool = False,
    ) -> pd.DataFrame:
        """One row per path, in order (columns: ``COLUMNS``).

        ``use_lower_bound``: a class is listed when the 95% lower bound of its threshold's
        precision, not the point estimate, reaches ``min_precision``. The next batch is decoded
        by the thread pool while the model runs on this one. Batches default to the runtime's
        ``inference_batch_size``.
        """
        self.check_min_precision(min_precision)
        if use_lower_bound and self.calibrator.precision_lower is None:
            raise ValueError(
                "--use-lower-bound: this calibrator.json has no precision_lower; "
                "materialize the task's calibration again"
            )
        rows: list[dict[str, object]] = []
        size = batch_size or self.runtime.inference_batch_size
        for chunk, decoded in decoded_batches(paths, self.pre, size, self.decode_threads):
            rows += self._rows(chunk, decoded, min_precision, use_lower_bound)
        return pd.DataFrame(rows, columns=list(COLUMNS))

    def _rows(
        self,
        chunk: tuple[Path, ...],
        decoded: list[np.ndarray | str],
        min_precision: float,
        use_lower_bound: bool,
    ) -> list[dict[str, object]]:
        rows: list[dict[str, object]] = [
            {"path": str(p), "error": d if isinstance(d, str) else None}
            for p, d in zip(chunk, decoded, strict=True)
        ]
        good = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
        if good:
            logits = self.logits(np.stack([decoded[i] for i in good]))
            described = self._describe(logits, min_precision, use_lower_bound)
            for i, values in zip(good, described, strict=True):
                rows[i].update(values)
        return rows

    def _describe(
        self, logits: np.ndarray, min_precision: float, use_lower_bound: bool
    ) -> list[dict[str, object]]:
        return describe(
            logits,
            self.class_names,
            self.calibrator,
            self.openset,
            min_precision,
            use_lower_bound,
            self.multilabel,
        )


def describe(
    logits: np.ndarray,
    class_names: list[str],
    calibrator: Calibrator,
    openset: OpenSet | None,
    min_precision: float,
    use_lower_bound: bool = False,
    multilabel: bool = False,
) -> list[dict[str, object]]:
    """Per image (``mtmc predict`` and ``mtmc serve`` alike): the top class and its softmax /
    temperature / calibrated confidences, every class whose calibrated confidence (or, with
    ``use_lower_bound``, its 95% lower bound) reaches ``min_precision``, and the open-set
    score (None without a rejector). Multi-label: the classes at ``min_precision`` are the
    predicted label set, ``temperature_prob`` is the Platt-scaled sigmoid and there is no
    softmax."""
    probs = None if multilabel else softmax(logits)
    tprobs = (
        calibrator.probabilities(logits)
        if isinstance(calibrator, MultiLabelCalibrator)
        else calibrator.temperature_probs(logits)
    )
    conf = calibrator.precision_confidence(logits, "logit")
    lower = (
        calibrator.lower_bound_confidence(logits, "logit")
        if calibrator.precision_lower is not None
        else np.full(conf.shape, np.nan)
    )
    select = lower if use_lower_bound else conf
    unknown = openset.scores(logits) if openset else None
    out = []
    for k, c in enumerate(logits.argmax(1)):
        confident = np.nonzero(select[k] >= min_precision)[0]
        confident = confident[np.argsort(-conf[k, confident], kind="stable")]
        out.append(
            {
                "label": class_names[c],
                "softmax_prob": None if probs is None else float(probs[k, c]),
                "temperature_prob": float(tprobs[k, c]),
                "calibrated_confidence": float(conf[k, c]),
                "precision_lower": float(lower[k, c]),
                "labels_at_min_precision": [class_names[j] for j in confident],
                "confidences_at_min_precision": [float(conf[k, j]) for j in confident],
                "unknown_score": None if unknown is None else float(unknown[k]),
                "unknown": None if unknown is None else bool(unknown[k] > openset.threshold),
            }
        )
    return out
