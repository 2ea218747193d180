"""Training augmentation applied to whole batches on the training device.

Per-sample transforms on the CPU cost more than the forward pass of a small model (colour
jitter with hue is ~0.7 ms per 32 px image), so the loader only hands over uint8 tensors and
this module draws per-sample random parameters and applies them to the batch at once:

- random resized crop (scale and aspect ratio as torchvision's), as one ``roi_align`` call;
- horizontal flip;
- colour jitter: brightness, contrast, saturation, and hue as a rotation in YIQ space.

Two optional, stronger regularisers come from the libraries practitioners know:
torchvision's RandAugment (per image, in the loader, on uint8 tensors) and timm's
Mixup/CutMix (per batch, on the device, producing smoothed soft targets).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from timm.data import Mixup
from torchvision.ops import roi_align
from torchvision.transforms import v2

from mtmc_pipeline.config import TrainConfig

_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)
_GRAY = torch.tensor([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class AugmentSettings:
    scale: tuple[float, float] = (0.6, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02


class BatchAugment:
    """Callable: float batch (N, 3, H, W) in [0, 255] -> augmented batch of the same shape.

    A batch's random parameters come from one draw on the generator's device (the CPU), one
    row per parameter, and one copy to the batch's device; the colour matrices are moved to
    a device once. Row by row the draw equals separate per-parameter draws, so the stream
    does not depend on how it is split. Under DDP the batch is share ``rank`` of ``shares``
    equal shares of a global batch: the draw is the global batch's, and this share uses its
    columns, so every image is augmented as one process would augment it.
    """

    def __init__(
        self,
        settings: AugmentSettings,
        generator: torch.Generator | None = None,
        rank: int = 0,
        shares: int = 1,
    ):
        self.s = settings
        self.generator = generator
        self.rank = rank
        self.shares = shares
        self._colour: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}

    def _draws_per_image(self) -> int:
        s = self.s
        return 4 + sum(map(bool, (s.hflip, s.brightness, s.contrast, s.saturation, s.hue)))

    def _colour_constants(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Gray weights (1, 3, 1, 1), YIQ -> RGB and RGB -> YIQ on ``x``'s device and dtype."""
        key = (x.device, x.dtype)
        if key not in self._colour:
            gray = _GRAY.to(x.device, x.dtype)[None, :, None, None]
            yiq = (_YIQ_TO_RGB.to(x.device, x.dtype), _RGB_TO_YIQ.to(x.device, x.dtype))
            self._colour[key] = (gray, *yiq)
        return self._colour[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        draws = torch.rand(self._draws_per_image(), n * self.shares, generator=self.generator)
        draws = draws[:, self.rank * n : (self.rank + 1) * n]
        u = iter(draws.to(x.device))  # one row of n uniforms per random parameter, in order
        x = resized_crops(x, self.crop_boxes(u, h, w).to(x.dtype))
        if self.s.hflip:
            x = hflips(x, next(u) < 0.5)
        return self.color_jitter(x, u)

    def crop_boxes(self, u: Iterator[torch.Tensor], h: int, w: int) -> torch.Tensor:
        """Per-sample (batch index, x1, y1, x2, y2) boxes, as torchvision's RandomResizedCrop;
        takes four rows of ``u``."""
        area = _between(next(u), *self.s.scale) * h * w
        log_ratio = _between(next(u), math.log(self.s.ratio[0]), math.log(self.s.ratio[1]))
        ratio = torch.exp(log_ratio)
        cw = torch.sqrt(area * ratio).clamp(max=w)
        ch = torch.sqrt(area / ratio).clamp(max=h)
        x1 = next(u) * (w - cw)
        y1 = next(u) * (h - ch)
        idx = torch.arange(len(x1), device=x1.device, dtype=x1.dtype)
        return torch.stack([idx, x1, y1, x1 + cw, y1 + ch], dim=1)

    def color_jitter(self, x: torch.Tensor, u: Iterator[torch.Tensor]) -> torch.Tensor:
        """Brightness, contrast, saturation, hue; one row of ``u`` for each that is set."""
        n, dev = x.shape[0], x.device
        s = self.s
        gray_w, yiq_to_rgb, rgb_to_yiq = self._colour_constants(x)
        if s.brightness:
            x = x * _between(next(u), 1 - s.brightness, 1 + s.brightness)[:, None, None, None]
        if s.contrast:
            mean = (x * gray_w).sum(1, keepdim=True).mean((2, 3), keepdim=True)
            c = _between(next(u), 1 - s.contrast, 1 + s.contrast)[:, None, None, None]
            x = (x - mean) * c + mean
        if s.saturation:
            gray = (x * gray_w).sum(1, keepdim=True)
            sat = _between(next(u), 1 - s.saturation, 1 + s.saturation)[:, None, None, None]
            x = (x - gray) * sat + gray
        if s.hue:
            theta = _between(next(u), -s.hue, s.hue) * 2 * math.pi
            cos, sin = torch.cos(theta), torch.sin(theta)
            rot = torch.zeros(n, 3, 3, device=dev, dtype=x.dtype)
            rot[:, 0, 0] = 1
            rot[:, 1, 1], rot[:, 1, 2] = cos, -sin
            rot[:, 2, 1], rot[:, 2, 2] = sin, cos
            m = yiq_to_rgb @ rot @ rgb_to_yiq
            x = torch.einsum("nij,njhw->nihw", m, x)
        return x.clamp(0, 255)


def _between(r: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Uniforms in [0, 1) scaled to [low, high)."""
    return low + (high - low) * r


def resized_crops(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Crop box i (batch index, x1, y1, x2, y2) of each image, resized back to the input size.

    Bilinear, as torchvision's ``resized_crop`` without antialiasing (the same sample points);
    at the crop's edge the interpolation may reach pixels just outside it, where torchvision
    repeats the edge. Crops are never larger than the output, so one sample per output pixel
    (``sampling_ratio=1``) is exact upsampling; more samples per bin would blur.
    """
    h, w = x.shape[-2:]
    return roi_align(
        x, boxes, output_size=(h, w), spatial_scale=1.0, sampling_ratio=1, aligned=True
    )


def hflips(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror the images whose ``flip`` (N,) entry is true."""
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def randaugment(config: TrainConfig) -> v2.RandAugment | None:
    """torchvision's RandAugment for one uint8 CHW image, when the config asks for it."""
    if not config.randaugment:
        return None
    return v2.RandAugment(num_ops=2, magnitude=config.randaugment_magnitude)


def mixup(config: TrainConfig, num_classes: int) -> Mixup | None:
    """timm's Mixup/CutMix (batch mode; targets come out smoothed), when an alpha is set."""
    if not (config.mixup_alpha or config.cutmix_alpha):
        return None
    return Mixup(
        mixup_alpha=config.mixup_alpha,
        cutmix_alpha=config.cutmix_alpha,
        label_smoothing=config.label_smoothing,
        num_classes=num_classes,
    )
