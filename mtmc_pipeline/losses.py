"""Classification losses used in MTMC practice.

- ``ce``: cross-entropy with label smoothing.
- ``focal``: softmax focal loss, Lin et al. 2017 (down-weights easy examples by (1 - p_t)^gamma).
- ``ghm``: GHM-C, Li et al. 2019, on one-vs-rest sigmoid outputs: examples are re-weighted by
  how crowded their gradient-norm bin is, so hordes of easy examples and a few outliers both
  count less (as in mmdetection's ``GHMC``).
- ``bce``: one-vs-rest binary cross-entropy, which keeps each class's logit meaningful on its
  own (useful when classes can co-occur).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtmc_pipeline.config import TrainConfig


def _one_hot(target: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    y = F.one_hot(target, num_classes).float()
    if smoothing:
        y = y * (1 - smoothing) + smoothing / num_classes
    return y


class FocalLoss(nn.Module):
    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=1)
        logp_t = logp.gather(1, target[:, None]).squeeze(1)
        loss = -((1 - logp_t.exp()) ** self.gamma) * logp_t
        if self.weight is not None:
            loss = loss * self.weight[target]
        return loss.mean()


class GHMCLoss(nn.Module):
    """Gradient harmonizing loss for one-vs-rest sigmoid classification."""

    def __init__(self, bins: int = 10, momentum: float = 0.75) -> None:
        super().__init__()
        self.bins = bins
        self.momentum = momentum
        self.register_buffer("edges", torch.linspace(0, 1, bins + 1))
        self.edges[-1] += 1e-6
        self.register_buffer("acc_sum", torch.zeros(bins))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        y = _one_hot(target, logits.shape[1])
        g = (logits.detach().sigmoid() - y).abs()
        weights = torch.zeros_like(logits)
        total = g.numel()
        valid_bins = 0
        for i in range(self.bins):
            in_bin = (g >= self.edges[i]) & (g < self.edges[i + 1])
            count = int(in_bin.sum())
            if count:
                valid_bins += 1
                if self.momentum > 0:
                    self.acc_sum[i] = self.momentum * self.acc_sum[i] + (1 - self.momentum) * count
                    weights[in_bin] = total / self.acc_sum[i]
                else:
                    weights[in_bin] = total / count
        if valid_bins:
            weights = weights / valid_bins
        loss = F.binary_cross_entropy_with_logits(logits, y, weights, reduction="sum")
        return loss / total


class OneVsRestBCE(nn.Module):
    def __init__(self, smoothing: float = 0.0, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.smoothing = smoothing
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        y = _one_hot(target, logits.shape[1], self.smoothing)
        loss = F.binary_cross_entropy_with_logits(logits.float(), y, reduction="none").sum(1)
        if self.weight is not None:
            loss = loss * self.weight[target]
        return loss.mean()


def build_loss(
    config: TrainConfig, num_classes: int, class_weight: torch.Tensor | None = None
) -> nn.Module:
    """The loss named by ``config.loss``; ``class_weight`` multiplies each class's term."""
    if config.loss == "ce":
        return nn.CrossEntropyLoss(weight=class_weight, label_smoothing=config.label_smoothing)
    if config.loss == "focal":
        return FocalLoss(config.focal_gamma, class_weight)
    if config.loss == "ghm":
        return GHMCLoss()
    if config.loss == "bce":
        return OneVsRestBCE(config.label_smoothing, class_weight)
    raise ValueError(f"train.loss = {config.loss!r}: use ce, focal, ghm or bce")
