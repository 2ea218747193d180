"""The code location loads with the expected per-task assets, checks, pools and versions."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from assets.definitions import build_definitions
from assets.deployment import TRAINING_POOL, TRAINING_TAG, DeploymentSettingError
from assets.factory import DATA_STAGES, STAGES, task_key
from assets.resources import ArtifactStore, TorchDevice, default_resources
from mtmc_pipeline.stages import CODE_VERSIONS
from tests.conftest import Materialized


def _keys(defs: dg.Definitions) -> set[str]:
    graph = defs.resolve_asset_graph()
    return {k.to_user_string() for k in graph.get_all_asset_keys()}


def test_every_task_gets_every_stage(tiny_root: Path, tmp_path: Path) -> None:
    defs = build_definitions(tiny_root, tmp_path)
    expected = {f"{t}/{s}" for t in ("digits", "pattern") for s in STAGES}
    assert _keys(defs) == expected | {"summary/leaderboard"}


def test_checks_are_declared(tiny_root: Path, tmp_path: Path) -> None:
    graph = build_definitions(tiny_root, tmp_path).resolve_asset_graph()
    checks = {(k.asset_key.to_user_string(), k.name) for k in graph.asset_check_keys}
    assert ("digits/integrity", "error_fraction") in checks
    assert ("pattern/splits", "no_hash_in_two_splits") in checks
    assert ("pattern/evaluation", "beats_majority_baseline") in checks
    assert ("digits/calibration", "thresholds_monotone") in checks
    blocking = {
        (k.asset_key.to_user_string(), k.name)
        for k in graph.asset_check_keys
        if graph.get_check_spec(k).blocking
    }
    assert ("digits/integrity", "error_fraction") in blocking


def test_training_uses_the_gpu_pool_and_versions_are_set(tiny_root: Path, tmp_path: Path) -> None:
    defs = build_definitions(tiny_root, tmp_path)
    graph = defs.resolve_asset_graph()
    model = graph.get(dg.AssetKey(["digits", "model"]))
    assert model.pools == {"gpu"}
    for stage in STAGES[1:]:
        node = graph.get(dg.AssetKey(["pattern", stage]))
        assert node.code_version == CODE_VERSIONS[stage]
        assert node.group_name == "pattern"


def test_the_data_steps_of_one_task_run_before_the_next_tasks(
    tiny_root: Path, tmp_path: Path
) -> None:
    """Trainings run one at a time: the first starts once its own task's data is ready, and
    a ready training goes before any data step."""
    defs = build_definitions(tiny_root, tmp_path)

    def priority(task: str, stage: str) -> int:
        op = defs.get_assets_def(dg.AssetKey([task, stage])).op
        return int(op.tags.get("dagster/priority", 0))

    for stage in DATA_STAGES:
        assert priority("digits", "model") > priority("digits", stage) > priority("pattern", stage)
        assert priority("pattern", stage) > 0
    assert priority("pattern", "model") == priority("digits", "model")
    for stage in set(STAGES[1:]) - {*DATA_STAGES, "model"}:
        assert priority("digits", stage) == priority("pattern", stage) == 0


def test_lineage_follows_the_stages(tiny_root: Path, tmp_path: Path) -> None:
    graph = build_definitions(tiny_root, tmp_path).resolve_asset_graph()
    parents = {
        s: {k.to_user_string() for k in graph.get(dg.AssetKey(["digits", s])).parent_keys}
        for s in STAGES[1:]
    }
    assert parents["inventory"] == {"digits/raw_images"}
    assert parents["model"] == {"digits/splits", "digits/sampling_weights"}
    assert parents["calibration"] == {"digits/evaluation"}
    board = graph.get(dg.AssetKey(["summary", "leaderboard"])).parent_keys
    assert {k.to_user_string() for k in board} == {"digits/calibration", "pattern/calibration"}


def test_non_ascii_task_names_get_safe_stable_keys(tmp_path: Path) -> None:
    for name in ("印花", "🐱 cats", "café crème"):
        (tmp_path / name / "a").mkdir(parents=True)
    keys = {task_key(n) for n in ("印花", "🐱 cats", "café crème")}
    assert len(keys) == 3 and all(k.isascii() for k in keys)
    assert task_key("印花").startswith("yinhua_")
    assert task_key("印花") == task_key("印花")
    defs = build_definitions(tmp_path, tmp_path / "artifacts")
    assert f"{task_key('印花')}/model" in _keys(defs)


def test_missing_data_root_still_loads(tmp_path: Path) -> None:
    defs = build_definitions(tmp_path / "nope", tmp_path / "artifacts")
    assert _keys(defs) == {"summary/leaderboard"}


def test_the_code_location_loads_without_torch(tiny_root: Path) -> None:
    """The UI, the daemon and every CLI run load the code location; torch is for the steps."""
    probe = (
        "import sys, assets.definitions as d; "
        "assert d.defs.resolve_asset_graph().get_all_asset_keys(); "
        "print(sorted(m for m in ('torch', 'timm', 'sklearn', 'scipy') if m in sys.modules))"
    )
    env = {**os.environ, "MTMC_DATA_ROOT": str(tiny_root)}
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_loading_prints_no_warning(tiny_root: Path) -> None:
    env = {**os.environ, "MTMC_DATA_ROOT": str(tiny_root)}
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", "import assets.definitions"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and out.stderr == "", out.stderr


def test_a_run_that_reuses_everything_never_imports_torch(
    materialized: Materialized, tmp_path: Path
) -> None:
    """Every stage finds its stored output current, so no step needs torch, timm or CUDA."""
    data, artifacts = tmp_path / "data", tmp_path / "artifacts"
    shutil.copytree(materialized.data_root, data, copy_function=shutil.copy2)
    shutil.copytree(materialized.artifacts, artifacts, copy_function=shutil.copy2)
    probe = f"""
import sys
from pathlib import Path
import dagster as dg
from assets.definitions import build_definitions

defs = build_definitions(Path({str(data)!r}), Path({str(artifacts)!r}))
with dg.instance_for_test() as instance:
    result = defs.resolve_implicit_global_asset_job_def().execute_in_process(instance=instance)
reused = [e.materialization.metadata["reused"].value
          for e in result.get_asset_materialization_events()]
print(len(reused), all(reused), sorted(m for m in ("torch", "timm") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[-2] == "19 True []"  # 2 tasks x 9 stages + leaderboard


def test_run_settings_are_read_when_the_run_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MTMC_ARTIFACTS", str(tmp_path / "at-load"))
    monkeypatch.setenv("MTMC_NUM_WORKERS", "1")
    resources = default_resources()
    monkeypatch.setenv("MTMC_ARTIFACTS", str(tmp_path / "at-run"))
    monkeypatch.setenv("MTMC_NUM_WORKERS", "3")

    @dg.asset
    def settings(artifacts: ArtifactStore, torch_device: TorchDevice) -> tuple[str, int]:
        return artifacts.root, torch_device.num_workers

    result = dg.materialize([settings], resources=resources)
    assert result.output_for_node("settings") == (str(tmp_path / "at-run"), 3)


def test_every_training_step_is_held_back_by_the_executor(
    tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps in the gpu pool carry the training tag the executor limits per run, so a waiting
    training makes no pool claim (whose retry interval grows to 15 s)."""
    monkeypatch.setenv("MTMC_TRAININGS_PER_RUN", "2")
    defs = build_definitions(tiny_root, tmp_path)
    graph = defs.resolve_asset_graph()
    in_pool = [k for k in graph.get_all_asset_keys() if graph.get(k).pools == {TRAINING_POOL}]
    assert {k.path[-1] for k in in_pool} == {"model", "label_issues"}
    for key in in_pool:
        assert defs.resolve_assets_def(key).op.tags[TRAINING_TAG] == "true"
    executor = defs.resolve_implicit_global_asset_job_def().executor_def
    config = executor.apply_config_mapping({}).value["config"]
    assert config["tag_concurrency_limits"] == [{"key": TRAINING_TAG, "limit": 2}]
    monkeypatch.setenv("MTMC_TRAININGS_PER_RUN", "0")
    with pytest.raises(DeploymentSettingError, match="MTMC_TRAININGS_PER_RUN='0'"):
        build_definitions(tiny_root, tmp_path)
