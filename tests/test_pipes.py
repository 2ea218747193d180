"""Training out of process through Dagster Pipes: a real subprocess running torchrun's two gloo
processes, streaming logs, metadata and the data version back; and the Kubernetes pod the k8s
mode would start, built by dagster-k8s itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg

REPO = Path(__file__).resolve().parents[1]
# the default model: an explicit train.model is checked against timm's names, which imports timm
TRAIN = """\
train:
  img_size: 16
  pretrained: false
  epochs: 2
  batch_size: 16
"""
# the orchestrating process: materialise digits' model with training in a Pipes subprocess
ORCHESTRATOR = """
import json, sys
from pathlib import Path
import dagster as dg
from assets.definitions import build_definitions

data_root, artifacts = Path(sys.argv[1]), Path(sys.argv[2])
job = build_definitions(data_root, artifacts).resolve_implicit_global_asset_job_def()
keys = [dg.AssetKey(["digits", s]) for s in
        ("inventory", "integrity", "splits", "sampling_weights", "model")]
with dg.instance_for_test() as instance:
    result = job.execute_in_process(instance=instance, asset_selection=keys)
    (event,) = [e for e in result.get_asset_materialization_events()
                if e.asset_key == keys[-1]]
    md = event.materialization.metadata
    print(json.dumps({
        "torch_imported": "torch" in sys.modules,
        "data_version": event.materialization.tags["dagster/data_version"],
        "metadata": sorted(md),
        "logs": [e.user_message for e in instance.all_logs(result.run_id)],
    }))
"""


def test_pipes_subprocess_trains_on_two_gloo_processes_without_torch_here(
    tiny_root: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_root / "digits", data / "digits")
    (data / "digits" / "task.yaml").write_text(TRAIN, "utf-8")
    artifacts = tmp_path / "artifacts"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "MTMC_TRAINING_MODE": "subprocess",
        "MTMC_TRAINING_PROCESSES": "2",
        "MTMC_DEVICE": "cpu",
        "MTMC_DATA_ROOT": str(data),
    }
    proc = subprocess.run(
        [sys.executable, "-c", ORCHESTRATOR, str(data), str(artifacts)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["torch_imported"] is False  # torch lives in the training processes only
    info = json.loads((artifacts / "digits" / "model" / "model.json").read_text("utf-8"))
    assert info["processes"] == 2 and out["data_version"] == info["fingerprint"]
    assert {"history", "curves", "train_images_per_s", "best_epoch", "reused"} <= set(
        out["metadata"]
    )
    assert info["epochs_run"] == 2
    epochs = [m for m in out["logs"] if m.startswith("epoch ")]
    assert [m[:8] for m in epochs] == ["epoch 1/", "epoch 2/"]  # rank 0's lines, streamed


def test_k8s_mode_loads_and_builds_a_gpu_pod(tmp_path: Path) -> None:
    """No cluster here: the definitions load with the k8s launcher, and dagster-k8s turns its
    request into a valid pod with the GPU limit and both volumes."""
    from dagster_k8s.pipes import build_pod_body

    from assets.definitions import build_definitions
    from assets.pipes import TrainingLauncher
    from mtmc_pipeline.artifacts import TaskArtifacts
    from mtmc_pipeline.config import TrainConfig

    launcher = TrainingLauncher(
        mode="k8s",
        image="registry.example/mtmc-train:1",
        processes=2,
        gpus=2,
        data_claim="mtmc-data",
        artifacts_claim="mtmc-artifacts",
    )
    defs = build_definitions(tmp_path / "no-data", tmp_path / "art")
    defs = dg.Definitions(
        assets=defs.assets, resources={**(defs.resources or {}), "training": launcher}
    )
    dg.Definitions.validate_loadable(defs)
    assert launcher.out_of_process

    task_dir = Path("/data/印花")
    art = TaskArtifacts(Path("/artifacts"), task_dir.name)
    request = launcher.k8s_request(task_dir, art, TrainConfig(), {"device": "auto"})
    pod = build_pod_body(
        "mtmc-train", request["image"], request["command"], {}, None, request["base_pod_spec"]
    )
    (container,) = pod.spec.containers
    assert container.image == "registry.example/mtmc-train:1"
    assert container.resources.limits == {"nvidia.com/gpu": "2"}
    assert container.command[:5] == [
        "python",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
    ]
    assert container.command[7] == "/data/印花"
    mounts = {m.mount_path: (m.name, m.read_only) for m in container.volume_mounts}
    assert mounts == {"/data": ("mtmc-data", True), "/artifacts": ("mtmc-artifacts", False)}
    claims = {v.name: v.persistent_volume_claim.claim_name for v in pod.spec.volumes}
    assert claims == {"mtmc-data": "mtmc-data", "mtmc-artifacts": "mtmc-artifacts"}
    assert pod.spec.restart_policy == "Never"
