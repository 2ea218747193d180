"""What a person or CI types: `dagster asset materialize`, `mtmc predict`, `mtmc summary`."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mtmc_pipeline.cli import main
from mtmc_pipeline.demo import PATTERN_CLASSES
from mtmc_pipeline.evaluation.calibrate import Calibrator
from mtmc_pipeline.evaluation.metrics import softmax
from mtmc_pipeline.serving.predict import COLUMNS
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


def _predict(artifacts: Path, out: Path, *inputs: Path | str, extra: tuple[str, ...] = ()) -> int:
    args = ["predict", "--task", "pattern", "--artifacts", str(artifacts), "--out", str(out)]
    return main([*args, "--device", "cpu", *extra, *map(str, inputs)])


def test_predict_writes_calibrated_rows(materialized: Materialized, tmp_path: Path) -> None:
    images = materialized.data_root / "pattern" / "val"
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    out = tmp_path / "preds.parquet"
    assert _predict(materialized.artifacts, out, images, junk, tmp_path / "missing.png") == 0
    df = pd.read_parquet(out)
    assert list(df.columns) == list(COLUMNS)
    n_images = sum(1 for p in images.rglob("*") if p.is_file())
    assert len(df) == n_images + 2
    errors = df.set_index("path").loc[[str(junk), str(tmp_path / "missing.png")], "error"]
    assert errors.str.contains("UnidentifiedImageError").iloc[0]
    assert errors.str.contains("FileNotFoundError").iloc[1]

    # the same logits as the evaluation saw, and the calibrator's confidences on them
    art = materialized.artifacts / "pattern"
    evaluated = pd.read_parquet(art / "evaluation" / "predictions.parquet")
    evaluated["path"] = [str(materialized.data_root / "pattern" / r) for r in evaluated["relpath"]]
    good = df[df["error"].isna()].merge(evaluated[["path", "logits"]], on="path")
    assert len(good) == n_images - 1  # the planted cross-split copy is not in the manifest
    logits = np.stack(good["logits"].to_numpy()).astype(np.float64)
    calibrator = Calibrator.from_json(
        json.loads((art / "calibration" / "calibrator.json").read_text())
    )
    names = calibrator.class_names
    top = logits.argmax(1)
    assert (good["label"] == [names[i] for i in top]).all()
    rows = np.arange(len(good))
    assert good["softmax_prob"].to_numpy() == pytest.approx(softmax(logits)[rows, top], abs=1e-4)
    tprob = calibrator.temperature_probs(logits)[rows, top]
    assert good["temperature_prob"].to_numpy() == pytest.approx(tprob, abs=1e-4)
    conf = calibrator.precision_confidence(logits)
    assert good["calibrated_confidence"].to_numpy() == pytest.approx(conf[rows, top], abs=1e-3)
    for k, (labels, confs) in enumerate(
        zip(good["labels_at_min_precision"], good["confidences_at_min_precision"], strict=True)
    ):
        expected = {names[j] for j in np.nonzero(conf[k] >= 0.9 + 1e-3)[0]}
        assert expected <= set(labels) and all(c >= 0.9 for c in confs)
        assert list(confs) == sorted(confs, reverse=True)


def test_predict_csv_keeps_lists_as_json(materialized: Materialized, tmp_path: Path) -> None:
    images = sorted(
        p for p in (materialized.data_root / "pattern" / "val").rglob("*") if p.is_file()
    )
    images = images[:4]
    out = tmp_path / "preds.csv"
    assert _predict(materialized.artifacts, out, *images, extra=("--min-precision", "0.1")) == 0
    df = pd.read_csv(out)
    assert len(df) == 4 and df["error"].isna().all()
    lists = df["labels_at_min_precision"].map(json.loads)
    assert all(isinstance(v, list) for v in lists)
    assert all(set(v) <= set(PATTERN_CLASSES) for v in lists)


@pytest.mark.parametrize(
    ("extra", "out", "message"),
    [
        (("--min-precision", "0.99"), "p.csv", "highest calibrated level, 0.98"),
        ((), "p.txt", "use a .csv or .parquet"),
    ],
)
def test_predict_refuses_bad_arguments(
    materialized: Materialized, tmp_path: Path, capsys, extra: tuple[str, ...], out: str, message
) -> None:
    image = next((materialized.data_root / "pattern" / "val").rglob("*.png"))
    assert _predict(materialized.artifacts, tmp_path / out, image, extra=extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / out).exists()


def test_predict_refuses_a_calibrator_of_another_model(
    materialized: Materialized, tmp_path: Path, capsys
) -> None:
    copy = tmp_path / "artifacts"
    for part in ("model", "calibration"):
        shutil.copytree(materialized.artifacts / "pattern" / part, copy / "pattern" / part)
    path = copy / "pattern" / "calibration" / "calibrator.json"
    data = json.loads(path.read_text("utf-8"))
    path.write_text(json.dumps({**data, "model_fingerprint": "retrained"}), "utf-8")
    image = next((materialized.data_root / "pattern" / "val").rglob("*.png"))
    assert _predict(copy, tmp_path / "p.csv", image) == 2
    err = capsys.readouterr().err
    assert "was fitted for another model" in err and "calibrator.json" in err


def test_predict_loads_without_unpickling(
    materialized: Materialized, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("something was unpickled")

    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    image = next((materialized.data_root / "pattern" / "val").rglob("*.png"))
    assert _predict(materialized.artifacts, tmp_path / "p.parquet", image) == 0
    assert pd.read_parquet(tmp_path / "p.parquet")["error"].isna().all()


def test_predict_names_a_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["predict", "--task", "nope", "--artifacts", str(tmp_path), "--out", "x.csv", "a"])
    assert code == 2
    assert "no trained model for task 'nope'" in capsys.readouterr().err


def test_summary_prints_every_task(materialized: Materialized, capsys) -> None:
    assert main(["summary", "--artifacts", str(materialized.artifacts)]) == 0
    out = capsys.readouterr().out
    assert "== digits" in out and "== pattern" in out and "report.md" in out
    board = pd.read_parquet(materialized.artifacts / "summary" / "leaderboard.parquet")
    digits = board.set_index("task").loc["digits"]
    assert f"accuracy {digits['accuracy']:.4f}" in out and f"mAP {digits['mAP']:.4f}" in out
    assert digits["split"] == "test"  # carved by default
    assert f"ECE on test {digits['ece_before']:.4f} -> {digits['ece_after']:.4f}" in out


def test_summary_without_a_leaderboard(tmp_path: Path, capsys) -> None:
    assert main(["summary", "--artifacts", str(tmp_path)]) == 1
    assert "no leaderboard" in capsys.readouterr().err


def test_demo_data_is_deterministic_and_leaves_unchanged_files_alone(tmp_path: Path) -> None:
    from mtmc_pipeline.demo import write_demo
    from tests.conftest import tree_digest

    first = write_demo(tmp_path / "a", small=True)
    assert first["digits"] == 120 and first["pattern"] == 94 + 24 + 4  # train, val, test, planted
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


@pytest.mark.parametrize("use_lower_bound", [False, True])
def test_predict_min_precision_selects_what_the_table_threshold_selects(
    materialized: Materialized, tmp_path: Path, use_lower_bound: bool
) -> None:
    """Every image and class: listed at --min-precision p exactly when its logit reaches the
    table's threshold for p (with --use-lower-bound: the lowest threshold whose
    precision_lower reaches p)."""
    art = materialized.artifacts / "pattern"
    table = pd.read_parquet(art / "calibration" / "calibration.parquet")
    logit = table[(table["score_kind"] == "logit") & table["reachable"]]
    column = "precision_lower" if use_lower_bound else "level"
    p = round(float(logit[column].median()), 3)
    assert p > 0
    evaluated = pd.read_parquet(art / "evaluation" / "predictions.parquet")
    paths = [materialized.data_root / "pattern" / r for r in evaluated["relpath"]]
    out = tmp_path / "preds.parquet"
    extra = ("--min-precision", str(p), *(("--use-lower-bound",) if use_lower_bound else ()))
    assert _predict(materialized.artifacts, out, *paths, extra=extra) == 0
    df = pd.read_parquet(out)
    assert df["error"].isna().all() and len(df) == len(evaluated)
    logits = np.stack(evaluated["logits"].to_numpy()).astype(np.float64)
    names = json.loads((art / "calibration" / "calibrator.json").read_text())["class_names"]
    listed = 0
    for c, name in enumerate(names):
        rows = logit[logit["class_name"] == name]
        rows = rows[rows["precision_lower"] >= p] if use_lower_bound else rows[rows["level"] >= p]
        threshold = rows["threshold"].min() if len(rows) else np.inf
        expected = logits[:, c] >= threshold
        got = df["labels_at_min_precision"].map(lambda v, name=name: name in list(v)).to_numpy()
        near = np.abs(logits[:, c] - threshold) < 1e-4  # a last-bit difference of two runs
        assert (got == expected)[~near].all(), name
        listed += int(got.sum())
    assert listed > 0  # the check selected something
