"""The training state on disk: checkpoints, a real training process killed mid-run, bundles."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from mtmc_pipeline import stages
from mtmc_pipeline.artifacts import TaskArtifacts
from mtmc_pipeline.config import load_task_config
from mtmc_pipeline.runtime import DeviceSettings
from mtmc_pipeline.stages.training import CHECKPOINT_FILE, run_training
from mtmc_pipeline.training.checkpoint import Checkpoint

EPOCHS = 6
# every random stream the loop draws from: sampler, batch augmentation, RandAugment (torch),
# Mixup (numpy), dropout; plus EMA and plateau state that must survive the restart
RECIPE = {
    "model": "test_resnet",
    "img_size": 16,
    "epochs": EPOCHS,
    "batch_size": 16,
    "drop_rate": 0.2,
    "ema": True,
    "mixup_alpha": 0.4,
    "randaugment": True,
    "scheduler": "plateau",
    "patience": EPOCHS,
}
CHILD = """
import sys
from pathlib import Path
from mtmc_pipeline.artifacts import TaskArtifacts
from mtmc_pipeline.config import load_task_config
from mtmc_pipeline.runtime import DeviceSettings
from mtmc_pipeline.stages.training import run_training

task_dir, root, recipe = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
cfg = load_task_config(task_dir, {"train": __import__("json").loads(recipe)})
art = TaskArtifacts(root, "digits")
run_training(task_dir, art, cfg.train, DeviceSettings("cpu"), lambda m: print(m, flush=True))
"""


@pytest.fixture
def forbid_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("pickle was used on a load path")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def test_checkpoint_round_trip_without_pickle(tmp_path: Path, forbid_pickle: None) -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    np.random.seed(3)
    state = {
        "optimizer": opt.state_dict(),  # integer keys, tuples, tensors
        "numpy": np.random.get_state(),  # a tuple holding a uint32 array
        "best": -np.inf,
        "shared": [model.weight, model.weight],  # the same memory twice
    }
    ckpt = Checkpoint(tmp_path / "c.safetensors", "fp1")
    ckpt.save(state)
    loaded, why = ckpt.load()
    assert why == "resumed" and loaded is not None
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(
        loaded["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"]
    )
    saved_np = state["numpy"]
    assert loaded["numpy"][0] == saved_np[0] and np.array_equal(loaded["numpy"][1], saved_np[1])
    assert loaded["numpy"][1].dtype == np.uint32 and loaded["best"] == -np.inf
    assert torch.equal(loaded["shared"][1], model.weight.detach())


def test_checkpoint_of_other_inputs_or_damaged_is_not_resumed(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    Checkpoint(path, "fp1").save({"epoch": 3})
    assert Checkpoint(path, "fp2").load() == (
        None,
        "the checkpoint was made from other inputs or settings",
    )
    path.write_bytes(path.read_bytes()[:20])
    state, why = Checkpoint(path, "fp1").load()
    assert state is None and why.startswith("the checkpoint is unreadable")
    assert Checkpoint(tmp_path / "none.safetensors", "fp1").load() == (None, "no checkpoint")


def _prepare(task_dir: Path, root: Path) -> TaskArtifacts:
    cfg = load_task_config(task_dir)
    art = TaskArtifacts(root, "digits")
    stages.run_inventory(task_dir, art, cfg.scan)
    stages.run_integrity(task_dir, art, cfg.integrity)
    stages.run_splits(art, cfg.split)
    stages.run_sampling(art, cfg.sampling)
    return art


def _kill_after_epoch(task_dir: Path, root: Path, epoch: int) -> list[str]:
    """Run the model stage in a child process and SIGKILL it once ``epoch`` is logged."""
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(task_dir), str(root), json.dumps(RECIPE)],
        cwd=repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f"epoch {epoch}/"):
            proc.kill()
            break
    proc.wait(timeout=60)
    assert proc.returncode == -9, "".join(lines)
    return lines


def test_killed_training_resumes_and_ends_as_an_uninterrupted_run(
    tiny_copy: Path, tmp_path: Path
) -> None:
    task_dir = tiny_copy / "digits"
    killed = _prepare(task_dir, tmp_path / "killed")
    shutil.copytree(killed.root, tmp_path / "whole")
    whole = TaskArtifacts(tmp_path / "whole", "digits")
    cfg = load_task_config(task_dir, {"train": RECIPE}).train
    cpu = DeviceSettings("cpu")

    _kill_after_epoch(task_dir, killed.root, 2)
    assert (killed.work_dir / CHECKPOINT_FILE).is_file()
    assert not (killed.model_dir / "model.json").exists()  # the bundle is never half-written

    messages: list[str] = []
    resumed = run_training(task_dir, killed, cfg, cpu, messages.append)
    starts = [m for m in messages if m.startswith("resuming from the checkpoint after epoch")]
    assert len(starts) == 1, messages
    first_epoch = int(starts[0].split("epoch ")[1].split("/")[0])
    assert 2 <= first_epoch < EPOCHS
    assert not any(m.startswith("epoch 1/") for m in messages)
    assert resumed.metadata["resumed_at_epoch"] == first_epoch + 1
    assert not (killed.work_dir / CHECKPOINT_FILE).exists()  # removed once the bundle is in

    run_training(task_dir, whole, cfg, cpu, lambda _: None)
    a = load_file(str(killed.model_dir / "weights.safetensors"))
    b = load_file(str(whole.model_dir / "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    timing = ["images_per_second", "step_seconds", "seconds"]
    ha = pd.read_parquet(killed.model_dir / "history.parquet").drop(columns=timing)
    hb = pd.read_parquet(whole.model_dir / "history.parquet").drop(columns=timing)
    pd.testing.assert_frame_equal(ha, hb)
    assert len(ha) == EPOCHS


def test_bundle_rebuilds_without_pickle(tmp_path: Path, forbid_pickle: None) -> None:
    from mtmc_pipeline.training.models import create_model, load_bundle, save_bundle

    model = create_model("test_resnet", 3).eval()
    info = {"arch": "test_resnet", "class_names": ["a", "b", "c"], "img_size": 16}
    save_bundle(tmp_path, model, info)
    loaded, loaded_info = load_bundle(tmp_path)
    x = torch.rand(2, 3, 16, 16)
    assert loaded_info == info and not loaded.training
    saved = model.state_dict()
    assert all(torch.equal(t, saved[k]) for k, t in loaded.state_dict().items())
    # loaded channels-last for inference: the same function up to float summation order
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-6)
