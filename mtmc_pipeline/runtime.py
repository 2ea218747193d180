"""Where and how tensors are computed: device, mixed precision, memory format, loader workers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from mtmc_pipeline.errors import DeviceError

Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: full fp32
    channels_last: bool = False
    num_workers: int = 0

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @contextlib.contextmanager
    def backward_kernels(self) -> Iterator[None]:
        """Where a backward pass runs. On a CPU under bf16 autocast: PyTorch's native kernels,
        not oneDNN's, whose bf16 convolution weight gradient (oneDNN 3.12 in torch 2.14) comes
        out wrong, at times NaN, for some small shapes (a stride-2 conv to a 1x1 map)."""
        if self.device.type != "cpu" or self.amp_dtype != torch.bfloat16:
            yield
            return
        saved = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False
        try:
            yield
        finally:
            torch.backends.mkldnn.enabled = saved

    @property
    def inference_batch_size(self) -> int:
        """Images per forward pass when only predicting: CPUs are fastest on small batches
        (activations stay in cache), accelerators on large ones."""
        return 8 if self.device.type == "cpu" else 128

    def describe(self) -> str:
        name = self.device.type
        if self.device.type == "cuda":
            name = f"{self.device} ({torch.cuda.get_device_name(self.device)})"
        return f"{name}, {self.precision}" + (", channels_last" if self.channels_last else "")


def _pick_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise DeviceError(f"device={device!r}: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device={device!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device={device!r}: MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"device={device!r}: use auto, cpu, cuda, cuda:N or mps")
    return dev


def resolve_runtime(
    device: str = "auto",
    precision: Precision = "auto",
    channels_last: bool = False,
    num_workers: int = 0,
) -> Runtime:
    """Turn user settings into a concrete runtime; "auto" prefers CUDA and bf16 where it can."""
    if num_workers < 0:
        raise DeviceError(f"num_workers={num_workers}: use 0 (main process) or more")
    dev = _pick_device(device)
    if precision == "auto":
        if dev.type == "cuda":
            amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            amp = None  # CPU autocast is rarely faster; keep fp32
    elif precision == "fp32":
        amp = None
    elif precision == "bf16":
        amp = torch.bfloat16
    elif precision == "fp16":
        if dev.type == "cpu":
            raise DeviceError("precision='fp16' needs a GPU; use bf16 or fp32 on the CPU")
        amp = torch.float16
    else:
        raise DeviceError(f"precision={precision!r}: use auto, fp32, bf16 or fp16")
    return Runtime(dev, amp, channels_last, num_workers)
