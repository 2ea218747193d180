"""Export a model bundle to a self-describing ONNX file, check its parity, measure its speed.

The graph takes what :func:`~mtmc_pipeline.serving.predict.decode_image` makes: uint8 RGB
images, N x H x W x 3, already resized (short side to ``img_size``, centre crop); the
normalisation by mean and std is inside the graph. Its output is the raw logits, N x C. The
batch axis is dynamic. ``torch.onnx.export(dynamo=True)`` is used: it traces with
``torch.export`` and translates with onnxscript (the TorchScript exporter is deprecated).

Everything a runtime without this project needs (class names, preprocessing, temperature,
calibrator, open-set threshold) is in the ONNX file's ``metadata_props`` under ``mtmc`` and in
the sidecar ``export.json`` beside it; the sidecar also holds the file's SHA-256, so a reader
can tell a complete file from one being replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from mtmc_pipeline.artifacts import SIDECAR_FILE, read_json
from mtmc_pipeline.training.models import Preprocess

TORCH_EXPORT_FILE = "model.pt2"
METADATA_KEY = "mtmc"
INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"


class PixelsToLogits(nn.Module):
    """The network behind its normalisation: uint8 NHWC images in, logits out."""

    def __init__(self, model: nn.Module, pre: Preprocess) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(pre.mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(pre.std).view(1, 3, 1, 1) * 255)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).float()
        return self.model((x - self.mean) / self.std)


def preprocessing(pre: Preprocess) -> dict[str, Any]:
    """How to turn an image file into the graph's input, for a reader of the metadata."""
    return {
        "input": INPUT_NAME,
        "dtype": "uint8",
        "layout": "NHWC, RGB",
        "img_size": pre.img_size,
        "resize": "short side to img_size, then centre crop (PIL ImageOps.fit)",
        "interpolation": pre.interpolation,
        "mean": list(pre.mean),
        "std": list(pre.std),
        "normalisation": "(pixels - 255 * mean) / (255 * std), inside the graph",
        "output": OUTPUT_NAME,
    }


def _example(pre: Preprocess, n: int = 2) -> torch.Tensor:
    return torch.zeros((n, pre.img_size, pre.img_size, 3), dtype=torch.uint8)


def _batch_dim() -> dict[str, dict[int, Any]]:
    return {"pixels": {0: torch.export.Dim("batch", min=1)}}


def export_onnx(module: PixelsToLogits, pre: Preprocess, path: Path, meta: dict[str, Any]) -> str:
    """Write the ONNX file with ``meta`` (JSON) in its metadata; return its SHA-256."""
    program = torch.onnx.export(
        module.eval(),
        (_example(pre),),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=_batch_dim(),
        dynamo=True,
        verbose=False,
    )
    program.model.metadata_props[METADATA_KEY] = json.dumps(meta, ensure_ascii=False)
    program.save(str(path))
    return sha256_of(path)


def export_torch_program(module: PixelsToLogits, pre: Preprocess, path: Path) -> None:
    """The same graph as a ``torch.export`` program (``torch.export.load`` reads it back)."""
    program = torch.export.export(module.eval(), (_example(pre),), dynamic_shapes=_batch_dim())
    torch.export.save(program, str(path))


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def session(model_bytes: bytes | str, threads: int = 0) -> ort.InferenceSession:
    """A CPU onnxruntime session (``threads`` 0: onnxruntime's default, one per core)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


class ExportError(ValueError):
    """An export directory is missing, incomplete or inconsistent."""


@dataclass(frozen=True)
class OnnxModel:
    """A loaded export: its sidecar and an onnxruntime session of exactly the file it names."""

    directory: Path
    info: dict[str, Any]
    session: ort.InferenceSession

    @classmethod
    def load(cls, directory: Path, threads: int = 0) -> OnnxModel:
        """Read the sidecar, then the ONNX bytes, and check they belong together.

        The bytes are read once and hashed, so a file replaced while it is read is refused
        rather than half loaded; the caller can retry.
        """
        try:
            info = read_json(directory / SIDECAR_FILE)
            data = (directory / info["onnx_file"]).read_bytes()
        except (OSError, ValueError, KeyError) as e:
            raise ExportError(f"{directory}: no complete export ({type(e).__name__}: {e})") from e
        if hashlib.sha256(data).hexdigest() != info.get("onnx_sha256"):
            raise ExportError(f"{directory / info['onnx_file']}: SHA-256 differs from the sidecar")
        return cls(directory, info, session(data, threads))

    @property
    def preprocess(self) -> Preprocess:
        p = self.info["preprocessing"]
        return Preprocess(p["img_size"], tuple(p["mean"]), tuple(p["std"]), p["interpolation"])

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """Logits (float32, N x C) of a uint8 N x H x W x 3 batch."""
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]


def batched(
    fn: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray, size: int = 64
) -> np.ndarray:
    """``fn`` over ``pixels`` in batches of ``size``, concatenated."""
    parts = [fn(pixels[i : i + size]) for i in range(0, len(pixels), size)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


@torch.no_grad()
def torch_logits(module: PixelsToLogits, pixels: np.ndarray) -> np.ndarray:
    return batched(lambda b: module(torch.from_numpy(b)).float().numpy(), pixels)


def parity(
    torch_out: np.ndarray, onnx_out: np.ndarray, relpaths: Sequence[str], atol: float
) -> dict[str, Any]:
    """timm's ``onnx_validate --check-forward`` criteria: max |difference| and same top-1."""
    diff = np.abs(torch_out.astype(np.float64) - onnx_out.astype(np.float64))
    top1 = torch_out.argmax(1) == onnx_out.argmax(1)
    per_image = diff.max(1) if len(diff) else np.zeros(0)
    worst = int(per_image.argmax()) if len(per_image) else None
    max_diff = float(per_image.max()) if len(per_image) else 0.0
    return {
        "images": len(torch_out),
        "max_abs_diff": max_diff,
        "atol": atol,
        "top1_agree": int(top1.sum()),
        "top1_disagree": [relpaths[i] for i in np.nonzero(~top1)[0][:20]],
        "worst_image": relpaths[worst] if worst is not None else None,
        "passed": bool(len(torch_out) > 0 and max_diff <= atol and top1.all()),
    }


def images_per_second(
    fn: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray, batch: int, seconds: float
) -> float:
    """Throughput of ``fn`` on batches of ``batch`` images, for about ``seconds`` (one warm-up)."""
    x = np.ascontiguousarray(np.resize(pixels, (batch, *pixels.shape[1:])))
    fn(x)
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or done == 0:
        fn(x)
        done += batch
    return done / elapsed


def speed(
    module: PixelsToLogits, onnx: OnnxModel, pixels: np.ndarray, seconds: float
) -> dict[str, Any]:
    """onnxruntime against PyTorch images/s on this machine's CPU, same images, same batch."""
    batch = min(32, len(pixels))
    threads = torch.get_num_threads()
    with torch.no_grad():
        torch_rate = images_per_second(
            lambda b: module(torch.from_numpy(b)).numpy(), pixels, batch, seconds
        )
    onnx_rate = images_per_second(onnx.logits, pixels, batch, seconds)
    return {
        "batch": batch,
        "cpu_threads": threads,
        "cpus": os.cpu_count(),
        "onnxruntime_images_per_s": round(onnx_rate, 1),
        "pytorch_images_per_s": round(torch_rate, 1),
        "speedup": round(onnx_rate / torch_rate, 2),
    }
