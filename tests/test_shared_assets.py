"""A shared-backbone group in the asset graph: its members' models come from the group, and new
images in one member retrain the group and nothing outside it."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg

from assets.automation import stale_assets
from assets.definitions import build_definitions
from mtmc_pipeline.training.models import load_bundle
from tests.test_automation import LEADERBOARD, TwoTasks, add_images, task_assets

ONE_EPOCH = "train:\n  model: test_resnet\n  img_size: 32\n  pretrained: false\n  epochs: 1\n"
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

    with dg.instance_for_test() as instance:
        t = TwoTasks(tiny_copy, artifacts, defs, instance)
        first = t.run()
        assert first[GROUP] is False and not any(first.values())
        for task in ("digits", "pattern"):
            _, info = load_bundle(artifacts / task / "model")
            assert info["shared_group"] == "letters"

        add_images(tiny_copy / "digits", 3)
        t.observe()
        members_after_model = task_assets("pattern", "evaluation", "calibration")
        assert stale_assets(instance, graph) == (
            task_assets("digits") - {dg.AssetKey(["digits", "model"])}
            | {GROUP, LEADERBOARD}
            | members_after_model
        )
        again = t.run()  # everything: what is not stale is reused
    assert again[GROUP] is False and again[dg.AssetKey(["pattern", "evaluation"])] is False
    assert again[dg.AssetKey(["pattern", "splits"])] is True
    assert all(again[k] for k in task_assets("other"))
