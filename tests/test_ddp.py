"""DDP training on two real gloo processes launched by torchrun: a killed run resumes from its
checkpoint, rank 0 alone writes, and the result is one process's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

from mtmc_pipeline import stages
from mtmc_pipeline.artifacts import TaskArtifacts
from mtmc_pipeline.config import load_task_config
from mtmc_pipeline.runtime import DeviceSettings
from mtmc_pipeline.stages.training import CHECKPOINT_FILE, run_training
from mtmc_pipeline.training.augment import AugmentSettings, BatchAugment
from mtmc_pipeline.training.distributed import GlobalBatchShard
from mtmc_pipeline.training.models import create_model
from mtmc_pipeline.training.train import seed_everything

REPO = Path(__file__).resolve().parents[1]
# GroupNorm treats every image on its own, so two ranks' shares give one process's gradients
RECIPE = {
    "model": "test_efficientnet_gn",
    "img_size": 16,
    "pretrained": False,
    "epochs": 3,
    "batch_size": 16,
    "optimizer": "adamw",
    "lr": 0.01,
    "weight_decay": 0.05,
    "patience": 10,
}


def _prepare(task_dir: Path, root: Path) -> TaskArtifacts:
    cfg = load_task_config(task_dir)
    art = TaskArtifacts(root, task_dir.name)
    stages.run_inventory(task_dir, art, cfg.scan)
    stages.run_integrity(task_dir, art, cfg.integrity)
    stages.run_splits(art, cfg.split)
    stages.run_sampling(art, cfg.sampling)
    return art


def _torchrun(task_dir: Path, root: Path, recipe: dict) -> subprocess.Popen[str]:
    """``torchrun --nproc-per-node 2 -m mtmc_pipeline.cli train`` on the CPU (gloo)."""
    sets = [f"--set={k}={json.dumps(v)}" for k, v in recipe.items()]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    train = ["-m", "mtmc_pipeline.cli", "train", str(task_dir), "--artifacts", str(root)]
    return subprocess.Popen(
        [*torchrun, *train, "--device=cpu", *sets],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_global_batch_shards_partition_every_batch() -> None:
    order = [7, 3, 9, 1, 4, 8, 2, 6, 5, 0, 11]
    shards = [list(GlobalBatchShard(order, 4, r, 2, drop_last=True)) for r in range(2)]  # type: ignore[arg-type]
    assert shards == [[7, 3, 4, 8], [9, 1, 2, 6]]  # the last 3 do not fill a global batch
    assert len(GlobalBatchShard(order, 4, 0, 2, drop_last=True)) == 4  # type: ignore[arg-type]


def test_each_share_is_augmented_as_in_the_global_batch() -> None:
    batch = torch.rand(8, 3, 16, 16) * 255
    whole = BatchAugment(AugmentSettings(), torch.Generator().manual_seed(3))(batch)
    shares = [
        BatchAugment(AugmentSettings(), torch.Generator().manual_seed(3), r, 2)(
            batch[r * 4 : r * 4 + 4]
        )
        for r in range(2)
    ]
    torch.testing.assert_close(torch.cat(shares), whole)


def test_killed_ddp_run_resumes_and_ends_as_one_process_run(
    tiny_copy: Path, tmp_path: Path
) -> None:
    """Two gloo ranks, killed after epoch 1 and restarted, end with one process's weights."""
    task_dir = tiny_copy / "digits"
    one = _prepare(task_dir, tmp_path / "one")
    two = _prepare(task_dir, tmp_path / "two")

    proc = _torchrun(task_dir, two.root, RECIPE)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("epoch 1/"):  # logged after the checkpoint is written
            proc.send_signal(signal.SIGTERM)  # torchrun stops both workers, as on preemption
            break
    proc.communicate(timeout=60)
    assert proc.returncode != 0, "".join(lines)
    assert (two.work_dir / CHECKPOINT_FILE).is_file()
    assert not (two.model_dir / "model.json").exists()

    proc = _torchrun(task_dir, two.root, RECIPE)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    epochs = [line[:8] for line in out.splitlines() if line.startswith("epoch ")]
    assert epochs == ["epoch 2/", "epoch 3/"], out  # resumed; rank 0 alone logs
    assert "resuming from the checkpoint after epoch 1/3" in out
    assert not (two.work_dir / CHECKPOINT_FILE).exists()

    cfg = load_task_config(task_dir, {"train": RECIPE}).train
    run_training(task_dir, one, cfg, DeviceSettings("cpu"), lambda _: None)
    a = load_file(str(one.model_dir / "weights.safetensors"))
    b = load_file(str(two.model_dir / "weights.safetensors"))
    assert a.keys() == b.keys()
    seed_everything(cfg.seed)  # the initial weights both runs started from
    init = create_model(cfg.model, 10, False, None, cfg.drop_rate, print, cfg.img_size)
    w0 = init.state_dict()
    step_a = torch.cat([(a[k] - w0[k]).flatten().double() for k in sorted(a)])
    step_b = torch.cat([(b[k] - w0[k]).flatten().double() for k in sorted(a)])
    # float noise (the order of the gradient sums) grows with the steps: compare what
    # training changed, as a whole
    assert (step_b - step_a).norm() / step_a.norm() < 1e-3, (step_b - step_a).norm() / step_a.norm()
    info_one, info_two = (
        json.loads((art.model_dir / "model.json").read_text("utf-8")) for art in (one, two)
    )
    assert info_two["processes"] == 2 and info_two["resumed_at_epoch"] == 1
    assert info_two["fingerprint"] == info_one["fingerprint"]
    ha = pd.read_parquet(one.model_dir / "history.parquet")
    hb = pd.read_parquet(two.model_dir / "history.parquet")
    assert (ha["images"] == hb["images"]).all()  # both ranks' images are counted
    torch.testing.assert_close(
        torch.tensor(hb["train_loss"].to_numpy()),
        torch.tensor(ha["train_loss"].to_numpy()),
        rtol=1e-3,
        atol=1e-4,
    )
    assert _files(two.root) == _files(one.root)  # rank 1 wrote nothing of its own
