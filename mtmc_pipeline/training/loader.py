"""From manifest rows to batches: decoding, the decoded-image cache, augmentation.

Every usable image is decoded once per (content hash, size) into a small uint8 ``.npy`` file
under the artifact root, so later epochs and later retrains never decode a JPEG again.
Small data sets are then held in memory as one uint8 tensor; large ones are read per item.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from mtmc_pipeline.runtime import Runtime
from mtmc_pipeline.training.models import Preprocess

IN_MEMORY_LIMIT_BYTES = 2 * 1024**3
DECODE_THREADS = 8
"""Decoding threads at most (fewer on fewer cores)."""
_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def load_rgb(path: str | os.PathLike[str] | IO[bytes]) -> Image.Image:
    """Open any usable image (a path or a binary file object) as upright 8-bit RGB (EXIF
    rotation, CMYK, 16-bit, alpha)."""
    with Image.open(path) as im:
        im.seek(0)  # animated images: the first frame
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            im = Image.fromarray(_to_uint8(np.asarray(im, dtype=np.float64)), "L")
        has_alpha = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
        if has_alpha:
            rgba = im.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im = Image.alpha_composite(canvas, rgba)
        return im.convert("RGB")


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """A 16-bit, int32 or float image as 8 bits: [min(0, lowest), highest] onto [0, 255], so
    negative values (a float TIFF in [-1, 1]) keep their order; NaN becomes the lowest."""
    finite = arr[np.isfinite(arr)]
    low = min(float(finite.min()), 0.0) if finite.size else 0.0
    high = float(finite.max()) if finite.size else 0.0
    scaled = (np.nan_to_num(arr, nan=low, posinf=high, neginf=low) - low) / max(high - low, 1e-12)
    return np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def fit_square(im: Image.Image, size: int, interpolation: str = "bilinear") -> np.ndarray:
    """Resize the short side to ``size`` and centre-crop: an HxWx3 uint8 array."""
    resample = _RESAMPLE.get(interpolation, Image.BILINEAR)
    return np.asarray(ImageOps.fit(im, (size, size), method=resample), dtype=np.uint8)


class DecodedCache:
    """``root/<size>/<hash[:2]>/<hash>.npy`` files of decoded, resized images."""

    def __init__(self, root: Path, size: int, interpolation: str = "bilinear") -> None:
        self.dir = root / f"{size}px-{interpolation}"
        self.size = size
        self.interpolation = interpolation

    def path(self, content_hash: str) -> Path:
        return self.dir / content_hash[:2] / f"{content_hash}.npy"

    def ensure(self, paths: Sequence[str], hashes: Sequence[str]) -> int:
        """Decode the images not yet cached; return how many were decoded."""
        todo = [(p, h) for p, h in zip(paths, hashes, strict=True) if not self.path(h).exists()]
        todo = list(dict((h, p) for p, h in todo).items())  # one decode per content hash
        if not todo:
            return 0
        jobs = [(p, str(self.path(h)), self.size, self.interpolation) for h, p in todo]
        # Threads, not processes: Pillow releases the GIL while it decodes and resizes, and a
        # process pool started inside a Dagster step (a forkserver child, so its pools start
        # by forkserver too) re-imports torch in every worker: ~10 s before the first image.
        with ThreadPoolExecutor(max_workers=min(DECODE_THREADS, os.cpu_count() or 1)) as pool:
            list(pool.map(_decode_to_cache, jobs))
        return len(jobs)

    def load(self, content_hash: str) -> np.ndarray:
        return np.load(self.path(content_hash))


def _decode_to_cache(job: tuple[str, str, int, str]) -> None:
    src, dst, size, interpolation = job
    arr = fit_square(load_rgb(src), size, interpolation)
    out = Path(dst)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, out)


class CachedImageDataset(Dataset):
    """(uint8 CHW tensor, label) pairs read from the decoded cache.

    Augmentation is per batch on the device; ``transform`` is an optional per-image step on
    the uint8 tensor (RandAugment), run in the loader's workers.
    """

    def __init__(
        self,
        cache: DecodedCache,
        hashes: Sequence[str],
        labels: Sequence[int],
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.cache = cache
        self.transform = transform
        self.hashes = list(hashes)
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        shape = (len(self.hashes), 3, cache.size, cache.size)
        self.images: torch.Tensor | None = None
        if self.hashes and math.prod(shape) <= IN_MEMORY_LIMIT_BYTES:
            self.images = torch.empty(shape, dtype=torch.uint8)
            for i, h in enumerate(self.hashes):  # HWC file -> CHW slot, one copy per image
                self.images[i] = torch.from_numpy(cache.load(h)).permute(2, 0, 1)

    def __len__(self) -> int:
        return len(self.hashes)

    def image(self, i: int) -> torch.Tensor:
        if self.images is not None:
            return self.images[i]
        return torch.from_numpy(self.cache.load(self.hashes[i])).permute(2, 0, 1)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.image(i)
        return (self.transform(image) if self.transform else image), self.labels[i]


def inference_loader(dataset: Dataset, batch_size: int, runtime: Runtime) -> DataLoader:
    """Batches in the dataset's order, for prediction. Built once, it keeps its worker
    processes between passes (validation runs every epoch); batches are pinned for a GPU."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=runtime.num_workers,
        pin_memory=runtime.device.type == "cuda",
        persistent_workers=runtime.num_workers > 0,
    )


class Normalize:
    """Batch in [0, 255] -> normalised float batch on the target device, once per batch."""

    def __init__(self, pre: Preprocess, device: torch.device, channels_last: bool) -> None:
        self.mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1) * 255
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def to_device(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 batch -> float batch in [0, 255] on the device."""
        return batch.to(self.device, non_blocking=True).float()

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = self.to_device(batch) if batch.dtype == torch.uint8 else batch
        return ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)
