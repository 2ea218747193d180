"""Classification losses used in MTMC practice.

- ``ce``: cross-entropy with label smoothing.
- ``focal``: softmax focal loss, Lin et al. 2017: down-weights easy examples by (1 - p_t)^gamma
  and weighs class t's term by alpha_t (``focal_alpha``: one weight per class, or one for all).
- ``ghm``: GHM-C, Li et al. 2019, on one-vs-rest sigmoid outputs: examples are re-weighted by
  how crowded their gradient-norm bin is, so hordes of easy examples and a few outliers both
  count less (as in mmdetection's ``GHMC``).
- ``bce``: one-vs-rest binary cross-entropy, which keeps each class's logit meaningful on its
  own (useful when classes can co-occur).

Every loss takes either class indices (N,) or class probabilities (N, C) as targets: Mixup and
CutMix produce the latter, already smoothed. An optional class weight multiplies each sample's
term by the (target-weighted) weight of its class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtmc_pipeline.config import ConfigError, TrainConfig


def soft_targets(target: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """Class probabilities (N, C): indices are one-hot encoded and smoothed, probabilities kept."""
    if target.is_floating_point():
        return target
    y = F.one_hot(target, num_classes).float()
    if smoothing:
        y = y * (1 - smoothing) + smoothing / num_classes
    return y


def _sample_weight(weight: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor | None:
    return None if weight is None else y @ weight


class _WeightedLoss(nn.Module):
    def __init__(self, weight: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)

    def _reduce(self, per_sample: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w = _sample_weight(self.weight, y)
        return (per_sample * w).mean() if w is not None else per_sample.mean()


class CrossEntropy(_WeightedLoss):
    def __init__(self, smoothing: float = 0.0, weight: torch.Tensor | None = None) -> None:
        super().__init__(weight)
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        y = soft_targets(target, logits.shape[1], self.smoothing)
        per_sample = -(y * F.log_softmax(logits.float(), dim=1)).sum(1)
        return self._reduce(per_sample, y)


_FOCAL_FLOOR = 1e-6


class FocalLoss(_WeightedLoss):
    """-sum_c y_c alpha_c (1 - p_c)^gamma log p_c per sample; ``alpha`` (C,) or None (all 1)."""

    def __init__(
        self,
        gamma: float = 2.0,
        weight: torch.Tensor | None = None,
        alpha: torch.Tensor | None = None,
    ) -> None:
        super().__init__(weight)
        self.gamma = gamma
        self.register_buffer("alpha", alpha)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        y = soft_targets(target, logits.shape[1])
        logp = F.log_softmax(logits.float(), dim=1)
        # floored: (1 - p)^gamma with gamma < 1 has an infinite slope at p = 1 (a NaN gradient)
        terms = y * (-torch.expm1(logp)).clamp(min=_FOCAL_FLOOR) ** self.gamma * logp
        if self.alpha is not None:
            terms = terms * self.alpha
        return self._reduce(-terms.sum(1), y)


def focal_alpha(alpha: list[float] | None, num_classes: int) -> torch.Tensor | None:
    """``train.focal_alpha`` as one weight per class (a single value applies to every class)."""
    if alpha is None:
        return None
    if len(alpha) not in (1, num_classes):
        raise ConfigError(
            f"train.focal_alpha = {alpha}: {len(alpha)} weights for {num_classes} classes; "
            "give one per class, in class order, or a single number"
        )
    return torch.tensor(alpha * (num_classes // len(alpha)), dtype=torch.float32)


class GHMCLoss(_WeightedLoss):
    """Gradient harmonizing loss for one-vs-rest sigmoid classification."""

    def __init__(
        self, bins: int = 10, momentum: float = 0.75, weight: torch.Tensor | None = None
    ) -> None:
        super().__init__(weight)
        self.bins = bins
        self.momentum = momentum
        self.register_buffer("edges", torch.linspace(0, 1, bins + 1))
        self.edges[-1] += 1e-6
        self.register_buffer("acc_sum", torch.zeros(bins))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        y = soft_targets(target, logits.shape[1])
        g = (logits.detach().sigmoid() - y).abs()
        total = g.numel()
        # bin i holds edges[i] <= g < edges[i + 1]; the last edge is just above 1, so every
        # g in [0, 1] has a bin and the clamp is only a guard
        idx = (torch.bucketize(g, self.edges, right=True) - 1).clamp(0, self.bins - 1)
        counts = torch.bincount(idx.flatten(), minlength=self.bins).float()
        hit = counts > 0
        if self.momentum > 0:
            running = self.momentum * self.acc_sum + (1 - self.momentum) * counts
            self.acc_sum.copy_(torch.where(hit, running, self.acc_sum))
            per_bin = total / self.acc_sum
        else:
            per_bin = total / counts
        weights = per_bin[idx] / hit.sum().clamp(min=1)  # empty bins are never indexed
        per_elem = F.binary_cross_entropy_with_logits(logits, y, weights, reduction="none")
        return self._reduce(per_elem.sum(1), y) * logits.shape[0] / total


class OneVsRestBCE(_WeightedLoss):
    def __init__(self, smoothing: float = 0.0, weight: torch.Tensor | None = None) -> None:
        super().__init__(weight)
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        y = soft_targets(target, logits.shape[1], self.smoothing)
        per_sample = F.binary_cross_entropy_with_logits(logits.float(), y, reduction="none").sum(1)
        return self._reduce(per_sample, y)


def build_loss(
    config: TrainConfig, num_classes: int, class_weight: torch.Tensor | None = None
) -> nn.Module:
    """The loss named by ``config.loss``; ``class_weight`` (C,) multiplies each class's term."""
    if class_weight is not None and class_weight.shape != (num_classes,):
        shape = tuple(class_weight.shape)
        raise ValueError(f"class_weight has shape {shape}, expected ({num_classes},)")
    if config.loss == "ce":
        return CrossEntropy(config.label_smoothing, class_weight)
    if config.loss == "focal":
        alpha = focal_alpha(config.focal_alpha, num_classes)
        return FocalLoss(config.focal_gamma, class_weight, alpha)
    if config.loss == "ghm":
        return GHMCLoss(config.ghm_bins, config.ghm_momentum, class_weight)
    if config.loss == "bce":
        return OneVsRestBCE(config.label_smoothing, class_weight)
    if config.loss == "asl":
        raise ConfigError("train.loss = asl: the asymmetric loss is for kind: multilabel tasks")
    raise ValueError(f"train.loss = {config.loss!r}: use ce, focal, ghm or bce")
