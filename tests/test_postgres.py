"""The production instance (deploy/) on a real PostgreSQL server that the tests start.

Nothing stands in for the database: the server runs from Debian's ``postgresql`` binaries in a
temporary directory (tests/postgres_server.py). The tests fail, never skip, when the
binaries are missing: ``.ci/run`` installs them.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._config import process_config
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.instance.config import dagster_instance_config
from dagster._core.loader import LoadingContextForTest
from dagster_k8s import K8sRunLauncher

from assets.definitions import build_definitions
from tests.postgres_server import PostgresServer
from tests.test_automation import add_images

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
TASKS = ("digits", "pattern")
ONE_EPOCH = {"ops": {f"{t}__model": {"config": {"epochs": 1}} for t in TASKS}}


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
        server.remove()


@pytest.fixture
def home(postgres: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A DAGSTER_HOME holding deploy/dagster.yaml, with MTMC_PG_URL naming the test server."""
    monkeypatch.setenv("MTMC_PG_URL", postgres.url)
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(DEPLOY / "dagster.yaml", home / "dagster.yaml")
    return home


def versions_and_staleness(
    instance: dg.DagsterInstance, defs: dg.Definitions
) -> tuple[dict[dg.AssetKey, str | None], dict[dg.AssetKey, StaleStatus]]:
    graph = defs.resolve_asset_graph()
    resolver = CachingStaleStatusResolver(instance, graph, LoadingContextForTest(instance))
    keys = sorted(graph.get_all_asset_keys())
    versions = {k: resolver.get_current_data_version(key=k).value for k in keys}
    staleness = {k: resolver.get_status(k) for k in graph.materializable_asset_keys}
    return versions, staleness


def test_postgres_instance_keeps_versions_and_staleness_across_a_restart(
    postgres: PostgresServer, home: Path, tiny_copy: Path, tmp_path: Path
) -> None:
    defs = build_definitions(tiny_copy, tmp_path / "artifacts")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert (
            defs.resolve_job_def("observe_raw_images").execute_in_process(instance=instance).success
        )
        job = defs.resolve_implicit_global_asset_job_def()
        assert job.execute_in_process(instance=instance, run_config=ONE_EPOCH).success
        versions, staleness = versions_and_staleness(instance, defs)
    assert len(versions) == 21 and None not in versions.values()  # 2 x (raw + 9) + leaderboard
    assert set(staleness.values()) == {StaleStatus.FRESH}

    postgres.restart()
    reloaded = build_definitions(tiny_copy, tmp_path / "artifacts")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert versions_and_staleness(instance, reloaded) == (versions, staleness)
        assert len(instance.get_runs()) == 2

        add_images(tiny_copy / "digits", 2)
        assert (
            reloaded.resolve_job_def("observe_raw_images")
            .execute_in_process(instance=instance)
            .success
        )
        after, staleness = versions_and_staleness(instance, reloaded)
    raw = dg.AssetKey(["digits", "raw_images"])
    assert after[raw] != versions[raw]
    assert {k for k, s in staleness.items() if s == StaleStatus.STALE} == {
        dg.AssetKey(["digits", "inventory"])
    }


def test_postgres_kubernetes_configuration_loads(
    postgres: PostgresServer, home: Path, tiny_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """deploy/k8s/ appended to the production instance, and the definitions under it (there is
    no cluster here: the run launcher's config is checked against its schema)."""
    text = (DEPLOY / "dagster.yaml").read_text() + (
        DEPLOY / "k8s" / "run-launcher.yaml"
    ).read_text()
    (home / "dagster.yaml").write_text(text)
    config, _ = dagster_instance_config(str(home))
    launcher = config["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s", "K8sRunLauncher")
    checked = process_config(K8sRunLauncher.config_type(), launcher["config"])
    assert checked.success, checked.errors
    env = dict(v.split("=", 1) for v in launcher["config"]["env_vars"])
    for variable in ("MTMC_EXECUTOR", "MTMC_K8S_TRAINING_GPUS", "MTMC_ARTIFACTS"):
        monkeypatch.setenv(variable, env[variable])

    defs = build_definitions(tiny_root, Path(env["MTMC_ARTIFACTS"]))
    job = defs.resolve_implicit_global_asset_job_def()
    assert job.executor_def.name == "k8s"
    op_tags = defs.resolve_assets_def(dg.AssetKey(["digits", "model"])).op.tags
    gpu = yaml.safe_load(op_tags["dagster-k8s/config"])  # Dagster stores it as JSON
    assert gpu["container_config"]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
