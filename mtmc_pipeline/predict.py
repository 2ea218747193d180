"""Inference with calibrated confidences, from a task's model bundle and calibrator.

Loads only safetensors and JSON. Files that cannot be read become rows with an ``error``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mtmc_pipeline.artifacts import read_json
from mtmc_pipeline.calibrate import Calibrator
from mtmc_pipeline.data import Normalize, fit_square, load_rgb
from mtmc_pipeline.metrics import softmax
from mtmc_pipeline.models import Preprocess, load_bundle
from mtmc_pipeline.runtime import Runtime, resolve_runtime

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


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


class Predictor:
    """A loaded model + calibrator for one task."""

    def __init__(self, task_artifacts: Path, runtime: Runtime | None = None) -> None:
        self.runtime = runtime or resolve_runtime()
        self.model, info = load_bundle(task_artifacts / "model", self.runtime.device)
        self.class_names: list[str] = info["class_names"]
        self.pre = Preprocess(
            info["img_size"], tuple(info["mean"]), tuple(info["std"]), info["interpolation"]
        )
        self.calibrator = Calibrator.from_json(
            read_json(task_artifacts / "calibration" / "calibrator.json")
        )
        self.normalize = Normalize(self.pre, self.runtime.device, self.runtime.channels_last)

    @torch.no_grad()
    def logits(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch).permute(0, 3, 1, 2)
        with self.runtime.autocast():
            return self.model(self.normalize(x)).float().cpu().numpy()

    def predict(
        self, paths: Iterable[Path], min_precision: float = 0.9, batch_size: int = 64
    ) -> pd.DataFrame:
        rows: list[dict[str, object]] = []
        pending: list[tuple[int, np.ndarray]] = []

        def flush() -> None:
            if not pending:
                return
            logits = self.logits(np.stack([a for _, a in pending]))
            self._fill(rows, [i for i, _ in pending], logits, min_precision)
            pending.clear()

        for path in paths:
            rows.append({"path": str(path), "error": None})
            try:
                arr = fit_square(load_rgb(path), self.pre.img_size, self.pre.interpolation)
            except Exception as e:  # any unreadable file is a row, never a crash
                rows[-1]["error"] = f"{type(e).__name__}: {e}"
                continue
            pending.append((len(rows) - 1, arr))
            if len(pending) >= batch_size:
                flush()
        flush()
        return pd.DataFrame(rows, columns=list(_COLUMNS))

    def _fill(
        self,
        rows: list[dict[str, object]],
        idx: list[int],
        logits: np.ndarray,
        min_precision: float,
    ) -> None:
        probs = softmax(logits)
        tprobs = self.calibrator.temperature_probs(logits)
        conf = self.calibrator.precision_confidence(logits, "logit")
        top = logits.argmax(1)
        for k, i in enumerate(idx):
            c = int(top[k])
            confident = [self.class_names[j] for j in np.nonzero(conf[k] >= min_precision)[0]]
            rows[i].update(
                label=self.class_names[c],
                softmax_prob=float(probs[k, c]),
                temperature_prob=float(tprobs[k, c]),
                calibrated_confidence=float(conf[k, c]),
                labels_at_min_precision=";".join(confident),
            )


_COLUMNS = (
    "path",
    "label",
    "softmax_prob",
    "temperature_prob",
    "calibrated_confidence",
    "labels_at_min_precision",
    "error",
)
