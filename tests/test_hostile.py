"""The whole graph on a hostile data root: problems recorded, trainable tasks trained,
untrainable tasks failing alone with a message that names them, the raw tree untouched."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from assets.definitions import build_definitions
from mtmc_pipeline.artifacts import parquet_meta
from tests.conftest import tree_digest
from tests.hostile import Expectations, write_hostile_root


class HostileRun:
    def __init__(self, root: Path, artifacts: Path, exp: Expectations, before: str, result):
        self.root, self.artifacts, self.exp, self.before, self.result = (
            root,
            artifacts,
            exp,
            before,
            result,
        )

    def failures(self) -> dict[str, str]:
        """step key -> the failure's message (with its cause)."""
        out = {}
        for event in self.result.get_step_failure_events():
            error = event.step_failure_data.error
            out[event.step_key] = error.to_string() if error else ""
        return out


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> HostileRun:
    root = tmp_path_factory.mktemp("hostile")
    exp = write_hostile_root(root)
    artifacts = tmp_path_factory.mktemp("hostile-artifacts")
    before = tree_digest(root)
    job = build_definitions(root, artifacts).resolve_implicit_global_asset_job_def()
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(instance=instance, raise_on_error=False)
    return HostileRun(root, artifacts, exp, before, result)


def test_raw_tree_is_byte_identical(hostile: HostileRun) -> None:
    assert tree_digest(hostile.root) == hostile.before


def test_every_problem_is_recorded_with_its_code(hostile: HostileRun) -> None:
    for task, codes in hostile.exp.codes.items():
        integrity = pd.read_parquet(hostile.artifacts / task / "integrity.parquet")
        issues = dict(zip(integrity["relpath"], integrity["issues"].map(list), strict=True))
        for rel, code in codes.items():
            assert rel in issues, f"{task}/{rel} not listed"
            assert code in issues[rel], f"{task}/{rel}: {issues[rel]} lacks {code}"


def test_good_files_are_decoded_normally(hostile: HostileRun) -> None:
    """Odd names and deep folders are no problem; as root, a mode-0 file is readable too."""
    for task, rels in hostile.exp.clean.items():
        integrity = pd.read_parquet(hostile.artifacts / task / "integrity.parquet")
        rows = integrity.set_index("relpath").loc[rels]
        assert (rows["status"] == "ok").all(), rows[["status", "issues", "detail"]]
        assert (rows["issues"].map(len) == 0).all() and (rows["width"] == 24).all()


def test_task_findings_are_recorded(hostile: HostileRun) -> None:
    for task, expected in hostile.exp.findings.items():
        findings = parquet_meta(hostile.artifacts / task / "integrity.parquet")["task_findings"]
        found = {(f["code"], f["class_name"]) for f in findings}
        assert set(expected.items()) <= found, findings


def test_walk_problems_and_skipped_files_are_counted(hostile: HostileRun) -> None:
    for task, expected in hostile.exp.walk_problems.items():
        meta = parquet_meta(hostile.artifacts / task / "inventory.parquet")
        found = {(p["problem"], p["relpath"]) for p in meta["problems"]}
        assert set(expected.items()) <= found, meta["problems"]
    for task, counts in hostile.exp.skipped.items():
        skipped = parquet_meta(hostile.artifacts / task / "inventory.parquet")["skipped"]
        assert {reason: skipped.get(reason) for reason in counts} == counts, skipped


def test_hostile_names_are_listed(hostile: HostileRun) -> None:
    for task, rels in hostile.exp.listed.items():
        inventory = pd.read_parquet(hostile.artifacts / task / "inventory.parquet")
        assert set(rels) <= set(inventory["relpath"])


def test_trainable_tasks_are_trained(hostile: HostileRun) -> None:
    for task in hostile.exp.trainable:
        for name in ("model/model.json", "evaluation/metrics.json", "calibration/calibrator.json"):
            assert (hostile.artifacts / task / name).is_file(), f"{task}/{name}"


def test_untrainable_tasks_fail_alone_with_a_clear_message(hostile: HostileRun) -> None:
    failures = hostile.failures()
    for task, words in hostile.exp.untrainable.items():
        messages = [msg for step, msg in failures.items() if step.startswith(f"{task}__")]
        assert messages, f"no failing step for {task}: {sorted(failures)}"
        text = "\n".join(messages)
        for word in words:
            assert word in text, f"{task}: {word!r} not in {text[:500]}"
        assert not (hostile.artifacts / task / "model").exists()
    trainable_failed = [s for s in failures if s.split("__")[0] in hostile.exp.trainable]
    assert not trainable_failed


def test_failed_checks_say_where_and_how_much(hostile: HostileRun) -> None:
    evaluations = {
        (e.asset_key.path[0], e.check_name): e for e in hostile.result.get_asset_check_evaluations()
    }
    for key, words in hostile.exp.checks_failed.items():
        evaluation = evaluations[key]
        assert not evaluation.passed
        for word in words:
            assert word in (evaluation.description or ""), evaluation.description


def test_leaderboard_lists_what_exists(hostile: HostileRun) -> None:
    """Run alone afterwards, the leaderboard summarises the tasks that have results."""
    defs = build_definitions(hostile.root, hostile.artifacts)
    job = defs.resolve_implicit_global_asset_job_def().get_subset(
        asset_selection={dg.AssetKey(["summary", "leaderboard"])}
    )
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(instance=instance)
    board = pd.read_parquet(hostile.artifacts / "summary" / "leaderboard.parquet")
    assert sorted(board["task"]) == sorted(hostile.exp.trainable)
    md = result.get_asset_materialization_events()[0].materialization.metadata
    assert set(md["tasks_without_results"].value) == set(hostile.exp.untrainable)


def test_a_missing_data_root_fails_with_the_setting_named(tmp_path: Path) -> None:
    """A mistyped MTMC_DATA_ROOT loads (so the UI can show it) but fails the run, not silently."""
    defs = build_definitions(tmp_path / "no_such_root", tmp_path / "artifacts")
    job = defs.resolve_implicit_global_asset_job_def()
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(instance=instance, raise_on_error=False)
    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data.error
    assert "MTMC_DATA_ROOT" in failure.message and "no_such_root" in failure.message
    assert not (tmp_path / "artifacts" / "summary").exists()
