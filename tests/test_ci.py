"""What a CI job types: the selections that pick one task, `dg launch`, and the exit codes."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from assets.definitions import build_definitions
from assets.factory import STAGES

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _keys(selection: str, graph) -> set[str]:
    """What the CLI's ``--select`` resolves to (it splits the string on commas)."""
    resolved = dg.AssetSelection.from_coercible(selection.split(",")).resolve(graph)
    return {k.to_user_string() for k in resolved}


def test_selection_syntax_for_one_task(tiny_root: Path, tmp_path: Path) -> None:
    graph = build_definitions(tiny_root, tmp_path).resolve_asset_graph()
    digits = {f"digits/{s}" for s in STAGES}
    everything = digits | {f"pattern/{s}" for s in STAGES} | {"summary/leaderboard"}
    # a task with its folder observation, or without it (raw_images is an observable source)
    assert _keys('key:"digits/*"', graph) == digits
    assert _keys("group:digits", graph) == digits - {"digits/raw_images"}
    # '*' leaves out the observations; key:"*" includes them
    assert _keys("*", graph) == everything - {"digits/raw_images", "pattern/raw_images"}
    assert _keys('key:"*"', graph) == everything
    # the legacy syntax reads 'digits/*' as a key 'digits/' that does not exist
    with pytest.raises(dg.DagsterInvalidSubsetError, match="digits/"):
        _keys("digits/*", graph)


def test_the_github_actions_example_runs_the_tested_command(
    tiny_root: Path, tmp_path: Path
) -> None:
    workflow = yaml.safe_load((REPO / "docs" / "github-actions.yml").read_text("utf-8"))
    runs = [step.get("run", "") for step in workflow["jobs"]["materialize"]["steps"]]
    [command] = [shlex.split(r) for r in runs if "asset materialize" in r]
    assert command[:5] == [".venv/bin/dagster", "asset", "materialize", "-m", "assets.definitions"]
    selection = command[command.index("--select") + 1]
    graph = build_definitions(tiny_root, tmp_path).resolve_asset_graph()
    assert _keys(selection, graph) == {k.to_user_string() for k in graph.get_all_asset_keys()}


def _cli(home: Path, data_root: Path, artifacts: Path, *args: str):
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / ".dagster" / "dagster.yaml", home / "dagster.yaml")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "MTMC_DATA_ROOT": str(data_root),
        "MTMC_ARTIFACTS": str(artifacts),
    }
    return subprocess.run(
        [str(BIN / args[0]), *args[1:], "-m", "assets.definitions"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_dg_launch_and_a_failed_blocking_check(tiny_copy: Path, tmp_path: Path) -> None:
    home, artifacts = tmp_path / "home", tmp_path / "artifacts"
    one_epoch = json.dumps({"ops": {"digits__model": {"config": {"epochs": 1}}}})
    proc = _cli(
        home, tiny_copy, artifacts, "dg", "launch", "--assets", 'key:"digits/*"',
        "--config-json", one_epoch,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # a blocking check that fails (no broken file allowed; pattern has four) fails the command
    strict = json.dumps({"ops": {"pattern__integrity": {"config": {"max_error_fraction": 0}}}})
    proc = _cli(
        home, tiny_copy, artifacts, "dagster", "asset", "materialize",
        "--select", 'key:"pattern/*"', "--config-json", strict,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "error_fraction" in proc.stdout + proc.stderr

    with dg.DagsterInstance.from_config(str(home)) as instance:

        def materialized(key: str) -> bool:
            event = instance.get_latest_materialization_event(dg.AssetKey(key.split("/")))
            return event is not None

        assert all(materialized(f"digits/{s}") for s in STAGES[1:])
        assert instance.fetch_observations(dg.AssetKey(["digits", "raw_images"]), limit=1).records
        # the check ran on pattern's integrity and stopped everything after it
        assert materialized("pattern/integrity")
        assert not materialized("pattern/splits") and not materialized("pattern/model")
        check = dg.AssetCheckKey(dg.AssetKey(["pattern", "integrity"]), "error_fraction")
        record = instance.get_latest_asset_check_evaluation_record(check)
        assert record is not None and record.status.value == "FAILED"
