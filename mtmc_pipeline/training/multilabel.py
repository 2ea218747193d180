"""Multi-label training: one sigmoid output per class, multi-hot targets, and their losses.

- ``bce`` (and ``ce``, which means bce here): binary cross-entropy per class; label smoothing
  moves each target ``eps / 2`` towards the other side (1 -> 1 - eps/2, 0 -> eps/2).
- ``focal``: sigmoid focal loss (Lin et al. 2017), ``-a_t (1 - p_t)^gamma log p_t`` per class,
  with ``focal_alpha`` the weight a of positives (1 - a of negatives) when set.
- ``asl``: asymmetric loss (Ridnik et al. 2021): positives ``(1 - p)^g+ log p``, negatives
  ``p_m^g- log(1 - p_m)`` with ``p_m = max(p - clip, 0)``, so easy negatives (the many absent
  classes of every image) count far less; it tends to raise recall and lower precision.

Every loss sums over classes and averages over images. ``pos_weight`` (C,) multiplies each
class's positive term (``train.pos_weight``: train negatives / positives of that class);
``class_weight`` (C,) multiplies each class's whole term.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from mtmc_pipeline.config import ConfigError, TrainConfig
from mtmc_pipeline.data.multilabel_splits import indicator
from mtmc_pipeline.training.losses import focal_alpha

_EPS = 1e-8


class MultiLabelLoss(nn.Module):
    """Shared weighting and reduction; subclasses give the per-element positive and negative
    terms (both to be minimised, i.e. already negated log-likelihoods)."""

    def __init__(self, pos_weight: torch.Tensor | None, class_weight: torch.Tensor | None):
        super().__init__()
        self.register_buffer("pos_weight", pos_weight)
        self.register_buffer("class_weight", class_weight)

    def terms(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, y = logits.float(), target.float()
        pos, neg = self.terms(logits, y)
        if self.pos_weight is not None:
            pos = pos * self.pos_weight
        per_elem = pos + neg
        if self.class_weight is not None:
            per_elem = per_elem * self.class_weight
        return per_elem.sum(1).mean()


class MultiLabelBCE(MultiLabelLoss):
    def __init__(self, smoothing: float = 0.0, pos_weight=None, class_weight=None) -> None:
        super().__init__(pos_weight, class_weight)
        self.smoothing = smoothing

    def terms(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = y * (1 - self.smoothing) + self.smoothing / 2
        # -log sigmoid(x) = softplus(-x), -log(1 - sigmoid(x)) = softplus(x)
        return y * F.softplus(-logits), (1 - y) * F.softplus(logits)


class SigmoidFocal(MultiLabelLoss):
    def __init__(
        self,
        gamma: float = 2.0,
        alpha: torch.Tensor | None = None,
        pos_weight=None,
        class_weight=None,
    ) -> None:
        super().__init__(pos_weight, class_weight)
        self.gamma = gamma
        self.register_buffer("alpha", alpha)

    def terms(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = logits.sigmoid()
        pos = y * (1 - p) ** self.gamma * F.softplus(-logits)
        neg = (1 - y) * p**self.gamma * F.softplus(logits)
        if self.alpha is not None:
            pos, neg = pos * self.alpha, neg * (1 - self.alpha)
        return pos, neg


class AsymmetricLoss(MultiLabelLoss):
    def __init__(
        self,
        gamma_neg: float = 4.0,
        gamma_pos: float = 0.0,
        clip: float = 0.05,
        pos_weight=None,
        class_weight=None,
    ) -> None:
        super().__init__(pos_weight, class_weight)
        self.gamma_neg, self.gamma_pos, self.clip = gamma_neg, gamma_pos, clip

    def terms(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = logits.sigmoid()
        p_m = (p - self.clip).clamp(min=0) if self.clip else p
        pos = -y * (1 - p) ** self.gamma_pos * torch.log(p.clamp(min=_EPS))
        neg = -(1 - y) * p_m**self.gamma_neg * torch.log((1 - p_m).clamp(min=_EPS))
        return pos, neg


def check_multilabel_config(config: TrainConfig) -> None:
    """Settings a multi-label task cannot use, named in the message."""
    if config.loss == "ghm":
        raise ConfigError("train.loss = ghm: multi-label tasks use bce, focal or asl")
    if config.mixup_alpha or config.cutmix_alpha:
        raise ConfigError(
            "train.mixup_alpha / train.cutmix_alpha: not supported for multi-label tasks "
            "(kind: multilabel); set them to 0"
        )


def positive_weight(manifest: pd.DataFrame, num_classes: int) -> torch.Tensor:
    """Per class, train negatives / positives (1 for a class without train positives)."""
    train = manifest.loc[manifest["split"] == "train", "labels"]
    positives = indicator(train, num_classes).sum(0).astype(np.float64)
    ratio = np.where(positives > 0, (len(train) - positives) / np.maximum(positives, 1), 1.0)
    return torch.tensor(ratio, dtype=torch.float32)


def build_multilabel_loss(
    config: TrainConfig,
    num_classes: int,
    class_weight: torch.Tensor | None = None,
    pos_weight: torch.Tensor | None = None,
) -> nn.Module:
    """The multi-label loss named by ``config.loss`` (ce means bce)."""
    check_multilabel_config(config)
    if config.loss == "focal":
        alpha = focal_alpha(config.focal_alpha, num_classes)
        return SigmoidFocal(config.focal_gamma, alpha, pos_weight, class_weight)
    if config.loss == "asl":
        return AsymmetricLoss(
            config.asl_gamma_neg, config.asl_gamma_pos, config.asl_clip, pos_weight, class_weight
        )
    return MultiLabelBCE(config.label_smoothing, pos_weight, class_weight)


def multi_hot(manifest_rows: pd.DataFrame, num_classes: int) -> list[list[int]]:
    """The 0/1 targets (one list of C per row) of manifest rows, as the loader takes labels."""
    return indicator(manifest_rows["labels"], num_classes).astype(np.int64).tolist()
