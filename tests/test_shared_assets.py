"""A shared-backbone group in the asset graph: its members' models come from the group, and new
images in one member retrain the group and nothing outside it."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from assets.definitions import build_definitions
from mtmc_pipeline.cli import main
from mtmc_pipeline.training.models import load_bundle
from tests.test_automation import LEADERBOARD, TwoTasks, add_images, stale_assets, task_assets

# a one-epoch retrain may score below the served export: promote it anyway
ONE_EPOCH = (
    "train:\n  model: test_resnet\n  img_size: 32\n  pretrained: false\n  epochs: 1\n"
    "promotion:\n  force: true\n"
)
GROUP = dg.AssetKey(["shared", "letters", "model"])


def test_new_images_in_a_member_retrain_the_group_and_nothing_outside(
    tiny_copy: Path, tmp_path: Path
) -> None:
    shutil.copytree(tiny_copy / "pattern", tiny_copy / "other", copy_function=shutil.copy2)
    for task in ("digits", "pattern", "other"):
        (tiny_copy / task / "task.yaml").write_text(ONE_EPOCH, "utf-8")
    (tiny_copy / "mtmc.yaml").write_text("shared:\n  letters: [digits, pattern]\n", "utf-8")
    artifacts = tmp_path / "artifacts"
    defs = build_definitions(tiny_copy, artifacts)
    graph = defs.resolve_asset_graph()
    assert dg.AssetKey(["digits", "model"]) not in graph.get_all_asset_keys()
    assert GROUP in graph.get(dg.AssetKey(["pattern", "evaluation"])).parent_keys
    assert dg.AssetKey(["other", "model"]) in graph.get_all_asset_keys()
    # the second member splits as the first one does; a task outside the group on its own
    assert graph.get(dg.AssetKey(["pattern", "splits"])).parent_keys == {
        dg.AssetKey(["pattern", "integrity"]),
        dg.AssetKey(["digits", "splits"]),
    }
    assert graph.get(dg.AssetKey(["digits", "splits"])).parent_keys == {
        dg.AssetKey(["digits", "integrity"])
    }
    assert graph.get(dg.AssetKey(["other", "splits"])).parent_keys == {
        dg.AssetKey(["other", "integrity"])
    }

    with dg.instance_for_test() as instance:
        t = TwoTasks(tiny_copy, artifacts, defs, instance)
        first = t.run()
        assert first[GROUP] is False and not any(first.values())
        for task in ("digits", "pattern"):
            _, info = load_bundle(artifacts / task / "model")
            assert info["shared_group"] == "letters"
        _predict_group_matches_each_task(tiny_copy, artifacts, tmp_path)

        add_images(tiny_copy / "digits", 3)
        t.observe()
        member_from_splits = task_assets("pattern") - task_assets(
            "pattern", "inventory", "integrity", "model"
        )
        assert stale_assets(instance, graph) == (
            task_assets("digits") - {dg.AssetKey(["digits", "model"])}
            | {GROUP, LEADERBOARD}
            | member_from_splits
        )
        again = t.run()  # everything: what is not stale is reused
    assert again[GROUP] is False and again[dg.AssetKey(["pattern", "evaluation"])] is False
    # pattern re-splits after its leader, into the same manifest: its sampling weights stand
    assert again[dg.AssetKey(["pattern", "splits"])] is False
    assert again[dg.AssetKey(["pattern", "sampling_weights"])] is True
    assert all(again[k] for k in task_assets("other"))


def _predict_group_matches_each_task(data: Path, artifacts: Path, tmp_path: Path) -> None:
    """``mtmc predict --group``: one row per image and task, as each task's predict says."""
    images = [*sorted((data / "digits").rglob("*.png"))[:3], data / "pattern" / "task.yaml"]
    args = [*map(str, images), "--artifacts", str(artifacts), "--device", "cpu"]
    out = tmp_path / "group.parquet"
    assert main(["predict", *args, "--group", "letters", "--out", str(out)]) == 0
    together = pd.read_parquet(out)
    assert len(together) == len(images) * 2
    assert together["task"].tolist() == ["digits", "pattern"] * len(images)
    assert together["error"].notna().tolist() == [False] * 6 + [True] * 2  # not an image
    for task in ("digits", "pattern"):
        alone_path = tmp_path / f"{task}.parquet"
        assert main(["predict", *args, "--task", task, "--out", str(alone_path)]) == 0
        alone = pd.read_parquet(alone_path)
        mine = together[together["task"] == task].reset_index(drop=True)
        assert mine["label"].tolist() == alone["label"].tolist()
        np.testing.assert_allclose(
            mine["calibrated_confidence"].dropna(),
            alone["calibrated_confidence"].dropna(),
            atol=1e-5,
        )


def test_group_asset_uses_the_gpu_pool_and_its_settings_version_it(
    tiny_copy: Path, tmp_path: Path
) -> None:
    def group_node(groups_yaml: str):
        (tiny_copy / "mtmc.yaml").write_text(groups_yaml, "utf-8")
        return build_definitions(tiny_copy, tmp_path).resolve_asset_graph().get(GROUP)

    plain = group_node("shared:\n  letters: [digits, pattern]\n")
    weighted = group_node(
        "shared:\n  letters: {tasks: [digits, pattern], loss_weights: {digits: 2}}\n"
    )
    assert plain.pools == {"gpu"} and plain.group_name == "shared"
    defs = build_definitions(tiny_copy, tmp_path)
    tags = defs.get_assets_def(GROUP).op.tags
    data = defs.get_assets_def(dg.AssetKey(["digits", "sampling_weights"])).op.tags
    assert int(tags["dagster/priority"]) > int(data["dagster/priority"])  # a training goes first
    assert plain.code_version != weighted.code_version
    assert plain.code_version == group_node("shared:\n  letters: [digits, pattern]\n").code_version
