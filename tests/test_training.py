"""Training pieces: batch augmentation, losses, model factory and the loop's determinism."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mtmc_pipeline.config import ConfigError, TrainConfig
from mtmc_pipeline.runtime import Runtime, resolve_runtime
from mtmc_pipeline.training.augment import AugmentSettings, BatchAugment
from mtmc_pipeline.training.loader import DecodedCache
from mtmc_pipeline.training.losses import build_loss
from mtmc_pipeline.training.models import PretrainedUnavailableError, create_model
from mtmc_pipeline.training.train import train_model


def tiny_config(**settings: object) -> TrainConfig:
    """Explicit settings for a tiny model on 16-px images (no recipe to resolve)."""
    explicit = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "batch_size": 4}
    return TrainConfig(
        model="test_resnet", img_size=16, pretrained=False, **{**explicit, **settings}
    )


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


def test_batched_flip_and_crop_match_torchvision() -> None:
    from torchvision.transforms.v2 import functional as tvf

    from mtmc_pipeline.training.augment import hflips, resized_crops

    x = torch.rand(2, 3, 16, 16) * 255
    flipped = hflips(x, torch.tensor([True, False]))
    assert torch.equal(flipped[0], tvf.hflip(x[0])) and torch.equal(flipped[1], x[1])
    boxes = torch.tensor([[0, 0, 0, 16, 16], [1, 3, 2, 13, 12]], dtype=torch.float32)
    out = resized_crops(x, boxes)
    whole = tvf.resized_crop(x[0], 0, 0, 16, 16, [16, 16], antialias=False)
    torch.testing.assert_close(out[0], whole, rtol=0, atol=1e-4)
    # box x 3..13, y 2..12 upsampled to 16 px: the same bilinear samples; only the outermost
    # output pixels differ (they interpolate towards pixels just outside the crop)
    part = tvf.resized_crop(x[1], 2, 3, 10, 10, [16, 16], antialias=False)
    torch.testing.assert_close(out[1, :, 1:-1, 1:-1], part[:, 1:-1, 1:-1], rtol=0, atol=1e-3)


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


def _ghm_reference(
    logits: torch.Tensor, target: torch.Tensor, acc_sum: torch.Tensor, bins: int, momentum: float
) -> torch.Tensor:
    """GHM-C written bin by bin, as the paper describes it; updates ``acc_sum`` in place."""
    import torch.nn.functional as F

    y = F.one_hot(target, logits.shape[1]).float()
    g = (logits.sigmoid() - y).abs()
    edges = torch.linspace(0, 1, bins + 1)
    edges[-1] += 1e-6
    weights = torch.zeros_like(logits)
    valid = 0
    for i in range(bins):
        in_bin = (g >= edges[i]) & (g < edges[i + 1])
        count = int(in_bin.sum())
        if count:
            valid += 1
            if momentum > 0:
                acc_sum[i] = momentum * acc_sum[i] + (1 - momentum) * count
                weights[in_bin] = g.numel() / acc_sum[i]
            else:
                weights[in_bin] = g.numel() / count
    weights = weights / max(valid, 1)
    per_elem = F.binary_cross_entropy_with_logits(logits, y, weights, reduction="none")
    return per_elem.sum() / g.numel()


@pytest.mark.parametrize("momentum", [0.0, 0.75])
def test_ghm_matches_a_bin_by_bin_reference(momentum: float) -> None:
    gen = torch.Generator().manual_seed(0)
    fn = build_loss(TrainConfig(loss="ghm", ghm_bins=10, ghm_momentum=momentum), 5)
    acc_sum = torch.zeros(10)
    for scale in (0.1, 3.0, 8.0):  # few bins hit, then most of them
        logits = torch.randn(16, 5, generator=gen) * scale
        target = torch.randint(0, 5, (16,), generator=gen)
        expected = _ghm_reference(logits, target, acc_sum, 10, momentum)
        torch.testing.assert_close(fn(logits, target), expected)
        torch.testing.assert_close(fn.acc_sum, acc_sum)
    assert (acc_sum > 0).sum() > 1 if momentum else torch.equal(fn.acc_sum, torch.zeros(10))


def test_focal_alpha_weighs_each_class_as_computed_by_hand() -> None:
    import math

    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    target = torch.tensor([0, 2])
    alpha, gamma = [0.25, 1.0, 2.0], 2.0

    def term(row: list[float], t: int) -> float:
        p = math.exp(row[t]) / sum(math.exp(v) for v in row)
        return -alpha[t] * (1 - p) ** gamma * math.log(p)

    expected = (term([2.0, 0.0, -1.0], 0) + term([0.5, 1.5, 0.0], 2)) / 2
    got = build_loss(TrainConfig(loss="focal", focal_alpha=alpha), 3)(logits, target)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    plain = build_loss(TrainConfig(loss="focal"), 3)(logits, target).item()
    one_alpha = build_loss(TrainConfig(loss="focal", focal_alpha=0.25), 3)(logits, target)
    assert one_alpha.item() == pytest.approx(0.25 * plain, rel=1e-6)
    with pytest.raises(ConfigError, match=r"train\.focal_alpha = \[1\.0, 2\.0\]: 2 weights for 3"):
        build_loss(TrainConfig(loss="focal", focal_alpha=[1.0, 2.0]), 3)


def test_optimizer_decays_matrices_only_and_sgd_momentum_is_chosen() -> None:
    from mtmc_pipeline.training.train import build_optimizer

    model = create_model("test_resnet", 3)
    opt = build_optimizer(model, TrainConfig(optimizer="adamw", weight_decay=0.05, lr=1e-3))
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert len(opt.param_groups) == 2 and set(by_decay) == {0.0, 0.05}
    params = dict(model.named_parameters())
    assert sum(map(len, by_decay.values())) == len(params)
    flat = {n for n, p in params.items() if p.ndim <= 1}
    assert any(n.startswith("bn") or ".bn" in n for n in flat) and "fc.bias" in flat
    assert {n for n, p in params.items() if id(p) in by_decay[0.0]} == flat
    for nesterov in (True, False):
        sgd = build_optimizer(
            model,
            TrainConfig(
                optimizer="sgd", nesterov=nesterov, momentum=0.8, lr=1e-3, weight_decay=5e-3
            ),
        )
        assert isinstance(sgd, torch.optim.SGD)
        assert all(g["nesterov"] is nesterov and g["momentum"] == 0.8 for g in sgd.param_groups)


def test_unknown_model_name_suggests_close_ones() -> None:
    with pytest.raises(ConfigError, match="resnet18"):
        create_model("resnet_18", 3)


def test_pretrained_path_loads_matching_tensors_and_skips_the_head(tmp_path: Path) -> None:
    donor = create_model("test_resnet", 7)
    path = tmp_path / "w.safetensors"
    theirs = {k: v.contiguous() for k, v in donor.state_dict().items()}
    del theirs["layer1.0.bn1.running_var"]  # missing from the file: keeps its initial value
    save_file({f"module.{k}": v for k, v in theirs.items()} | {"aux.w": torch.ones(2)}, str(path))
    messages: list[str] = []
    model = create_model("test_resnet", 3, pretrained_path=str(path), log=messages.append)
    mine = model.state_dict()
    body = [k for k in mine if not k.startswith("fc.") and k in theirs]
    assert body and all(torch.equal(mine[k], theirs[k]) for k in body)
    assert torch.equal(
        mine["layer1.0.bn1.running_var"], torch.ones_like(mine["layer1.0.bn1.running_var"])
    )
    (message,) = messages
    assert f"loaded {len(theirs) - 2} tensors from {path}" in message
    assert "skipped 3 (other name or shape): aux.w, fc.bias, fc.weight;" in message
    assert message.endswith(
        "missing 3 (kept as initialised): fc.bias, fc.weight, layer1.0.bn1.running_var"
    )


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


def test_in_memory_images_are_the_cached_files_as_chw(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mtmc_pipeline.training.loader as data

    cache = DecodedCache(tmp_path, 8)
    rng = np.random.default_rng(0)
    hashes = [f"{i:02d}{'f' * 30}" for i in range(3)]
    for h in hashes:
        cache.path(h).parent.mkdir(parents=True, exist_ok=True)
        np.save(cache.path(h), rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    held = data.CachedImageDataset(cache, hashes, [0, 1, 0])
    monkeypatch.setattr(data, "IN_MEMORY_LIMIT_BYTES", 0)
    read = data.CachedImageDataset(cache, hashes, [0, 1, 0])
    assert held.images is not None and read.images is None
    for i, h in enumerate(hashes):
        assert torch.equal(held[i][0], read[i][0])
        assert torch.equal(held[i][0], torch.from_numpy(np.load(cache.path(h))).permute(2, 0, 1))


def _manifest() -> tuple[pd.DataFrame, list[str]]:
    rows = [
        (f"{c}/{i}.png", c, ci, "train" if i < 6 else "val", f"{ci}{i:031d}")
        for ci, c in enumerate("ab")
        for i in range(8)
    ]
    return pd.DataFrame(
        rows, columns=["relpath", "class_name", "label", "split", "content_hash"]
    ), ["a", "b"]


@pytest.mark.parametrize(
    "runtime",
    [
        Runtime(torch.device("cpu"), None),
        Runtime(torch.device("cpu"), None, channels_last=True, num_workers=1),
    ],
    ids=["plain", "channels_last-1-worker"],
)
def test_same_seed_same_weights_and_a_retrain_decodes_nothing(
    tmp_path: Path, runtime: Runtime
) -> None:
    manifest, classes = _tiny_task(tmp_path / "data")
    cfg = tiny_config(epochs=2)
    logs: list[list[str]] = [[], []]
    runs = [
        train_model(
            manifest,
            classes,
            None,
            tmp_path / "data",
            tmp_path / "cache",
            cfg,
            runtime,
            log=logs[i].append,
        )
        for i in range(2)
    ]
    s0, s1 = (r.model.state_dict() for r in runs)
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    assert runs[0].history["train_loss"].tolist() == runs[1].history["train_loss"].tolist()
    n = len(manifest)
    assert f"decoded {n} new images into the cache (0 cached)" in logs[0]
    assert f"decoded 0 new images into the cache ({n} cached)" in logs[1]  # same cache root
    cache = DecodedCache(tmp_path / "cache", 16, runs[0].preprocess.interpolation)
    assert cache.ensure(["unreadable"] * n, manifest["content_hash"].tolist()) == 0


def _lrs_per_epoch(
    config: TrainConfig, metrics: list[float] | None = None
) -> tuple[list[float], float]:
    """The learning rate each epoch starts with (10 updates an epoch), and the final one."""
    from mtmc_pipeline.training.schedules import build_schedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    schedule = build_schedule(opt, config, updates_per_epoch=10)
    out, updates = [], 0
    for epoch in range(config.epochs):
        out.append(opt.param_groups[0]["lr"])
        for _ in range(10):
            updates += 1
            schedule.step_update(updates)
        schedule.step(epoch + 1, metrics[epoch] if metrics else None)
    return out, opt.param_groups[0]["lr"]


def test_cosine_warms_up_then_decays_to_the_floor() -> None:
    lrs, final = _lrs_per_epoch(TrainConfig(lr=1.0, epochs=10, warmup_epochs=2, min_lr_ratio=0.05))
    assert lrs[:3] == pytest.approx([0.01, 0.505, 1.0])  # linear warmup from lr / 100
    assert all(a > b for a, b in pairwise(lrs[2:]))
    assert final == pytest.approx(0.05)


def test_step_and_multistep_decay_at_their_epochs() -> None:
    step, _ = _lrs_per_epoch(
        TrainConfig(lr=1.0, epochs=6, warmup_epochs=0, scheduler="step", decay_epochs=2)
    )
    assert step == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    multi, _ = _lrs_per_epoch(
        TrainConfig(
            lr=1.0,
            epochs=6,
            warmup_epochs=0,
            scheduler="multistep",
            decay_milestones=[1, 4],
            decay_rate=0.5,
        )
    )
    assert multi == pytest.approx([1, 0.5, 0.5, 0.5, 0.25, 0.25])


def test_warm_restarts_return_to_the_peak() -> None:
    lrs, _ = _lrs_per_epoch(
        TrainConfig(lr=1.0, epochs=8, warmup_epochs=0, scheduler="warm_restarts", restart_epochs=4)
    )
    assert lrs[0] == lrs[4] == pytest.approx(1.0)  # two cycles of 4 epochs
    assert lrs[3] < 0.2 and lrs[7] < 0.2


def test_plateau_decays_when_the_metric_stalls() -> None:
    config = TrainConfig(
        lr=1.0, epochs=7, warmup_epochs=1, scheduler="plateau", plateau_patience=2, decay_rate=0.5
    )
    lrs, _ = _lrs_per_epoch(config, metrics=[0.1, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6])
    assert lrs == pytest.approx([0.01, 1, 1, 1, 1, 1, 0.5])  # 3 epochs without gain: one decay


def test_gradient_clipping_limits_the_update_and_reports_the_norm() -> None:
    from mtmc_pipeline.training.train import _Stepper

    model = torch.nn.Linear(4, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    stepper = _Stepper(model, opt, TrainConfig(clip_grad_norm=0.5), resolve_runtime("cpu"))
    loss = (model(torch.full((1, 4), 10.0)) - 100).pow(2).sum()
    norm = stepper(loss)
    assert norm.item() == pytest.approx(4000.0)  # |2 * -100 * 10| * sqrt(4), before clipping
    assert model.weight.norm().item() == pytest.approx(0.5, rel=1e-4)  # lr 1 x clipped grad


def test_soft_targets_give_the_same_loss_as_indices() -> None:
    from mtmc_pipeline.training.losses import soft_targets

    logits = torch.randn(6, 4)
    target = torch.tensor([0, 1, 2, 3, 0, 1])
    for loss in ("ce", "focal", "ghm", "bce"):
        cfg = TrainConfig(loss=loss, label_smoothing=0.1)
        smoothing = 0.1 if loss in ("ce", "bce") else 0.0
        soft = soft_targets(target, 4, smoothing)
        assert build_loss(cfg, 4)(logits, soft) == pytest.approx(
            build_loss(cfg, 4)(logits, target).item(), rel=1e-5
        ), loss


def test_class_weights_scale_each_class_term() -> None:
    logits = torch.randn(4, 2)
    target = torch.tensor([0, 0, 1, 1])
    cfg = TrainConfig(loss="ce", label_smoothing=0.0)
    per_sample = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    weighted = build_loss(cfg, 2, torch.tensor([0.0, 3.0]))(logits, target)
    assert weighted.item() == pytest.approx((per_sample[2:].sum() * 3 / 4).item(), rel=1e-5)
    with pytest.raises(ValueError, match="expected \\(2,\\)"):
        build_loss(cfg, 2, torch.ones(3))


def test_balanced_sampling_evens_out_classes_and_can_be_switched_off() -> None:
    from torch.utils.data import TensorDataset

    from mtmc_pipeline.data.sampling import sampling_weights
    from mtmc_pipeline.training.train import train_loader

    labels = torch.tensor([0] * 90 + [1] * 10)
    data = TensorDataset(torch.zeros(100, 3, 2, 2, dtype=torch.uint8), labels)
    manifest = pd.DataFrame(
        {"relpath": [f"{i}.png" for i in range(100)], "label": labels.numpy(), "split": "train"}
    )
    weights, _ = sampling_weights(manifest, ["big", "small"])
    cfg, cpu = TrainConfig(batch_size=50), resolve_runtime("cpu")

    def share_of_small(w: object) -> float:
        loader = train_loader(data, w, cfg, cpu, torch.Generator().manual_seed(0))
        drawn = torch.cat([y for _ in range(20) for _, y in loader])
        return (drawn == 1).float().mean().item()

    assert share_of_small(weights["weight"].to_numpy()) == pytest.approx(0.5, abs=0.05)
    assert share_of_small(None) == pytest.approx(0.1, abs=1e-6)  # a plain shuffle


def test_randaugment_changes_pixels_not_shape() -> None:
    from mtmc_pipeline.training.augment import randaugment

    assert randaugment(TrainConfig()) is None
    transform = randaugment(TrainConfig(randaugment=True, randaugment_magnitude=15))
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8)
    out = [transform(image) for _ in range(5)]
    assert all(o.shape == image.shape and o.dtype == torch.uint8 for o in out)
    assert any(not torch.equal(o, image) for o in out)


def _tiny_task(root: Path) -> tuple[pd.DataFrame, list[str]]:
    from tests.images import image_bytes, write

    manifest, classes = _manifest()
    for r in manifest.itertuples():
        write(root / r.relpath, image_bytes(seed=int(r.label) * 100 + len(r.relpath)))
    return manifest, classes


def test_ema_weights_are_what_validation_and_the_bundle_use(tmp_path: Path) -> None:
    from mtmc_pipeline.training.checkpoint import Checkpoint

    manifest, classes = _tiny_task(tmp_path / "data")
    cfg = tiny_config(epochs=1, ema=True)
    ckpt = Checkpoint(tmp_path / "ckpt.safetensors", "fp")
    result = train_model(
        manifest, classes, None, tmp_path / "data", tmp_path / "cache", cfg,
        resolve_runtime("cpu"), lambda _: None, ckpt,
    )  # fmt: skip
    saved, _ = ckpt.load()
    assert saved is not None
    mine = result.model.state_dict()
    assert all(torch.equal(mine[k], saved["ema"][k]) for k in mine)
    assert any(not torch.equal(mine[k], saved["model"][k]) for k in mine)


def test_every_option_together_trains(tmp_path: Path) -> None:
    manifest, classes = _tiny_task(tmp_path / "data")
    cfg = tiny_config(
        epochs=2,
        loss="focal",
        optimizer="sgd",
        scheduler="warm_restarts",
        restart_epochs=1,
        clip_grad_norm=1.0,
        ema=True,
        randaugment=True,
        mixup_alpha=0.2,
        cutmix_alpha=1.0,
        freeze_epochs=1,
    )
    result = train_model(
        manifest, classes, None, tmp_path / "data", tmp_path / "cache", cfg,
        resolve_runtime("cpu"), lambda _: None, class_weight=[2.0, 0.5],
    )  # fmt: skip
    history = result.history
    assert len(history) == 2 and history["frozen"].tolist() == [True, False]
    assert history[["train_loss", "val_loss", "grad_norm"]].notna().all().all()
    assert np.isfinite(history["train_loss"]).all() and (history["images"] > 0).all()
    assert (history["step_seconds"] < history["seconds"]).all()  # validation not counted
    overall = history["images"].sum() / history["step_seconds"].sum()
    assert result.images_per_second == pytest.approx(overall)


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"model": "resnet_18"}, r"train\.model = 'resnet_18': .*Did you mean: .*resnet18"),
        ({"epochs": -3}, r"train\.epochs = -3"),
        ({"loss": "hinge"}, r"train\.loss = 'hinge'"),
        ({"scheduler": "cyclic"}, r"train\.scheduler = 'cyclic'"),
        ({"decay_milestones": [20, 10]}, r"train\.decay_milestones = \[20, 10\]"),
        ({"mixup_alpha": 0.2, "batch_size": 33}, r"batch_size = 33: must be even"),
        ({"batch_size": 1}, r"train\.batch_size = 1"),
        ({"focal_alpha": -1}, r"train\.focal_alpha = -1: must be a number >= 0"),
        ({"optimizer": "sgd", "momentum": 0}, r"nesterov = true needs momentum > 0"),
    ],
)
def test_bad_training_settings_fail_fast_naming_the_setting(
    tmp_path: Path, train: dict[str, object], message: str
) -> None:
    from mtmc_pipeline.config import load_task_config

    (tmp_path / "task.yaml").write_text(
        "train:\n" + "".join(f"  {k}: {v}\n" for k, v in train.items()), "utf-8"
    )
    with pytest.raises(ConfigError, match=message) as err:
        load_task_config(tmp_path)
    assert "task.yaml" in str(err.value)


def test_an_input_size_the_model_cannot_take_is_a_config_error(tmp_path: Path) -> None:
    manifest, classes = _tiny_task(tmp_path / "data")
    cfg = TrainConfig(
        model="test_vit",
        img_size=20,
        pretrained=False,
        epochs=1,
        batch_size=4,
        optimizer="adamw",
        lr=1e-3,
        weight_decay=0.05,
    )  # patches of 16 px
    with pytest.raises(ConfigError, match=r"train\.img_size = 20: test_vit cannot take 20x20"):
        train_model(
            manifest, classes, None, tmp_path / "data", tmp_path / "cache", cfg,
            resolve_runtime("cpu"), lambda _: None,
        )  # fmt: skip
    assert not (tmp_path / "cache").exists()  # failed before decoding anything


def test_shipped_instance_limits_the_gpu_pool_and_watches_runs() -> None:
    import dagster as dg
    import yaml

    path = Path(__file__).resolve().parents[1] / ".dagster" / "dagster.yaml"
    settings = yaml.safe_load(path.read_text("utf-8"))
    with dg.instance_for_test(overrides=settings) as instance:
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] > 0


def test_bad_run_config_fails_the_model_asset_with_the_setting_named(
    tiny_root: Path, tmp_path: Path
) -> None:
    import dagster as dg

    from assets.definitions import build_definitions

    defs = build_definitions(tiny_root, tmp_path)
    job = defs.resolve_implicit_global_asset_job_def()
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(
            instance=instance,
            asset_selection=[dg.AssetKey(["digits", "model"])],
            run_config={"ops": {"digits__model": {"config": {"model": "resnet_18", "epochs": -1}}}},
            raise_on_error=False,
        )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    error = failure.step_failure_data.error
    assert "train.model = 'resnet_18'" in error.message and "train.epochs = -1" in error.message
    assert "torch" not in "".join(error.stack)


def test_torch_device_settings_are_checked() -> None:
    from assets.resources import TorchDevice
    from mtmc_pipeline.runtime import DeviceError

    assert TorchDevice(device="cpu").runtime().describe() == "cpu, fp32"
    assert TorchDevice(device="cpu", precision="bf16").runtime().amp_dtype == torch.bfloat16
    bad = [
        ({"device": "tpu"}, "device='tpu'"),
        ({"device": "cuda:0"} if not torch.cuda.is_available() else {"device": "cuda:99"}, "cuda"),
        ({"device": "cpu", "precision": "fp16"}, "fp16"),
        ({"device": "cpu", "precision": "fp8"}, "precision='fp8'"),
        ({"device": "cpu", "num_workers": -1}, "num_workers=-1"),
    ]
    for kwargs, message in bad:
        with pytest.raises(DeviceError, match=message):
            TorchDevice(**kwargs).runtime()


def test_a_frozen_backbone_keeps_every_weight_and_statistic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mtmc_pipeline.training.train as train

    manifest, classes = _tiny_task(tmp_path / "data")
    initial: dict[str, torch.Tensor] = {}

    def recording_create_model(*args: object, **kwargs: object) -> torch.nn.Module:
        model = create_model(*args, **kwargs)  # type: ignore[arg-type]
        initial.update({k: v.clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(train, "create_model", recording_create_model)
    cfg = tiny_config(epochs=1, freeze_epochs=1)
    result = train_model(
        manifest, classes, None, tmp_path / "data", tmp_path / "cache", cfg,
        resolve_runtime("cpu"), lambda _: None,
    )  # fmt: skip
    after = result.model.state_dict()
    body = [k for k in after if not k.startswith("fc.")]
    assert any("running_mean" in k for k in body)
    changed = [k for k in body if not torch.equal(after[k], initial[k])]
    assert not changed, changed  # weights, running statistics and batch counters alike
    assert not torch.equal(after["fc.weight"], initial["fc.weight"])  # the head did train


def test_early_stopping_waits_for_the_val_loss_and_keeps_the_best_epochs_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mtmc_pipeline.training.train as train

    manifest, classes = _tiny_task(tmp_path / "data")
    f1 = iter([0.5, 0.9, 0.6, 0.6, 0.6, 0.95])  # best at epoch 1
    losses = iter([1.0, 0.8, 0.7, 0.75, 0.75, 0.1])  # still falling at epoch 2
    validated: list[dict[str, torch.Tensor]] = []
    loaders: list[object] = []

    def scripted_metrics(_: object) -> dict[str, float]:
        value = next(f1)
        return {"accuracy": value, "macro_f1": value, "balanced_accuracy": value}

    def recording_predict(model: torch.nn.Module, loader: object, *args: object) -> np.ndarray:
        validated.append({k: v.clone() for k, v in model.state_dict().items()})
        loaders.append(loader)
        return real_predict(model, loader, *args)

    real_predict = train.predict_logits
    monkeypatch.setattr(train, "summary_metrics", scripted_metrics)
    monkeypatch.setattr(train, "cross_entropy", lambda *_: next(losses))
    monkeypatch.setattr(train, "predict_logits", recording_predict)
    messages: list[str] = []
    cfg = tiny_config(epochs=6, patience=2)
    result = train_model(
        manifest, classes, None, tmp_path / "data", tmp_path / "cache", cfg,
        resolve_runtime("cpu"), messages.append,
    )  # fmt: skip
    # the monitor alone would have stopped after epoch 3; the loss last fell at epoch 2
    assert len(result.history) == len(validated) == 5
    assert all(loader is loaders[0] for loader in loaders)  # one validation loader, reused
    assert messages[-1] == "early stop: no gain in macro_f1 or val_loss for 2 epochs"
    assert result.best_epoch == 1 and result.best_metrics["macro_f1"] == 0.9
    weights = result.model.state_dict()
    assert all(torch.equal(weights[k], validated[1][k]) for k in weights)
    assert not all(torch.equal(weights[k], validated[4][k]) for k in weights)


def test_the_model_asset_logs_epochs_and_shows_its_training(
    tiny_root: Path, tmp_path: Path
) -> None:
    import json

    import dagster as dg

    from assets.definitions import build_definitions

    defs = build_definitions(tiny_root, tmp_path)
    job = defs.resolve_implicit_global_asset_job_def()
    stages = ["inventory", "integrity", "splits", "sampling_weights", "model"]
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(
            instance=instance,
            asset_selection=[dg.AssetKey(["digits", s]) for s in stages],
            run_config={"ops": {"digits__model": {"config": {"epochs": 2}}}},
        )
        logged = [e.user_message for e in instance.all_logs(result.run_id)]
    assert any(m.startswith("epoch 1/2: train_loss ") for m in logged)
    assert any(m.startswith("epoch 2/2: train_loss ") for m in logged)
    (event,) = [
        e
        for e in result.get_asset_materialization_events()
        if e.asset_key == dg.AssetKey(["digits", "model"])
    ]
    md = event.materialization.metadata
    assert {"curves", "history", "parameters", "device", "precision", "train_images_per_s"} <= set(
        md
    )
    assert md["parameters"].value > 0 and md["device"].value == "cpu, fp32"
    assert md["train_images_per_s"].value > 0 and "image/png" in md["curves"].value
    info = json.loads((tmp_path / "digits" / "model" / "model.json").read_text("utf-8"))
    assert info["best_epoch"] in (0, 1) and md["best_epoch"].value == info["best_epoch"] + 1
    assert {"accuracy", "macro_f1", "val_loss"} <= set(info["metrics"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_paths_train(tmp_path: Path, dtype: torch.dtype) -> None:
    """The GPU recipes' code paths, run on the CPU (which supports both autocast types): bf16
    autocast, and fp16 with a gradient scaler (unscaled before clipping)."""
    from mtmc_pipeline.training.train import _Stepper

    manifest, classes = _tiny_task(tmp_path / "data")
    cfg = tiny_config(epochs=2, clip_grad_norm=1)
    amp = Runtime(torch.device("cpu"), dtype)
    model = create_model("test_resnet", len(classes))
    stepper = _Stepper(model, torch.optim.SGD(model.parameters(), lr=0.1), cfg, amp)
    assert stepper.scaler.is_enabled() == (dtype == torch.float16)

    result = train_model(
        manifest, classes, None, tmp_path / "data", tmp_path / "cache", cfg, amp, log=print
    )
    history = result.history
    assert len(history) == 2 and np.isfinite(history["train_loss"]).all()
    assert np.isfinite(history["val_loss"]).all()
    assert all(torch.isfinite(t).all() for t in result.model.state_dict().values())


def test_cpu_bf16_backward_gives_the_fp32_weight_gradient() -> None:
    """The conv of test_resnet's layer 4 at 16 px (stride 2 onto a 1x1 map): oneDNN's bf16
    weight gradient is wrong there, at times NaN (what made bf16 training runs flaky); the
    runtime's backward kernels give the fp32 gradient up to bf16 rounding, every time."""
    conv = create_model("test_resnet", 2, log=lambda _: None).layer4[0].conv1
    x = torch.randn(4, conv.in_channels, 2, 2, generator=torch.Generator().manual_seed(0))
    w = conv.weight.detach().bfloat16().float().requires_grad_(True)
    F.conv2d(x.bfloat16().float(), w, None, conv.stride, conv.padding).sum().backward()
    expected = w.grad
    runtime = Runtime(torch.device("cpu"), torch.bfloat16)
    for _ in range(5):
        w = conv.weight.detach().clone().requires_grad_(True)
        with runtime.autocast():
            y = F.conv2d(x, w, None, conv.stride, conv.padding)
        with runtime.backward_kernels():
            y.float().sum().backward()
        assert torch.isfinite(w.grad).all()
        assert (w.grad - expected).abs().max() <= 0.02 * expected.abs().max()


@pytest.mark.parametrize("gamma", [0.3, 0.5, 2.0])
def test_focal_gradients_stay_finite_at_certain_samples(gamma: float) -> None:
    # a margin of 200: p = 1 exactly in fp32, where d/dp (1 - p)^gamma is infinite for gamma < 1
    logits = torch.tensor([[200.0, 0.0, 0.0], [0.0, 1.0, -1.0]], requires_grad=True)
    focal = build_loss(TrainConfig(loss="focal", focal_gamma=gamma), 3)
    loss = focal(logits, torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert logits.grad[0].abs().max() < 1e-3  # the certain sample contributes ~nothing
    half = logits.detach().half().requires_grad_(True)  # fp16 logits, as under fp16 autocast
    build_loss(TrainConfig(loss="focal", focal_gamma=gamma), 3)(
        half, torch.tensor([0, 1])
    ).backward()
    assert torch.isfinite(half.grad).all()


@pytest.mark.parametrize("mode", ["F", "I"])
def test_float_and_int32_images_with_negative_values_keep_their_order(
    tmp_path: Path, mode: str
) -> None:
    from PIL import Image

    from mtmc_pipeline.training.loader import load_rgb

    values = np.array([[-1.0, -0.5, 0.0, 0.5, 1.0]]) * (1 if mode == "F" else 1000)
    path = tmp_path / "signed.tif"
    Image.fromarray(values.astype(np.float32 if mode == "F" else np.int32), mode).save(path)
    gray = np.asarray(load_rgb(path))[0, :, 0].astype(int)
    assert gray.tolist() == [0, 64, 128, 191, 255]
