"""Multi-label data: labels.csv and folder labels, integrity findings, iterative stratification,
stable splits and repeat-factor sampling weights, run as the pipeline runs the data stages."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from mtmc_pipeline import stages
from mtmc_pipeline.artifacts import TaskArtifacts
from mtmc_pipeline.config import (
    ConfigError,
    IntegrityConfig,
    SamplingConfig,
    ScanConfig,
    SplitConfig,
    load_task_config,
)
from mtmc_pipeline.data.multilabel_sampling import multilabel_sampling_weights
from mtmc_pipeline.data.multilabel_splits import KIND_KEY, indicator, iterative_stratification
from mtmc_pipeline.data.splits import class_names_from_schema
from tests.images import image_bytes, write

SPLIT = SplitConfig(val_fraction=0.25, test_fraction=0.25)


def _image(task: Path, rel: str) -> None:
    write(task / rel, image_bytes(seed=zlib.crc32(rel.encode())))


def _run(task: Path, art: TaskArtifacts, split: SplitConfig = SPLIT):
    stages.run_inventory(task, art, ScanConfig())
    checked = stages.run_integrity(task, art, IntegrityConfig(workers=1))
    splits = stages.run_splits(art, split)
    stages.run_sampling(art, SamplingConfig(strategy="repeat_factor", repeat_threshold=0.5))
    return checked, splits


def test_labels_csv_becomes_label_sets_and_its_problems_are_findings(tmp_path: Path) -> None:
    task, art = tmp_path / "data" / "印花", TaskArtifacts(tmp_path / "art", "印花")
    for i in range(12):
        _image(task, f"图片/{i}.png")
    (task / "task.yaml").write_text("kind: multilabel\nclasses: [人物, 卡通, 条纹]\n", "utf-8")
    rows = [
        "relpath,labels",
        "图片/0.png,人物;卡通",
        "图片/1.png, 卡通 ;",
        "图片/2.png,",  # no label
        "图片/3.png,人物;风景",  # 风景 is not a declared class
        "图片/4.png,条纹",
        "图片/4.png,人物",  # listed twice: the first row counts
        "图片/不存在.png,人物",  # no such file
        "just one field",
        *(f"图片/{i}.png,{'人物;条纹' if i % 2 else '卡通'}" for i in range(5, 11)),
    ]  # 图片/11.png has no row
    (task / "labels.csv").write_bytes(("\ufeff" + "\n".join(rows) + "\n").encode())
    checked, splits = _run(task, art)

    integrity = pd.read_parquet(art.integrity).set_index("relpath")
    assert list(integrity.loc["图片/0.png", "labels"]) == ["人物", "卡通"]
    assert list(integrity.loc["图片/1.png", "labels"]) == ["卡通"]
    assert list(integrity.loc["图片/2.png", "labels"]) == []
    assert list(integrity.loc["图片/3.png", "labels"]) == ["人物"]
    assert list(integrity.loc["图片/3.png", "issues"]) == ["labels_unknown_class"]
    assert list(integrity.loc["图片/4.png", "labels"]) == ["条纹"]
    assert list(integrity.loc["图片/4.png", "issues"]) == ["labels_duplicate_row"]
    assert integrity.loc["图片/11.png", "status"] == "error"
    assert list(integrity.loc["图片/11.png", "issues"]) == ["not_in_labels_csv"]
    findings = checked.metadata["task_findings"]
    assert sorted(findings["code"]) == ["labels_bad_row", "labels_missing_file"]
    assert findings["detail"].str.contains("不存在.png").any()
    assert findings["detail"].str.contains("line 9").any()

    table = pq.read_table(art.splits)
    assert class_names_from_schema(table.schema) == ["人物", "卡通", "条纹"]
    assert table.schema.metadata[KIND_KEY] == b"multilabel"
    manifest = table.to_pandas().set_index("relpath")
    assert "图片/11.png" not in manifest.index  # excluded, and recorded above
    assert list(manifest.loc["图片/0.png", "labels"]) == [0, 1]
    assert manifest.loc["图片/0.png", "class_name"] == "人物;卡通"
    assert list(manifest.loc["图片/2.png", "labels"]) == []
    assert (manifest["label"] == -1).all()
    assert set(manifest["split"]) == {"train", "val", "test"}
    assert splits.checks["every_class_in_train"].passed


def test_same_bytes_in_two_class_folders_is_one_image_with_two_labels(tmp_path: Path) -> None:
    task, art = tmp_path / "data" / "t", TaskArtifacts(tmp_path / "art", "t")
    for i in range(8):
        for cls in ("人物", "卡通"):
            _image(task, f"{cls}/{cls}{i}.png")
    both = image_bytes(seed=99)
    write(task / "人物" / "both.png", both)
    write(task / "卡通" / "both copy.png", both)
    write(task / "卡通" / "both again.png", both)
    (task / "task.yaml").write_text("kind: multilabel\n", "utf-8")
    _run(task, art)
    integrity = pd.read_parquet(art.integrity).set_index("relpath")
    assert not integrity["issues"].map(lambda c: "conflicting_labels" in c).any()
    # a second copy in the same class folder is still a duplicate
    assert list(integrity.loc["卡通/both copy.png", "issues"]) == ["exact_duplicate"]
    manifest = pd.read_parquet(art.splits)
    row = manifest[manifest["content_hash"] == integrity.loc["人物/both.png", "content_hash"]]
    assert len(row) == 1 and list(row["labels"].iloc[0]) == [0, 1]

    # the same folders as a single-label task: a conflict, as before
    (task / "task.yaml").unlink()
    _run(task, art, SplitConfig(val_fraction=0.25))
    single = pd.read_parquet(art.integrity).set_index("relpath")
    assert "conflicting_labels" in single.loc["人物/both.png", "issues"]
    assert "labels" not in pd.read_parquet(art.splits).columns


def test_iterative_stratification_matches_each_labels_share() -> None:
    rng = np.random.default_rng(0)
    prevalence = np.array([0.02, 0.05, 0.3, 0.6])
    y = rng.random((2000, 4)) < prevalence
    fractions = np.array([0.6, 0.2, 0.2])
    split = iterative_stratification(y, fractions, rng.random(2000))
    for j, share in enumerate(fractions):
        got = y[split == j].sum(0)
        assert np.all(np.abs(got - share * y.sum(0)) <= 1.0 + 1e-9), (j, got)
    # a seeded hash split misses the rare labels' shares by far more
    by_hash = np.digitize(rng.random(2000), np.cumsum(fractions)[:-1])
    worst_hash = max(
        np.abs(y[by_hash == j].sum(0) - s * y.sum(0)).max() for j, s in enumerate(fractions)
    )
    assert worst_hash > 1.0


def test_existing_images_keep_their_split_when_images_are_added(tmp_path: Path) -> None:
    task, art = tmp_path / "data" / "t", TaskArtifacts(tmp_path / "art", "t")
    (task / "task.yaml").parent.mkdir(parents=True)
    (task / "task.yaml").write_text("kind: multilabel\n", "utf-8")

    def plant(start: int, n: int) -> None:
        rows = ["relpath,labels"]
        for i in range(start + n):
            _image(task, f"img/{i}.png")
            rows.append(f"img/{i}.png,{';'.join(c for k, c in enumerate('abc') if (i >> k) & 1)}")
        (task / "labels.csv").write_text("\n".join(rows) + "\n", "utf-8")

    plant(0, 40)
    _run(task, art)
    first = pd.read_parquet(art.splits).set_index("content_hash")["split"]
    plant(40, 40)
    _run(task, art)
    second = pd.read_parquet(art.splits).set_index("content_hash")["split"]
    assert len(second) == 80
    assert second.reindex(first.index).equals(first)
    assert (second.drop(first.index) != "train").any()  # new images fill val and test too


def test_repeat_factor_weights_take_the_max_or_mean_over_labels() -> None:
    manifest = pd.DataFrame(
        {
            "relpath": ["a", "b", "c", "d"],
            "label": -1,
            "split": "train",
            "labels": [[0], [0, 1], [0], []],
        }
    )
    common = {"strategy": "repeat_factor", "repeat_threshold": 0.5}
    for combine in ("max", "mean"):
        config = SamplingConfig(**common, multilabel_combine=combine)
        weights, table = multilabel_sampling_weights(manifest, ["x", "y"], config)
        # f_x = 3/4, f_y = 1/4: r_x = 1, r_y = sqrt(0.5 / 0.25); an image with no label: min
        r = np.array([1.0, np.sqrt(2.0)])
        raw = np.array([r[0], max(r) if combine == "max" else r.mean(), r[0], r.min()])
        np.testing.assert_allclose(weights["weight"], raw * 4 / raw.sum())
        assert weights["weight"].mean() == pytest.approx(1.0)
        assert list(table["count"]) == [3, 1]
    assert indicator(manifest["labels"], 2).sum() == 4


def test_kind_and_classes_are_validated_with_the_file_named(tmp_path: Path) -> None:
    task = tmp_path / "t"
    task.mkdir()
    (task / "task.yaml").write_text("kind: multi\n", "utf-8")
    with pytest.raises(ConfigError, match=r"task.yaml: kind = 'multi'"):
        load_task_config(task)
    (task / "task.yaml").write_text("kind: multilabel\nclasses: [a, 'b;c']\n", "utf-8")
    with pytest.raises(ConfigError, match="classes"):
        load_task_config(task)
    (task / "task.yaml").write_text("kind: multilabel\nclasses: [条纹, 格子]\n", "utf-8")
    cfg = load_task_config(task)
    assert (cfg.kind, cfg.classes) == ("multilabel", ["条纹", "格子"])


def test_labels_csv_is_part_of_the_raw_data_version(tmp_path: Path) -> None:
    task = tmp_path / "t"
    _image(task, "img/0.png")
    before, _ = stages.observe_raw(task, ScanConfig())
    (task / "labels.csv").write_text("img/0.png,a\n", "utf-8")
    with_labels, _ = stages.observe_raw(task, ScanConfig())
    (task / "labels.csv").write_text("img/0.png,b\n", "utf-8")
    relabelled, _ = stages.observe_raw(task, ScanConfig())
    assert len({before, with_labels, relabelled}) == 3
