"""Shared fixtures: a tiny copy of the demo data and one materialisation of the whole graph."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import dagster as dg
import pytest

from mtmc_pipeline.demo import write_demo

FAST_TRAIN = """\
train:
  model: test_resnet
  img_size: 32
  pretrained: false
  epochs: 15
  batch_size: 16
  optimizer: adamw
  lr: 0.01
export:
  speed_seconds: 0.05
"""


def write_tiny_demo(root: Path) -> Path:
    """The small demo data set, set up to train a tiny model for two epochs."""
    write_demo(root, small=True)
    for task in ("digits", "pattern"):
        (root / task / "task.yaml").write_text(FAST_TRAIN, "utf-8")
    return root


def tree_digest(root: Path) -> str:
    """Digest of a folder tree: names, bytes, permissions and mtimes of every entry."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames + dirnames):
            path = Path(dirpath) / name
            st = path.lstat()
            h.update(f"{path.relative_to(root)}|{st.st_mode}|{st.st_mtime_ns}|".encode())
            if path.is_file() and not path.is_symlink() and os.access(path, os.R_OK):
                h.update(path.read_bytes())  # an unreadable file counts by its mode alone
    return h.hexdigest()


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only tiny demo data shared by the session; copy it before changing anything."""
    return write_tiny_demo(tmp_path_factory.mktemp("data"))


@pytest.fixture
def tiny_copy(tiny_root: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny demo data that a test may change."""
    dst = tmp_path / "data"
    shutil.copytree(tiny_root, dst, copy_function=shutil.copy2)
    return dst


class Materialized:
    def __init__(self, data_root: Path, artifacts: Path, result: dg.ExecuteInProcessResult):
        self.data_root = data_root
        self.artifacts = artifacts
        self.result = result
        self.digest_before = ""


@pytest.fixture(scope="session")
def materialized(tmp_path_factory: pytest.TempPathFactory) -> Materialized:
    """The whole asset graph materialised once, in process, on its own tiny data set."""
    from assets.definitions import build_definitions

    data_root = write_tiny_demo(tmp_path_factory.mktemp("pipeline-data"))
    artifacts = tmp_path_factory.mktemp("artifacts")
    before = tree_digest(data_root)
    defs = build_definitions(data_root, artifacts)
    job = defs.resolve_implicit_global_asset_job_def()
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(instance=instance, raise_on_error=False)
    out = Materialized(data_root, artifacts, result)
    out.digest_before = before
    return out


@pytest.fixture(scope="session")
def exported(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An artifact root whose ``pattern`` task (Chinese class names) is trained, calibrated and
    exported; read-only: copy it before changing anything."""
    from mtmc_pipeline.artifacts import TaskArtifacts
    from mtmc_pipeline.config import load_task_config
    from mtmc_pipeline.stages.export import run_export
    from tests.stage_runner import run

    artifacts = tmp_path_factory.mktemp("exported")
    run(tiny_root, artifacts, "pattern", {})
    cfg = load_task_config(tiny_root / "pattern")
    art = TaskArtifacts(artifacts, "pattern")
    run_export(tiny_root / "pattern", art, cfg.export, cfg.promotion)
    return artifacts
