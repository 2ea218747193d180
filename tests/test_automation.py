"""Only stale pieces rerun: staleness and automation judged on the Dagster instance's records.

The scenario tests start from two fully materialised tasks (a copy of the session's
materialisation, rerun once so that an instance holds the records; each test gets a private
copy of data, artifacts and instance) and change one thing.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.loader import LoadingContextForTest
from dagster._core.storage.dagster_run import DagsterRunStatus
from PIL import Image

from assets.automation import RETRAIN, AutomationSettingError, nightly
from assets.definitions import build_definitions
from assets.factory import STAGES
from mtmc_pipeline.stages import CODE_VERSIONS
from tests.conftest import Materialized

LEADERBOARD = dg.AssetKey(["summary", "leaderboard"])


def task_assets(task: str, *stages: str) -> set[dg.AssetKey]:
    """The task's materialisable assets (all of them, or the given stages)."""
    return {dg.AssetKey([task, s]) for s in stages or STAGES[1:]}


@dataclass
class TwoTasks:
    data_root: Path
    artifacts: Path
    defs: dg.Definitions
    instance: dg.DagsterInstance

    @property
    def graph(self):
        return self.defs.resolve_asset_graph()

    def run(
        self, selection: set[dg.AssetKey] | None = None, run_config: dict | None = None
    ) -> dict[dg.AssetKey, bool]:
        """Materialise ``selection`` (default: everything); what was reused, per asset."""
        job = self.defs.resolve_implicit_global_asset_job_def()
        result = job.execute_in_process(
            instance=self.instance,
            asset_selection=sorted(selection) if selection else None,
            run_config=run_config,
        )
        return {
            e.asset_key: e.materialization.metadata["reused"].value
            for e in result.get_asset_materialization_events()
            if "reused" in e.materialization.metadata
        }

    def observe(self) -> None:
        """What the observation schedule runs every 15 minutes."""
        job = self.defs.resolve_job_def("observe_raw_images")
        assert job.execute_in_process(instance=self.instance).success

    def tick(self, cursor=None, defs: dg.Definitions | None = None, evaluation_time=None):
        """One evaluation of the automation sensor."""
        return dg.evaluate_automation_conditions(
            defs or self.defs, self.instance, cursor=cursor, evaluation_time=evaluation_time
        )

    def dagster_stale(self, defs: dg.Definitions | None = None) -> set[dg.AssetKey]:
        """What Dagster itself (and so the UI) marks stale."""
        graph = (defs or self.defs).resolve_asset_graph()
        resolver = CachingStaleStatusResolver(
            self.instance, graph, LoadingContextForTest(self.instance)
        )
        return {
            k
            for k in graph.materializable_asset_keys
            if resolver.get_status(k) == StaleStatus.STALE
        }


def stale_assets(instance: dg.DagsterInstance, graph) -> set[dg.AssetKey]:
    """What a run must redo: what Dagster marks stale or missing, and everything downstream
    (Dagster marks only the first asset of a changed chain)."""
    resolver = CachingStaleStatusResolver(instance, graph, LoadingContextForTest(instance))
    roots = [
        key
        for key in graph.materializable_asset_keys
        if resolver.get_status(key) in (StaleStatus.STALE, StaleStatus.MISSING)
    ]
    return set(dg.AssetSelection.assets(*roots).downstream().resolve(graph)) if roots else set()


def requested(tick, graph) -> set[dg.AssetKey]:
    return {k for k in graph.get_all_asset_keys() if tick.get_num_requested(k)}


def add_images(task_dir: Path, count: int) -> None:
    """New images (mirrored copies of existing ones) in the first class folder."""
    class_dir = sorted(p for p in task_dir.iterdir() if p.is_dir())[0]
    for i, src in enumerate(sorted(class_dir.glob("*.png"))[:count]):
        mirrored = Image.open(src).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        mirrored.save(class_dir / f"new_{i}.png")


@pytest.fixture(scope="module")
def baseline(materialized: Materialized, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Data, artifacts and a Dagster instance that recorded one run over both tasks."""
    base = tmp_path_factory.mktemp("baseline")
    shutil.copytree(materialized.data_root, base / "data", copy_function=shutil.copy2)
    shutil.copytree(materialized.artifacts, base / "artifacts", copy_function=shutil.copy2)
    (base / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(base / "home")) as instance:
        defs = build_definitions(base / "data", base / "artifacts")
        reused = TwoTasks(base / "data", base / "artifacts", defs, instance).run()
    assert reused and all(reused.values()), "the copied artifacts were not reused"
    return base


@pytest.fixture
def two_tasks(baseline: Path, tmp_path: Path) -> Iterator[TwoTasks]:
    """A private copy of the baseline, instance included."""
    shutil.copytree(baseline, tmp_path, dirs_exist_ok=True, copy_function=shutil.copy2)
    data_root, artifacts = tmp_path / "data", tmp_path / "artifacts"
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        yield TwoTasks(data_root, artifacts, build_definitions(data_root, artifacts), instance)


def test_downstream_assets_carry_the_retrain_condition(tiny_root: Path, tmp_path: Path) -> None:
    graph = build_definitions(tiny_root, tmp_path).resolve_asset_graph()
    for key in graph.materializable_asset_keys:
        assert graph.get(key).automation_condition == RETRAIN, key
    assert graph.get(dg.AssetKey(["digits", "raw_images"])).automation_condition is None


def test_new_images_rerun_only_their_task(two_tasks: TwoTasks) -> None:
    t = two_tasks
    first = t.tick()
    assert first.total_requested == 0
    assert stale_assets(t.instance, t.graph) == set()

    add_images(t.data_root / "digits", 3)
    t.observe()  # observes both tasks; pattern's folder is unchanged
    rerun = task_assets("digits") | {LEADERBOARD}
    # Dagster marks the first asset whose input changed; everything after it follows
    assert t.dagster_stale() == {dg.AssetKey(["digits", "inventory"])}
    assert stale_assets(t.instance, t.graph) == rerun

    second = t.tick(first.cursor)
    assert requested(second, t.graph) == rerun

    # one epoch is a worse model: force its promotion (safe promotion is tested elsewhere)
    force = {"config": {"promotion": {"force": True}}}
    reused = t.run(
        rerun, {"ops": {"digits__model": {"config": {"epochs": 1}}, "digits__export": force}}
    )
    assert not any(reused[k] for k in task_assets("digits", "inventory", "model", "evaluation"))
    assert stale_assets(t.instance, t.graph) == set()
    assert t.tick(second.cursor).total_requested == 0


def test_same_manifest_keeps_the_model(two_tasks: TwoTasks) -> None:
    """Every file touched (as a fresh checkout does) and a calibration setting added to
    task.yaml: the first stages recompute, write the same split manifest, and so the model and
    its evaluation are reused while calibration follows its new setting."""
    t = two_tasks
    task_dir = t.data_root / "pattern"
    for path in (p for p in task_dir.rglob("*") if p.is_file()):
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    yaml = task_dir / "task.yaml"
    yaml.write_text(yaml.read_text("utf-8") + "calibration:\n  tolerance: 0.1\n", "utf-8")
    t.observe()
    assert stale_assets(t.instance, t.graph) == task_assets("pattern") | {LEADERBOARD}

    reused = t.run(task_assets("pattern") | {LEADERBOARD})
    recomputed = {k.path[1] for k, was_reused in reused.items() if not was_reused}
    assert recomputed == {"inventory", "integrity", "splits", "calibration", "export"}
    assert t.dagster_stale() == set()
    assert stale_assets(t.instance, t.graph) == set()


def test_nightly_mode_waits_for_its_cron_tick(
    two_tasks: TwoTasks, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MTMC_AUTOMATION", "nightly")
    t = two_tasks
    defs = build_definitions(t.data_root, t.artifacts)
    graph = defs.resolve_asset_graph()
    assert graph.get(dg.AssetKey(["pattern", "model"])).automation_condition == nightly()

    day = dt.datetime(2026, 5, 4, 12, tzinfo=dt.UTC)
    first = t.tick(defs=defs, evaluation_time=day)
    add_images(t.data_root / "pattern" / "train", 2)
    t.observe()
    evening = t.tick(first.cursor, defs, day.replace(hour=23))
    assert evening.total_requested == 0  # changed, but no 02:00 tick yet
    night = t.tick(evening.cursor, defs, day + dt.timedelta(hours=14, minutes=1))
    assert requested(night, graph) == task_assets("pattern") | {LEADERBOARD}


def test_a_failed_blocking_check_stops_the_next_tick(two_tasks: TwoTasks) -> None:
    """A hand-run integrity over its error_fraction: nothing is built on that data."""
    t = two_tasks
    first = t.tick()
    (t.data_root / "digits" / "0" / "broken.png").write_bytes(b"not an image")
    t.observe()
    job = t.defs.resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(
        instance=t.instance,
        asset_selection=sorted(task_assets("digits", "inventory", "integrity")),
        run_config={"ops": {"digits__integrity": {"config": {"max_error_fraction": 0.0}}}},
        raise_on_error=False,
    )
    [check] = [c for c in result.get_asset_check_evaluations() if c.check_name == "error_fraction"]
    assert not check.passed

    second = t.tick(first.cursor)
    assert requested(second, t.graph) & task_assets("digits") == set()


def test_new_evaluation_code_reruns_evaluation_and_calibration_not_the_model(
    two_tasks: TwoTasks, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = two_tasks
    first = t.tick()
    monkeypatch.setitem(CODE_VERSIONS, "evaluation", "2")
    new_code = build_definitions(t.data_root, t.artifacts)

    rerun = task_assets("digits", "evaluation", "calibration", "export")
    rerun |= task_assets("pattern", "evaluation", "calibration", "export") | {LEADERBOARD}
    assert t.dagster_stale(new_code) == task_assets("digits", "evaluation") | task_assets(
        "pattern", "evaluation"
    )
    assert stale_assets(t.instance, new_code.resolve_asset_graph()) == rerun
    assert requested(t.tick(first.cursor, new_code), new_code.resolve_asset_graph()) == rerun

    t.defs = new_code
    reused = t.run(rerun)
    assert reused[dg.AssetKey(["digits", "evaluation"])] is False
    assert dg.AssetKey(["digits", "model"]) not in reused


def test_nothing_is_requested_while_its_run_is_in_progress(
    two_tasks: TwoTasks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A code change seen while a run is busy with the asset waits for that run, then fires."""
    t = two_tasks
    first = t.tick()
    busy = task_assets("pattern", "evaluation", "calibration")
    job = t.defs.resolve_implicit_global_asset_job_def()
    run = t.instance.create_run_for_job(
        job_def=job, asset_selection=frozenset(busy), status=DagsterRunStatus.STARTED
    )
    monkeypatch.setitem(CODE_VERSIONS, "evaluation", "2")
    new_code = build_definitions(t.data_root, t.artifacts)
    graph = new_code.resolve_asset_graph()

    second = t.tick(first.cursor, new_code)
    # pattern's assets (and the leaderboard, which reads them) wait for the run in progress
    assert requested(second, graph) == task_assets("digits", "evaluation", "calibration", "export")

    t.instance.report_run_failed(run)
    third = t.tick(second.cursor, new_code)
    assert requested(third, graph) == busy | task_assets("pattern", "export") | {LEADERBOARD}


def test_automation_is_declared_with_its_defaults(tiny_root: Path, tmp_path: Path) -> None:
    repo = build_definitions(tiny_root, tmp_path).get_repository_def()
    observe = repo.get_schedule_def("observe_raw_images")
    assert observe.cron_schedule == "*/15 * * * *"
    assert observe.default_status == dg.DefaultScheduleStatus.RUNNING
    raw = {dg.AssetKey([t, "raw_images"]) for t in ("digits", "pattern")}
    assert set(repo.get_job("observe_raw_images").asset_layer.selected_asset_keys) == raw

    sensor = repo.get_sensor_def("mtmc_automation")
    assert isinstance(sensor, dg.AutomationConditionSensorDefinition)
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert repo.get_sensor_def("task_folders").default_status == dg.DefaultSensorStatus.RUNNING


def test_schedules_follow_the_environment(
    tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MTMC_OBSERVE_CRON", "*/5 * * * *")
    monkeypatch.setenv("MTMC_AUTOMATION", "nightly")
    monkeypatch.setenv("MTMC_NIGHTLY_CRON", "30 3 * * 1-5")
    monkeypatch.setenv("MTMC_TIMEZONE", "Europe/Berlin")
    repo = build_definitions(tiny_root, tmp_path).get_repository_def()
    assert repo.get_schedule_def("observe_raw_images").cron_schedule == "*/5 * * * *"
    condition = repo.asset_graph.get(dg.AssetKey(["digits", "model"])).automation_condition
    assert condition == nightly("30 3 * * 1-5", "Europe/Berlin")

    for variable, value in [
        ("MTMC_OBSERVE_CRON", "every 5 minutes"),
        ("MTMC_NIGHTLY_CRON", "at night"),
        ("MTMC_TIMEZONE", "Mars/Base"),
        ("MTMC_AUTOMATION", "hourly"),
    ]:
        with monkeypatch.context() as m:
            m.setenv(variable, value)
            with pytest.raises(AutomationSettingError, match=f"{variable}='{value}'"):
                build_definitions(tiny_root, tmp_path)


def test_task_folder_sensor_says_to_reload(tiny_copy: Path, tmp_path: Path) -> None:
    repo = build_definitions(tiny_copy, tmp_path).get_repository_def()
    sensor = repo.get_sensor_def("task_folders")

    def message() -> str:
        with dg.build_sensor_context() as context:
            result = sensor.evaluate_tick(context)
        assert not result.run_requests
        return result.skip_message or ""

    assert "match the loaded assets" in message()
    (tiny_copy / "印花" / "条纹").mkdir(parents=True)
    shutil.rmtree(tiny_copy / "pattern")
    text = message()
    assert "new task folder(s) 印花" in text and "task folder(s) pattern removed" in text
    assert "Reload the code location" in text


def test_a_fresh_data_root_is_built_after_its_first_observation(
    tiny_root: Path, tmp_path: Path
) -> None:
    with dg.instance_for_test() as instance:
        fresh = TwoTasks(tiny_root, tmp_path, build_definitions(tiny_root, tmp_path), instance)
        first = fresh.tick()
        assert first.total_requested == 0  # nothing observed yet: the raw folders are missing
        fresh.observe()
        graph = fresh.graph
        assert requested(fresh.tick(first.cursor), graph) == set(graph.materializable_asset_keys)
