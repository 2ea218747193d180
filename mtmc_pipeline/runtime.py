"""Where and how tensors are computed: device, mixed precision, memory format, loader workers.

torch is imported only when a runtime is resolved: a stage that reuses its stored output
fingerprints the requested :class:`DeviceSettings` and never imports it.
"""

from __future__ import annotations

import contextlib
import fcntl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from mtmc_pipeline.errors import DeviceError

if TYPE_CHECKING:
    import torch

Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: full fp32
    channels_last: bool = False
    num_workers: int = 0

    @property
    def precision(self) -> str:
        import torch

        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        import torch

        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @contextlib.contextmanager
    def backward_kernels(self) -> Iterator[None]:
        """Where a backward pass runs. On a CPU under bf16 autocast: PyTorch's native kernels,
        not oneDNN's, whose bf16 convolution weight gradient (oneDNN 3.12 in torch 2.14) comes
        out wrong, at times NaN, for some small shapes (a stride-2 conv to a 1x1 map)."""
        import torch

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
            import torch

            name = f"{self.device} ({torch.cuda.get_device_name(self.device)})"
        return f"{name}, {self.precision}" + (", channels_last" if self.channels_last else "")


def _pick_device(device: str) -> torch.device:
    import torch

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
    import torch

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


@contextlib.contextmanager
def lease_gpu(count: int, lease_dir: Path, poll_s: float = 1.0) -> Iterator[int]:
    """The index of a GPU that no other process holds, held until the block ends.

    One lock file per GPU in ``lease_dir`` (``flock``: the kernel frees it when the holder
    dies). With a ``gpu`` pool limit of N on a machine with N GPUs, N concurrent trainings get
    N different GPUs; with more trainings than GPUs the extra ones wait for a free one.
    """
    lease_dir.mkdir(parents=True, exist_ok=True)
    while True:
        for index in range(count):
            handle = open(lease_dir / f"cuda{index}.lock", "a")  # noqa: SIM115 (held open)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                yield index
            finally:
                handle.close()  # closing releases the lock
            return
        time.sleep(poll_s)


@dataclass(frozen=True)
class DeviceSettings:
    """The device a user asked for, resolved (importing torch) only when tensors are computed."""

    device: str = "auto"
    precision: Precision = "auto"
    channels_last: bool = False
    num_workers: int = 0
    lease_dir: Path | None = None
    """With device auto and several CUDA devices: where each training leases its own GPU."""

    def resolve(self) -> Runtime:
        return resolve_runtime(self.device, self.precision, self.channels_last, self.num_workers)

    @contextlib.contextmanager
    def acquire(self) -> Iterator[Runtime]:
        """The resolved runtime; ``auto`` on several GPUs leases one no other training holds."""
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if self.device != "auto" or count < 2 or self.lease_dir is None:
            yield self.resolve()
            return
        with lease_gpu(count, self.lease_dir) as index:
            yield resolve_runtime(
                f"cuda:{index}", self.precision, self.channels_last, self.num_workers
            )
