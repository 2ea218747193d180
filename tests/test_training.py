"""Training pieces: batch augmentation, losses, model factory and the loop's determinism."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from mtmc_pipeline.augment import AugmentSettings, BatchAugment
from mtmc_pipeline.config import ConfigError, TrainConfig
from mtmc_pipeline.losses import build_loss
from mtmc_pipeline.models import PretrainedUnavailableError, create_model
from mtmc_pipeline.runtime import resolve_runtime
from mtmc_pipeline.train import train_model


def test_batch_augment_keeps_shape_range_and_is_seeded() -> None:
    x = torch.rand(8, 3, 32, 32) * 255
    a = BatchAugment(AugmentSettings(), torch.Generator().manual_seed(0))(x)
    b = BatchAugment(AugmentSettings(), torch.Generator().manual_seed(0))(x)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 255
    assert torch.equal(a, b)
    assert not torch.allclose(a, x)


def test_full_crop_without_jitter_is_identity() -> None:
    x = torch.rand(4, 3, 16, 16) * 255
    s = AugmentSettings(
        scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        hflip=False,
        brightness=0,
        contrast=0,
        saturation=0,
        hue=0,
    )
    assert torch.allclose(BatchAugment(s)(x), x, atol=1e-3)


@pytest.mark.parametrize("loss", ["ce", "focal", "ghm", "bce"])
def test_losses_are_finite_and_fall_when_predictions_improve(loss: str) -> None:
    fn = build_loss(TrainConfig(loss=loss), 4)
    target = torch.tensor([0, 1, 2, 3])
    bad = torch.zeros(4, 4, requires_grad=True)
    good = torch.eye(4) * 6
    lb = fn(bad, target)
    lb.backward()
    assert torch.isfinite(lb) and bad.grad is not None and bad.grad.abs().sum() > 0
    assert fn(good, target) < fn(torch.zeros(4, 4), target)


def test_unknown_model_name_suggests_close_ones() -> None:
    with pytest.raises(ConfigError, match="resnet18"):
        create_model("resnet_18", 3)


def test_pretrained_path_loads_matching_tensors_and_skips_the_head(tmp_path: Path) -> None:
    donor = create_model("test_resnet", 7)
    path = tmp_path / "w.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in donor.state_dict().items()}, str(path))
    messages: list[str] = []
    model = create_model("test_resnet", 3, pretrained_path=str(path), log=messages.append)
    mine, theirs = model.state_dict(), donor.state_dict()
    body = [k for k in mine if not k.startswith("fc.")]
    assert body and all(torch.equal(mine[k], theirs[k]) for k in body)
    assert "skipped 2 tensors" in messages[0] and "fc." in messages[0]


def test_pretrained_path_problems_are_named(tmp_path: Path) -> None:
    with pytest.raises(PretrainedUnavailableError, match="no such file"):
        create_model("test_resnet", 3, pretrained_path=str(tmp_path / "missing.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedUnavailableError, match="cannot read weights"):
        create_model("test_resnet", 3, pretrained_path=str(bad))


def test_offline_hub_failure_says_how_to_proceed(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as offline machines
    with pytest.raises(PretrainedUnavailableError, match="pretrained_path"):
        create_model("resnet18", 3, pretrained=True)


def _manifest() -> tuple[pd.DataFrame, list[str]]:
    rows = [
        (f"{c}/{i}.png", c, ci, "train" if i < 6 else "val", f"{ci}{i:031d}")
        for ci, c in enumerate("ab")
        for i in range(8)
    ]
    return pd.DataFrame(
        rows, columns=["relpath", "class_name", "label", "split", "content_hash"]
    ), ["a", "b"]


def test_same_seed_same_weights(tmp_path: Path) -> None:
    from tests.images import image_bytes, write

    manifest, classes = _manifest()
    for r in manifest.itertuples():
        write(tmp_path / "data" / r.relpath, image_bytes(seed=int(r.label) * 100 + len(r.relpath)))
    cfg = TrainConfig(model="test_resnet", img_size=16, pretrained=False, epochs=2, batch_size=4)
    runs = [
        train_model(
            manifest,
            classes,
            None,
            tmp_path / "data",
            tmp_path / f"cache{i}",
            cfg,
            resolve_runtime("cpu"),
            log=lambda _: None,
        )
        for i in range(2)
    ]
    s0, s1 = (r.model.state_dict() for r in runs)
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    assert runs[0].history["train_loss"].tolist() == runs[1].history["train_loss"].tolist()
