"""Calibrated predictions for every member task of a shared-backbone group, one pass per batch.

The joint bundle (``shared/<group>/model``) runs the backbone once and every head on its
feature; each member's calibrator turns its head's logits into confidences exactly as
:class:`~mtmc_pipeline.serving.predict.Predictor` does for that task alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mtmc_pipeline.artifacts import fingerprint, group_dir, read_json
from mtmc_pipeline.runtime import Runtime, resolve_runtime
from mtmc_pipeline.serving.predict import COLUMNS, Predictor, StaleCalibratorError, decoded_batches
from mtmc_pipeline.training.loader import Normalize
from mtmc_pipeline.training.models import MODEL_FILE
from mtmc_pipeline.training.multitask import load_joint_bundle

GROUP_COLUMNS = ("task", *COLUMNS)


class GroupPredictor:
    """The joint model of group ``group`` under ``artifacts_root`` and its members' calibrators."""

    def __init__(
        self,
        artifacts_root: Path,
        group: str,
        runtime: Runtime | None = None,
        decode_threads: int = 4,
    ) -> None:
        self.runtime = runtime or resolve_runtime()
        self.decode_threads = decode_threads
        directory = group_dir(artifacts_root, group) / "model"
        self.model, info = load_joint_bundle(directory, self.runtime.device)
        self.tasks = [t["task"] for t in info["tasks"]]
        # each member's Predictor checks its calibrator against the member's bundle ...
        self.members = [
            Predictor(artifacts_root / t, self.runtime, decode_threads) for t in self.tasks
        ]
        for task, member in zip(self.tasks, self.members, strict=True):
            del member.model  # ... whose weights are the joint model's head: not needed twice
            task_model = artifacts_root / task / "model" / MODEL_FILE
            if read_json(task_model)["fingerprint"] != fingerprint(info["fingerprint"], task):
                raise StaleCalibratorError(
                    f"{task_model} was not written with {directory / MODEL_FILE} (trained alone "
                    f"since?): materialize the group's model and its members' evaluation and "
                    "calibration again"
                )
        self.pre = self.members[0].pre
        self.normalize = Normalize(self.pre, self.runtime.device, channels_last=True)

    @torch.no_grad()
    def logits(self, batch: np.ndarray) -> list[np.ndarray]:
        """Every head's raw logits of a uint8 NxHxWx3 batch, from one backbone pass."""
        x = torch.from_numpy(batch).permute(0, 3, 1, 2)
        with self.runtime.autocast():
            return [out.float().cpu().numpy() for out in self.model(self.normalize(x))]

    def predict(
        self, paths: Iterable[Path], min_precision: float = 0.9, batch_size: int | None = None
    ) -> pd.DataFrame:
        """One row per path and member task, path by path (columns: ``GROUP_COLUMNS``)."""
        for member in self.members:
            member.check_min_precision(min_precision)
        rows: list[dict[str, object]] = []
        size = batch_size or self.runtime.inference_batch_size
        for chunk, decoded in decoded_batches(paths, self.pre, size, self.decode_threads):
            good = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
            described: list[list[dict[str, object]]] = []
            if good:
                heads = self.logits(np.stack([decoded[i] for i in good]))
                described = [
                    m._describe(logits, min_precision, use_lower_bound=False)
                    for m, logits in zip(self.members, heads, strict=True)
                ]
            for i, (path, d) in enumerate(zip(chunk, decoded, strict=True)):
                for k, task in enumerate(self.tasks):
                    row: dict[str, object] = {"task": task, "path": str(path), "error": None}
                    if isinstance(d, str):
                        row["error"] = d
                    else:
                        row.update(described[k][good.index(i)])
                    rows.append(row)
        return pd.DataFrame(rows, columns=list(GROUP_COLUMNS))
