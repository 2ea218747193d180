"""Suspected label errors: folds, cleanlab ranking, and the opt-in stage end to end."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mtmc_pipeline import stages
from mtmc_pipeline.artifacts import TaskArtifacts
from mtmc_pipeline.config import load_task_config
from mtmc_pipeline.evaluation import label_issues as li
from mtmc_pipeline.runtime import DeviceSettings
from mtmc_pipeline.stages.label_quality import label_issues_dir, run_label_issues
from tests.images import write


def _pool(counts: dict[str, int]) -> pd.DataFrame:
    rows = [
        (f"train/{c}/{i}.png", c, k, "train" if i % 4 else "val", f"{c}{i:04d}")
        for k, (c, n) in enumerate(counts.items())
        for i in range(n)
    ]
    return pd.DataFrame(rows, columns=["relpath", "class_name", "label", "split", "content_hash"])


def test_folds_cover_train_and_val_stratified_and_hold_one_fold_out() -> None:
    manifest = pd.concat([_pool({"a": 40, "b": 13}), _pool({"a": 5}).assign(split="test")])
    pool = li.fold_pool(manifest.assign(relpath=range(len(manifest))), 4, seed=0)
    assert len(pool) == 53 and set(pool["split"]) == {"train", "val"}  # no test image
    spread = pool.groupby(["class_name", "label_fold"]).size().groupby(level=0).agg(np.ptp)
    assert (spread <= 1).all()
    held = li.fold_manifest(pool, 2)
    assert (held["split"] == "val").sum() == (pool["label_fold"] == 2).sum()
    assert set(held.loc[held["split"] == "train", "relpath"]).isdisjoint(
        held.loc[held["split"] == "val", "relpath"]
    )


def test_too_few_images_for_the_folds_fail_with_the_setting() -> None:
    with pytest.raises(ValueError, match=r"label_quality.folds = 5 needs at least 10"):
        li.fold_pool(_pool({"a": 4, "b": 4}), 5, seed=0)


def test_flipped_labels_rank_first_and_are_flagged() -> None:
    rng = np.random.default_rng(0)
    pool = _pool({"a": 60, "b": 60, "c": 60}).assign(label_fold=0)
    truth = pool["label"].to_numpy().copy()
    flipped = rng.choice(len(pool), 9, replace=False)
    pool.loc[flipped, "label"] = (truth[flipped] + 1) % 3
    probs = np.full((len(pool), 3), 0.05) + 0.1 * rng.random((len(pool), 3))
    probs[np.arange(len(pool)), truth] += 0.8  # a good model: confident in the true class
    probs /= probs.sum(1, keepdims=True)
    table = li.rank_label_issues(pool, ["a", "b", "c"], probs, "self_confidence", "both")
    top = set(table.head(9)["relpath"])
    assert top == set(pool.loc[flipped, "relpath"])
    flagged = set(table.loc[table["is_label_issue"], "relpath"])
    assert flagged <= top and len(flagged) >= 6  # cleanlab's verdict: no clean image flagged
    first = table.iloc[0]
    row = pool.index[pool["relpath"] == first["relpath"]][0]
    assert first["rank"] == 1 and first["given_label"] != first["suggested_label"]
    assert first["self_confidence"] == pytest.approx(probs[row, pool.loc[row, "label"]])
    suggestions = li.review_suggestions(table)
    assert list(suggestions.columns[:3]) == ["relpath", "action", "new_label"]
    assert (suggestions["action"] == "relabel").all() and len(suggestions) == len(flagged)


TASK = """\
train:
  model: test_resnet
  img_size: 16
  pretrained: false
  epochs: 2
  batch_size: 16
  optimizer: adamw
  lr: 0.01
label_quality:
  enabled: true
  folds: 2
"""


def _png(colour: tuple[int, int, int], rng: np.random.Generator) -> bytes:
    arr = np.clip(np.array(colour) + rng.normal(0, 25, (16, 16, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_stage_trains_fold_models_resumes_and_writes_the_review_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    task = tmp_path / "色"
    for cls, colour in (("红", (220, 40, 40)), ("蓝", (40, 40, 220))):
        for i in range(16):
            write(task / "train" / cls / f"{i}.png", _png(colour, rng))
        for i in range(4):
            write(task / "val" / cls / f"v{i}.png", _png(colour, rng))
    (task / "task.yaml").write_text(TASK, "utf-8")
    cfg = load_task_config(task)
    art = TaskArtifacts(tmp_path / "artifacts", task.name)
    stages.run_inventory(task, art, cfg.scan)
    stages.run_integrity(task, art, cfg.integrity)
    stages.run_splits(art, cfg.split, task)
    runtime = DeviceSettings("cpu")

    from mtmc_pipeline.training import train as training_loop

    real = training_loop.train_model
    calls: list[int] = []

    def crash_on_second_fold(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(training_loop, "train_model", crash_on_second_fold)
    with pytest.raises(KeyboardInterrupt):
        run_label_issues(task, art, cfg, runtime, lambda _: None)
    monkeypatch.setattr(training_loop, "train_model", real)
    logs: list[str] = []
    result = run_label_issues(task, art, cfg, runtime, logs.append)
    assert "label_issues: fold 1/2 reused" in logs  # the finished fold was not retrained

    out = label_issues_dir(art)
    table = pd.read_parquet(out / "label_issues.parquet")
    assert list(table.columns) == li.ISSUE_COLUMNS
    pool = 40 - round(0.2 * 16) * 2  # every train and val image; test (0.2 of train) is not
    assert len(table) == pool and sorted(table["rank"]) == list(range(1, pool + 1))
    assert set(table["fold"]) == {0, 1}
    probs = np.stack(table["probabilities"].to_numpy())
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert result.metadata["images"] == pool and "report" in result.metadata
    report = (out / "report.md").read_text("utf-8")
    assert "# Label quality" in report and (out / "suspects.png").stat().st_size > 0
    again = run_label_issues(task, art, cfg, runtime, lambda _: None)
    assert again.reused

    off = load_task_config(task, {"label_quality": {"enabled": False}})
    first_off = run_label_issues(task, art, off, runtime)
    assert first_off.metadata["enabled"] is False and not first_off.reused
    assert not (out / "label_issues.parquet").exists()  # stale results do not linger
    assert run_label_issues(task, art, off, runtime).reused
