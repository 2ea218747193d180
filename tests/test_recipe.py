"""The automatic recipe: resolver decisions, pretrained weights under auto, the small-image
model, the time budget, and a task without task.yaml trained end to end."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import save_file

from mtmc_pipeline import stages
from mtmc_pipeline.artifacts import TaskArtifacts, read_json
from mtmc_pipeline.config import TrainConfig, load_task_config
from mtmc_pipeline.demo import write_pattern
from mtmc_pipeline.errors import PretrainedUnavailableError
from mtmc_pipeline.runtime import DeviceSettings
from mtmc_pipeline.stages.training import run_training
from mtmc_pipeline.training.budget import EpochPlanner, refit_epochs
from mtmc_pipeline.training.models import create_model, find_pretrained, load_bundle, save_bundle
from mtmc_pipeline.training.recipe import (
    MAX_EPOCHS,
    SMALL_IMAGE_MODELS,
    DataProfile,
    DeviceProfile,
    resolve_recipe,
)
from mtmc_pipeline.training.schedules import build_schedule
from mtmc_pipeline.training.train import RESOLVED_BY_RECIPE

TINY_GREY = DataProfile(
    median_side=28, grey=True, num_classes=10, train_images=12_000, min_per_class=1_000
)
PHOTOS = DataProfile(
    median_side=375, grey=False, num_classes=20, train_images=4_000, min_per_class=100
)
TWO_CORES = DeviceProfile("cpu", 2)
H200 = DeviceProfile("cuda", 16, "NVIDIA H200", 139.8)
AUTO_SETTINGS = {*RESOLVED_BY_RECIPE, "time_budget_minutes"}


def nowhere(model: str) -> None:
    return None


def test_tiny_grey_images_on_a_cpu_keep_their_size_and_get_the_cpu_budget() -> None:
    asked: list[str] = []
    recipe = resolve_recipe(TrainConfig(), TINY_GREY, TWO_CORES, lambda m: asked.append(m))
    assert asked == []  # no weights are published for the small-image models: none looked for
    cfg = recipe.config
    assert (cfg.model, cfg.img_size, cfg.pretrained) == ("small_resnet_s1", 28, False)
    assert cfg.batch_size == 64
    # from scratch: SGD at 0.2 for batch 32, scaled by sqrt(batch / 32), with its own decay
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay) == (
        "sgd",
        pytest.approx(0.2 * 2**0.5, abs=1e-6),
        5e-3,
    )
    assert cfg.time_budget_minutes == pytest.approx(7.5)  # ~12,000 small images: ~8 minutes
    assert set(recipe.reasons) == AUTO_SETTINGS and all(recipe.reasons.values())
    assert recipe.as_json()["model"]["value"] == "small_resnet_s1"
    textures = DataProfile(64, False, 5, 376, 16)  # never halved: fine textures would blur
    small = resolve_recipe(TrainConfig(), textures, TWO_CORES, nowhere).config
    assert (small.model, small.img_size, small.batch_size) == ("small_resnet_s2", 64, 32)
    half = DataProfile(28, True, 10, 6_000, 500)
    assert resolve_recipe(TrainConfig(), half, TWO_CORES, nowhere).config.time_budget_minutes == (
        pytest.approx(3.75)
    )


def test_colour_photos_on_a_cpu_start_from_weights_when_they_are_found() -> None:
    asked: list[str] = []

    def probe(model: str) -> str | None:
        asked.append(model)
        return "/weights/resnet18.safetensors" if model == "resnet18" else None

    cfg = resolve_recipe(TrainConfig(), PHOTOS, TWO_CORES, probe).config
    assert (cfg.model, cfg.pretrained, cfg.pretrained_path) == (
        "resnet18",
        True,
        "/weights/resnet18.safetensors",
    )
    assert cfg.img_size == 128  # a CPU caps the size
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay) == (
        "adamw",
        1e-3,  # batch 64
        0.05,
    )
    assert asked == ["resnet18"]  # asked once, though both the size and the model need it
    offline = resolve_recipe(TrainConfig(), PHOTOS, TWO_CORES, nowhere)
    cfg = offline.config
    # from scratch on a CPU: 64 px on the stride-2 small model, which fits more epochs
    assert (cfg.model, cfg.img_size, cfg.pretrained, cfg.pretrained_path) == (
        "small_resnet_s2",
        64,
        False,
        None,
    )
    assert "no pretrained weights" in offline.reasons["img_size"]
    assert (cfg.optimizer, cfg.lr) == ("sgd", pytest.approx(0.2 * 2**0.5, abs=1e-6))  # batch 64
    no_weights = resolve_recipe(TrainConfig(pretrained=False), PHOTOS, TWO_CORES, probe).config
    assert no_weights.img_size == 64 and asked == ["resnet18"]  # not asked: not wanted
    # a model named by hand is not shrunk to the small model's size
    named = resolve_recipe(TrainConfig(model="resnet10t"), PHOTOS, TWO_CORES, nowhere).config
    assert (named.img_size, named.optimizer, named.lr) == (128, "adamw", 8e-3)


def test_a_gpu_profile_gets_full_size_large_batches_and_a_data_sized_budget() -> None:
    recipe = resolve_recipe(TrainConfig(), PHOTOS, H200, lambda m: f"/cache/{m}.safetensors")
    cfg = recipe.config
    assert (cfg.model, cfg.img_size, cfg.pretrained) == ("resnet50", 224, True)
    assert cfg.batch_size == 128  # 64 at 224 px, doubled on >= 40 GiB
    assert cfg.time_budget_minutes == pytest.approx(4.0)  # 4,000 images: 1 min per 1,000
    assert "H200" in recipe.reasons["model"]
    small_gpu = resolve_recipe(
        TrainConfig(), TINY_GREY, DeviceProfile("cuda", 8, "T4", 15.0), nowhere
    ).config
    assert (small_gpu.model, small_gpu.batch_size) == ("small_resnet_s1", 256)
    assert (small_gpu.optimizer, small_gpu.lr) == ("sgd", 0.4)  # large batches: capped


def test_explicit_settings_always_win() -> None:
    explicit = TrainConfig(
        model="resnet18",
        img_size=96,
        pretrained=False,
        epochs=5,
        batch_size=16,
        optimizer="radam",
        lr=0.1,
        weight_decay=0.0,
    )
    recipe = resolve_recipe(explicit, TINY_GREY, H200, lambda m: "/found.safetensors")
    assert (
        recipe.config.model_dump()
        == explicit.model_copy(update={"time_budget_minutes": "none"}).model_dump()
    )
    assert set(recipe.reasons) == {"time_budget_minutes"}  # epochs set: no budget
    adamw = resolve_recipe(TrainConfig(optimizer="adamw"), TINY_GREY, TWO_CORES, nowhere).config
    assert (adamw.lr, adamw.weight_decay) == (8e-3, 0.05)  # from scratch, batch 64
    budgeted = TrainConfig(epochs=5, time_budget_minutes=2)
    assert resolve_recipe(budgeted, TINY_GREY, TWO_CORES, nowhere).config.time_budget_minutes == 2


def test_a_group_resolves_for_its_member_with_the_largest_images() -> None:
    small = DataProfile(
        median_side=32, grey=False, num_classes=10, train_images=1_000, min_per_class=90
    )
    larger = DataProfile(
        median_side=64, grey=True, num_classes=4, train_images=400, min_per_class=80
    )
    pooled = DataProfile.combined([small, small, larger])
    assert (pooled.median_side, pooled.grey) == (64, False)
    assert (pooled.num_classes, pooled.train_images, pooled.min_per_class) == (10, 2_400, 80)
    recipe = resolve_recipe(TrainConfig(), pooled, TWO_CORES, nowhere).config
    assert (recipe.img_size, recipe.model, recipe.optimizer) == (64, SMALL_IMAGE_MODELS[1], "sgd")


def test_resolution_is_deterministic() -> None:
    for data, device in ((TINY_GREY, TWO_CORES), (PHOTOS, H200), (PHOTOS, TWO_CORES)):
        a = resolve_recipe(TrainConfig(), data, device, nowhere)
        b = resolve_recipe(TrainConfig(), data, device, nowhere)
        assert a.config.model_dump() == b.config.model_dump() and a.reasons == b.reasons


def _empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import huggingface_hub.constants

    hf = tmp_path / "hf"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    return hf


def test_pretrained_auto_offline_trains_from_scratch_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _empty_caches(tmp_path, monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    assert find_pretrained("resnet18") is None
    assert time.perf_counter() - start < 1.0  # no request is made, so nothing can hang
    recipe = resolve_recipe(TrainConfig(), PHOTOS, TWO_CORES, find_pretrained)
    assert recipe.config.pretrained is False and "from scratch" in recipe.reasons["pretrained"]
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as read at import
    with pytest.raises(PretrainedUnavailableError, match="pretrained = true"):
        create_model("test_resnet", 3, pretrained=True)  # explicit true still fails loudly


def test_weights_in_the_local_hugging_face_cache_are_used_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hf = _empty_caches(tmp_path, monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = timm.create_model("test_resnet", num_classes=1000)
    repo = hf / "models--timm--test_resnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    weights = repo / "snapshots" / "abc123" / "model.safetensors"
    save_file(source.state_dict(), str(weights))
    assert find_pretrained("test_resnet") == str(weights)
    cfg = resolve_recipe(
        TrainConfig(model="test_resnet"), TINY_GREY, TWO_CORES, find_pretrained
    ).config
    assert cfg.pretrained is True and cfg.pretrained_path == str(weights)
    model = create_model(cfg.model, 3, cfg.pretrained, cfg.pretrained_path, log=lambda _: None)
    assert torch.equal(model.conv1[0].weight, source.conv1[0].weight)


def test_small_image_models_keep_resolution_and_round_trip(tmp_path: Path) -> None:
    x = torch.rand(2, 3, 32, 32)
    imagenet_stem = timm.create_model("resnet10t", num_classes=4).eval()
    assert imagenet_stem.forward_features(x).shape[-1] == 1  # 32 px shrink to 1x1
    small = create_model("small_resnet_s1", 4).eval()
    assert small.forward_features(x).shape[-2:] == (4, 4)
    assert create_model("small_resnet_s2", 4).eval().forward_features(
        torch.rand(2, 3, 64, 64)
    ).shape[-2:] == (4, 4)
    for name in SMALL_IMAGE_MODELS:  # what pretrained: auto does not look for
        assert name in timm.list_models() and not timm.models.is_model_pretrained(name)
    save_bundle(tmp_path, small, {"arch": "small_resnet_s1", "class_names": list("abcd")})
    loaded, _ = load_bundle(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x))


def test_the_budget_bounds_the_epochs() -> None:
    planner = EpochPlanner(60.0, 50, steps_per_epoch=10, images_per_step=32, val_images=96)
    # 0.5 s per step: 5 s training + 96 images x 0.5/32 s x 1/3 validation = 5.5 s an epoch
    assert planner.plan(0.5) == 10
    assert planner.plan(0.001) == 50  # capped
    assert planner.plan(100.0) == 1  # at least one epoch
    planner.begin()
    plans = [planner.step_done() for _ in range(9)]
    assert plans[:-1] == [None] * 8 and plans[-1] == 50  # 8 steps timed after the first


def test_the_epochs_are_fitted_again_after_every_epoch() -> None:
    """A first measurement made while another step shared the CPU is corrected: the mean epoch
    time so far decides, within the cap and never below what is done."""
    slow_start = [3.0, 1.0, 1.0, 1.0]  # 1.5 s a mean epoch: 60 s fit 40
    assert refit_epochs(60.0, 50, slow_start) == 40
    assert refit_epochs(60.0, 30, slow_start) == 30  # capped
    assert refit_epochs(60.0, 50, [30.0, 40.0]) == 2  # over the budget: stop now
    assert refit_epochs(60.0, 50, [0.0]) == 50


def test_a_compressed_cosine_ends_at_its_floor() -> None:
    cfg = TrainConfig(lr=1.0, epochs=60, warmup_epochs=1, min_lr_ratio=0.01)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = build_schedule(opt, cfg.model_copy(update={"epochs": 7}), 5)
    for update in range(1, 7 * 5 + 1):
        schedule.step_update(update)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)


def test_a_task_without_task_yaml_trains_end_to_end_in_its_budget(tmp_path: Path) -> None:
    task_dir = tmp_path / "data" / "pattern"
    write_pattern(task_dir, (16, 12, 10, 8, 8), (4, 4, 4, 4, 4), size=32)
    assert not (task_dir / "task.yaml").exists()
    cfg = load_task_config(task_dir, {"train": {"time_budget_minutes": 0.05, "patience": 60}})
    art = TaskArtifacts(tmp_path / "artifacts", "pattern")
    stages.run_inventory(task_dir, art, cfg.scan)
    stages.run_integrity(task_dir, art, cfg.integrity)
    stages.run_splits(art, cfg.split)
    stages.run_sampling(art, cfg.sampling)
    lines: list[str] = []
    result = run_training(task_dir, art, cfg.train, DeviceSettings("cpu"), lines.append)
    info = read_json(art.model_dir / "model.json")
    assert info["arch"] == "small_resnet_s1" and info["img_size"] == 32
    assert info["recipe"]["pretrained"] == {
        "value": False,
        "reason": "small_resnet_s1 has no published weights: from scratch",
    }
    assert set(info["recipe"]) == AUTO_SETTINGS - {"time_budget_minutes"}  # set in run config
    planned = info["epochs_planned"]  # a 3-second budget, not early stopping, ends the run
    assert info["epochs_run"] == planned < MAX_EPOCHS
    assert "time budget 0.05 min" in info["time_budget"]
    assert f": {planned} epoch(s)" in info["time_budget"]  # its last fit
    history = pd.read_parquet(art.model_dir / "history.parquet")
    assert history["epoch"].tolist() == list(range(planned))
    assert info["recipe_inputs"]["data"]["median_side"] == 32
    assert info["recipe_inputs"]["device"]["kind"] == "cpu"
    assert any(line.startswith("recipe: model = small_resnet_s1") for line in lines)
    assert "small_resnet_s1" in result.metadata["recipe"].text
    again = run_training(task_dir, art, cfg.train, DeviceSettings("cpu"), lines.append)
    assert again.reused and again.fingerprint == result.fingerprint
