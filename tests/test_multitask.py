"""Shared backbone, one head per task: the heads, the interleaved training and the bundles."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mtmc_pipeline import artifacts as af
from mtmc_pipeline import stages
from mtmc_pipeline.artifacts import TaskArtifacts, group_dir
from mtmc_pipeline.config import ConfigError, SamplingConfig, TrainConfig, load_task_config
from mtmc_pipeline.data.groups import SharedGroup, read_groups
from mtmc_pipeline.data.splits import read_manifest
from mtmc_pipeline.runtime import DeviceSettings, resolve_runtime
from mtmc_pipeline.stages.shared import run_shared_training
from mtmc_pipeline.stages.training import run_training
from mtmc_pipeline.training.adaptive import class_shares, draw_weights, per_class_metric
from mtmc_pipeline.training.checkpoint import Checkpoint
from mtmc_pipeline.training.loader import Normalize
from mtmc_pipeline.training.models import Preprocess, load_bundle
from mtmc_pipeline.training.multitask import (
    TaskData,
    create_multihead,
    load_joint_bundle,
    part_sizes,
    task_batches,
    task_schedule,
    train_multitask,
)
from mtmc_pipeline.training.train import _Stepper, build_optimizer

RECIPE = {
    "model": "test_resnet",
    "img_size": 32,
    "pretrained": False,
    "epochs": 3,
    "batch_size": 16,
    "optimizer": "adamw",
    "lr": 0.01,
    "weight_decay": 0.05,
}
CPU = resolve_runtime("cpu")


def _tiny_net(classes: list[int]):
    return create_multihead("test_resnet", classes, TrainConfig(**RECIPE))


def test_every_head_reads_the_backbone_feature() -> None:
    torch.manual_seed(0)
    net = _tiny_net([3, 5, 4]).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        feature = net.backbone(x)
        outs = net(x)
        assert [o.shape[1] for o in outs] == [3, 5, 4]
        for k, head in enumerate(net.heads):
            assert head.in_features == feature.shape[1]
            torch.testing.assert_close(outs[k], head(feature), rtol=0, atol=0)
            torch.testing.assert_close(net.forward_task(x, k), outs[k], rtol=0, atol=0)
        net.heads[0].weight.add_(1.0)  # a changed head 0 changes nothing downstream of it
        after = net(x)
    torch.testing.assert_close(after[1], outs[1], rtol=0, atol=0)
    torch.testing.assert_close(after[2], outs[2], rtol=0, atol=0)
    assert not torch.allclose(after[0], outs[0])


def test_a_batch_of_task_a_does_not_move_task_b_head() -> None:
    torch.manual_seed(0)
    config = TrainConfig(**RECIPE)  # adamw with weight decay: decay must not touch head B
    net = _tiny_net([3, 4]).train()
    stepper = _Stepper(net, build_optimizer(net, config), config, CPU)
    x = torch.rand(8, 3, 32, 32)
    loss = torch.nn.CrossEntropyLoss()
    stepper(loss(net.forward_task(x, 1), torch.randint(0, 4, (8,))))  # head B has Adam state
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for _ in range(3):
        stepper(loss(net.forward_task(x, 0), torch.randint(0, 3, (8,))))
    after = net.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("heads.1."))
    assert not torch.equal(after["heads.0.weight"], before["heads.0.weight"])
    moved = [
        k for k in before if k.startswith("backbone.") and not torch.equal(after[k], before[k])
    ]
    assert moved


def test_schedule_holds_every_batch_once_and_is_seeded() -> None:
    order = task_schedule([5, 2, 3], seed=1, epoch=4)
    assert sorted(order) == [0] * 5 + [1] * 2 + [2] * 3
    assert order == task_schedule([5, 2, 3], seed=1, epoch=4)
    assert order != task_schedule([5, 2, 3], seed=1, epoch=5)
    assert task_schedule([4], seed=1, epoch=0) == [0, 0, 0, 0]


def test_task_sampling_sets_each_members_share_of_the_batches() -> None:
    assert task_batches([9, 2, 4], "proportional") == [9, 2, 4]
    assert task_batches([9, 2, 4], "equal") == [9, 9, 9]
    assert part_sizes([900, 200, 100], 64, "equal") == [21, 21, 21]
    assert part_sizes([900, 200, 100], 64, "proportional") == [48, 11, 5]
    assert part_sizes([900, 10], 16, "proportional") == [16, 2]  # never fewer than 2
    assert part_sizes([50], 16, "equal") == [16]
    with pytest.raises(ValueError, match="task_sampling = 'sqrt'"):
        task_batches([9, 2], "sqrt")


def test_a_mixed_batch_sends_each_part_to_its_own_head_only() -> None:
    torch.manual_seed(0)
    net = _tiny_net([3, 4])
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        net.eval()  # running statistics: each image's logits depend on that image only
        first, second = net.forward_parts(x, [1, 0], [2, 3])
        torch.testing.assert_close(first, net.forward_task(x[:2], 1))
        torch.testing.assert_close(second, net.forward_task(x[2:], 0))
    net.train()
    out = net.forward_parts(x, [0, 1], [3, 2])
    torch.nn.functional.cross_entropy(out[0], torch.tensor([0, 1, 2])).backward()
    assert net.heads[1].weight.grad is None  # task 1's head got nothing from task 0's images
    assert net.heads[0].weight.grad is not None


def _prepare(root: Path, data: Path, task: str) -> TaskArtifacts:
    cfg = load_task_config(data / task)
    art = TaskArtifacts(root, task)
    stages.run_inventory(data / task, art, cfg.scan)
    stages.run_integrity(data / task, art, cfg.integrity)
    stages.run_splits(art, cfg.split)
    stages.run_sampling(art, cfg.sampling)
    return art


@pytest.fixture(scope="module")
def prepared(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Manifests of both tiny demo tasks (copy before training into it)."""
    root = tmp_path_factory.mktemp("prepared")
    for task in ("digits", "pattern"):
        _prepare(root, tiny_root, task)
    return root


def _task_data(root: Path, data: Path, task: str, sampling: SamplingConfig | None = None):
    art = TaskArtifacts(root, task)
    manifest, classes = read_manifest(art.splits)
    return TaskData(
        task,
        manifest,
        classes,
        af.read_parquet(art.sampling_weights),
        data / task,
        art.work_dir / "cache",
        sampling or SamplingConfig(),
    )


def test_group_stage_writes_bundles_whose_logits_match(
    prepared: Path, tiny_root: Path, tmp_path: Path
) -> None:
    root = tmp_path / "art"
    shutil.copytree(prepared, root)
    group = SharedGroup(
        name="两个",
        tasks=["digits", "pattern"],
        loss_weights={"pattern": 2.0},
        freeze_backbone_at=2,
    )
    config = TrainConfig(**{**RECIPE, "epochs": 2})
    result = run_shared_training(group, tiny_root, root, config, CPU, lambda _: None)
    assert not result.reused and result.metadata["epochs_run"] == 2
    joint, info = load_joint_bundle(group_dir(root, group.name) / "model")
    assert [t["task"] for t in info["tasks"]] == ["digits", "pattern"]
    assert (info["task_sampling"], info["batch_mixing"]) == ("equal", "mixed")
    x = torch.rand(6, 3, 32, 32) * 255
    normalize = Normalize(Preprocess.from_info(info), CPU.device, channels_last=True)
    with torch.no_grad():
        together = joint(normalize(x))
        for k, task in enumerate(group.tasks):
            alone, task_info = load_bundle(root / task / "model")
            assert task_info["shared_group"] == group.name
            assert len(task_info["class_names"]) == together[k].shape[1]
            torch.testing.assert_close(alone(normalize(x)), together[k], rtol=1e-5, atol=1e-5)
    history = af.read_parquet(root / "pattern" / "model" / "history.parquet")
    assert len(history) == 2 and "val_accuracy" in history
    assert history["frozen"].tolist() == [False, True]  # the late freeze
    again = run_shared_training(group, tiny_root, root, config, CPU, lambda _: None)
    assert again.reused


class _KilledAfter(Checkpoint):
    """A real checkpoint whose run stops (as if killed) once ``epochs`` epochs are saved."""

    def __init__(self, path: Path, fingerprint: str, epochs: int) -> None:
        super().__init__(path, fingerprint)
        self.epochs = epochs

    def save(self, state: dict) -> None:
        super().save(state)
        if state["epoch"] == self.epochs:
            raise KeyboardInterrupt


@pytest.mark.parametrize("mixing", ["mixed", "interleaved"])
def test_resumed_group_training_ends_as_an_uninterrupted_run(
    prepared: Path, tiny_root: Path, tmp_path: Path, mixing: str
) -> None:
    root = tmp_path / "art"
    shutil.copytree(prepared, root)
    adaptive = SamplingConfig(adaptive=True, adaptive_period=1)
    tasks = [_task_data(root, tiny_root, t, adaptive) for t in ("digits", "pattern")]
    config = TrainConfig(**RECIPE)
    path = tmp_path / "ckpt.safetensors"
    killed = _KilledAfter(path, "fp", 2)
    with pytest.raises(KeyboardInterrupt):
        train_multitask(tasks, config, CPU, lambda _: None, killed, batch_mixing=mixing)
    messages: list[str] = []
    resumed = train_multitask(
        tasks, config, CPU, messages.append, Checkpoint(path, "fp"), batch_mixing=mixing
    )
    assert resumed.resumed_at_epoch == 2
    assert any(m.startswith("resuming from the checkpoint after epoch 2/3") for m in messages)
    whole = train_multitask(tasks, config, CPU, lambda _: None, batch_mixing=mixing)
    a, b = resumed.model.state_dict(), whole.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    timing = ["images_per_second", "step_seconds", "seconds"]
    ha, hb = resumed.history.drop(columns=timing), whole.history.drop(columns=timing)
    assert ha.drop(columns="class_shares").equals(hb.drop(columns="class_shares"))
    assert ha["class_shares"].map(list).tolist() == hb["class_shares"].map(list).tolist()
    # every epoch re-set the shares (period 1), and each re-set is in the history
    assert ha["class_shares"].map(len).tolist() == [10, 5] * 3
    # equal sampling: the smaller task drew again until it had as many images as the larger
    train = [len(t.manifest.query("split == 'train'")) for t in tasks]
    images = ha.groupby("task", sort=False)["images"].first().tolist()
    assert train[1] < train[0] and images[0] == images[1] > train[1]


def test_a_group_of_one_trains_what_the_plain_task_trains(
    prepared: Path, tiny_root: Path, tmp_path: Path
) -> None:
    plain, grouped = tmp_path / "plain", tmp_path / "grouped"
    shutil.copytree(prepared, plain)
    shutil.copytree(prepared, grouped)
    config = TrainConfig(**{**RECIPE, "epochs": 2})
    plain_art = TaskArtifacts(plain, "pattern")
    run_training(tiny_root / "pattern", plain_art, config, DeviceSettings("cpu"), print)
    run_shared_training(
        SharedGroup(name="one", tasks=["pattern"]), tiny_root, grouped, config, CPU, print
    )
    a = load_file(str(plain / "pattern" / "model" / "weights.safetensors"))
    b = load_file(str(grouped / "pattern" / "model" / "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha = af.read_parquet(plain / "pattern" / "model" / "history.parquet")
    hb = af.read_parquet(grouped / "pattern" / "model" / "history.parquet")
    assert ha["val_loss"].tolist() == hb["val_loss"].tolist()


def test_adaptive_shares_follow_the_formula() -> None:
    cm = np.array([[8, 2, 0], [0, 5, 5], [0, 0, 0]])  # recall 0.8, 0.5, no val images
    recall = per_class_metric(cm, "recall")
    np.testing.assert_allclose(recall, [0.8, 0.5, 0.0])
    np.testing.assert_allclose(per_class_metric(cm, "precision"), [1.0, 5 / 7, 0.0])
    shares = class_shares(recall, SamplingConfig(adaptive=True, adaptive_min=10))
    raw = np.array([10 + 0.2 * 10, 10 + 0.5 * 10, 20])  # M + (1 - r)(N - M), N = 2M
    np.testing.assert_allclose(shares, raw / raw.sum())
    labels = np.array([0, 0, 0, 1, 2])
    w = draw_weights(labels, shares)
    assert w.mean() == pytest.approx(1.0)
    np.testing.assert_allclose([w[:3].sum(), w[3], w[4]] / w.sum(), shares)


def test_groups_file_errors_name_the_file_and_the_problem(tmp_path: Path) -> None:
    (tmp_path / "mtmc.yaml").write_text("shared:\n  g: [a, missing]\n", "utf-8")
    with pytest.raises(ConfigError, match=r"mtmc.yaml: shared.g: 'missing' is not a task folder"):
        read_groups(tmp_path, ["a", "b"])
    (tmp_path / "mtmc.yaml").write_text("shared:\n  g: [a, b]\n  h: {tasks: [b]}\n", "utf-8")
    with pytest.raises(ConfigError, match=r"task 'b' is in two groups, 'g' and 'h'"):
        read_groups(tmp_path, ["a", "b"])
    (tmp_path / "mtmc.yaml").write_text("shared:\n  g: {tasks: [a], loss_weight: 2}\n", "utf-8")
    with pytest.raises(ConfigError, match=r"shared.g: loss_weight: Extra inputs"):
        read_groups(tmp_path, ["a", "b"])
    (tmp_path / "mtmc.yaml").write_text(
        "shared:\n  条纹组: {tasks: [a, b], loss_weights: {b: 0.5}}\n", "utf-8"
    )
    (group,) = read_groups(tmp_path, ["a", "b"])
    assert group.name == "条纹组" and (group.weight("a"), group.weight("b")) == (1.0, 0.5)
    assert read_groups(tmp_path / "nothing", []) == []


def test_a_plain_task_with_adaptive_sampling_logs_and_records_every_reset(
    prepared: Path, tiny_root: Path, tmp_path: Path
) -> None:
    shutil.copytree(prepared, tmp_path / "art")
    art = TaskArtifacts(tmp_path / "art", "pattern")
    stages.run_sampling(art, SamplingConfig(adaptive=True, adaptive_period=1))
    messages: list[str] = []
    config = TrainConfig(**{**RECIPE, "epochs": 2})
    run_training(tiny_root / "pattern", art, config, DeviceSettings("cpu"), messages.append)
    resets = [m for m in messages if "adaptive balancing from val recall" in m]
    assert len(resets) == 2
    history = af.read_parquet(art.model_dir / "history.parquet")
    shares = history["class_shares"].map(list).tolist()
    assert len(shares) == 2 and all(len(s) == 5 and sum(s) == pytest.approx(1) for s in shares)
    alone, _ = load_bundle(art.model_dir)
    assert alone(torch.zeros(1, 3, 32, 32)).shape == (1, 5)


def test_a_group_stops_early_on_the_mean_of_its_members_val_losses() -> None:
    from mtmc_pipeline.training.multitask import _epoch_rows
    from mtmc_pipeline.training.train import _stalled

    losses = {"a": [1.0, 0.5, 0.9, 0.9], "b": [1.0, 1.6, 0.6, 0.9]}  # means fall until epoch 2
    history = [
        {"epoch": e, "task": t, "val_loss": per_epoch[e], "early_frozen": False}
        for e in range(4)
        for t, per_epoch in losses.items()
    ]
    config = TrainConfig(patience=2)
    rows = _epoch_rows(history)
    assert [round(r["val_loss"], 6) for r in rows] == [1.0, 1.05, 0.75, 0.9]
    assert not _stalled(rows, 0, config)  # task a alone would have stopped at epoch 3
    assert _stalled([*rows[:3], {**rows[3], "epoch": 4}], 0, config)


def test_mixup_mixes_within_each_part_of_a_mixed_batch(
    prepared: Path, tiny_root: Path, tmp_path: Path
) -> None:
    shutil.copytree(prepared, tmp_path / "art")
    tasks = [_task_data(tmp_path / "art", tiny_root, t) for t in ("digits", "pattern")]
    config = TrainConfig(**{**RECIPE, "epochs": 1, "mixup_alpha": 0.2})
    result = train_multitask(tasks, config, CPU, lambda _: None)
    history = result.history
    assert np.isfinite(history["train_loss"]).all()
    assert history["images"].nunique() == 1  # equal parts, the smaller task drawing again
