"""What a person or CI types: `dagster asset materialize`, `mtmc predict`, `mtmc summary`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from mtmc_pipeline.cli import main
from tests.conftest import Materialized

REPO = Path(__file__).resolve().parents[1]
DAGSTER = Path(sys.executable).with_name("dagster")


def _env(data_root: Path, artifacts: Path, home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / ".dagster" / "dagster.yaml", home / "dagster.yaml")
    return {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "MTMC_DATA_ROOT": str(data_root),
        "MTMC_ARTIFACTS": str(artifacts),
    }


def _materialize(env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(DAGSTER), "asset", "materialize", "-m", "assets.definitions", *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_dagster_asset_materialize_runs_the_graph(tiny_copy: Path, tmp_path: Path) -> None:
    env = _env(tiny_copy, tmp_path / "artifacts", tmp_path / "home")
    proc = _materialize(env, "--select", "*")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    board = pd.read_parquet(tmp_path / "artifacts" / "summary" / "leaderboard.parquet")
    assert sorted(board["task"]) == ["digits", "pattern"]
    # the run is recorded in the persistent instance
    assert any((tmp_path / "home").iterdir())

    # a failing asset makes the command fail: an unknown model name for one task
    bad = json.dumps({"ops": {"digits__model": {"config": {"model": "no_such_net"}}}})
    proc = _materialize(env, "--select", 'key:"digits/*"', "--config-json", bad)
    assert proc.returncode != 0
    assert "no_such_net" in proc.stdout + proc.stderr


def test_predict_writes_calibrated_rows(materialized: Materialized, tmp_path: Path) -> None:
    images = materialized.data_root / "pattern" / "val"
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    out = tmp_path / "preds.csv"
    code = main(
        [
            "predict",
            "--task",
            "pattern",
            "--artifacts",
            str(materialized.artifacts),
            "--out",
            str(out),
            "--device",
            "cpu",
            str(images),
            str(junk),
        ]
    )
    assert code == 0
    df = pd.read_csv(out)
    n_images = sum(1 for p in images.rglob("*") if p.is_file())
    assert len(df) == n_images + 1
    bad = df[df["path"] == str(junk)].iloc[0]
    assert isinstance(bad["error"], str) and bad["error"]
    good = df[df["error"].isna()]
    assert good["label"].notna().all()
    assert good["softmax_prob"].between(0, 1).all()
    assert good["calibrated_confidence"].between(0, 1).all()


def test_predict_names_a_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["predict", "--task", "nope", "--artifacts", str(tmp_path), "--out", "x.csv", "a"])
    assert code == 2
    assert "no trained model for task 'nope'" in capsys.readouterr().err


def test_summary_prints_every_task(materialized: Materialized, capsys) -> None:
    assert main(["summary", "--artifacts", str(materialized.artifacts)]) == 0
    out = capsys.readouterr().out
    assert "== digits" in out and "== pattern" in out and "report.md" in out


def test_demo_data_is_deterministic_and_leaves_unchanged_files_alone(tmp_path: Path) -> None:
    from mtmc_pipeline.demo import write_demo
    from tests.conftest import tree_digest

    first = write_demo(tmp_path / "a", small=True)
    assert first["digits"] == 120 and first["pattern"] == 94 + 4  # images + planted files
    write_demo(tmp_path / "b", small=True)
    digest = tree_digest(tmp_path / "a")
    again = write_demo(tmp_path / "a", small=True)
    assert again == {"digits": 0, "pattern": 0}
    assert tree_digest(tmp_path / "a") == digest
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*"))
    assert files_a == files_b
    assert all(
        (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
        for f in files_a
        if (tmp_path / "a" / f).is_file()
    )
