"""Splits inside a shared group, run as the pipeline runs them: ``parity`` (the digits images
again, labelled even / odd) takes the split of its leader ``digits`` for every image, so the
shared backbone does not train on what the other task validates or tests on."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from mtmc_pipeline import stages
from mtmc_pipeline.artifacts import TaskArtifacts, stored_fingerprint
from mtmc_pipeline.config import SplitConfig, TrainConfig, load_task_config
from mtmc_pipeline.data.groups import SharedGroup
from mtmc_pipeline.data.splits import cross_task_leaks, read_manifest
from mtmc_pipeline.runtime import resolve_runtime
from mtmc_pipeline.stages.shared import run_shared_training
from tests.test_automation import add_images
from tests.test_multitask import RECIPE


def _digits(data: Path, tiny_root: Path) -> None:
    shutil.copytree(tiny_root / "digits", data / "digits", copy_function=shutil.copy2)


def _parity(data: Path, val_folder: frozenset[str] = frozenset()) -> None:
    """``parity`` from the digits images; those named in ``val_folder`` (digits relpaths) go to
    its ``val/`` folder, the others then to ``train/``."""
    for src in sorted((data / "digits").glob("*/*.png")):
        relpath = f"{src.parent.name}/{src.name}"
        cls = "odd" if int(src.parent.name) % 2 else "even"
        folder = ("val" if relpath in val_folder else "train") if val_folder else ""
        dst = data / "parity" / folder / cls / f"{src.parent.name}_{src.name}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    shutil.copy2(data / "digits" / "task.yaml", data / "parity" / "task.yaml")


def _prepare(data: Path, root: Path, task: str) -> TaskArtifacts:
    cfg = load_task_config(data / task)
    art = TaskArtifacts(root, task)
    stages.run_inventory(data / task, art, cfg.scan)
    stages.run_integrity(data / task, art, cfg.integrity)
    return art


def _split(
    art: TaskArtifacts, leader: TaskArtifacts | None = None, config: SplitConfig | None = None
) -> tuple[stages.StageResult, pd.DataFrame]:
    result = stages.run_splits(art, config or SplitConfig(), leader=leader)
    return result, read_manifest(art.splits)[0]


def _by_hash(manifest: pd.DataFrame) -> pd.Series:
    return manifest.drop_duplicates("content_hash").set_index("content_hash")["split"].sort_index()


def test_a_member_takes_its_leaders_split_of_every_image(tmp_path: Path, tiny_root: Path) -> None:
    data = tmp_path / "data"
    _digits(data, tiny_root)
    _parity(data)
    digits, parity = (_prepare(data, tmp_path / "art", t) for t in ("digits", "parity"))
    _, leader = _split(digits)
    _, alone = _split(parity)  # not in a group: split on its own, as before
    assert cross_task_leaks([leader, alone]) > 0

    _, grouped = _split(parity, digits)  # over its own previous manifest
    assert _by_hash(grouped).equals(_by_hash(leader))
    assert cross_task_leaks([leader, grouped]) == 0
    assert {"train", "val", "test"} <= set(grouped["split"])


def test_a_multilabel_member_takes_its_leaders_split(tmp_path: Path, tiny_root: Path) -> None:
    data = tmp_path / "data"
    _digits(data, tiny_root)
    tags = data / "tags"
    rows = ["relpath,labels"]
    for src in sorted((data / "digits").glob("*/*.png")):
        digit = int(src.parent.name)
        relpath = f"img/{digit}_{src.name}"
        (tags / "img").mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, tags / relpath)
        labels = [name for name, on in (("even", digit % 2 == 0), ("small", digit < 5)) if on]
        rows.append(f"{relpath},{';'.join(labels)}")
    (tags / "labels.csv").write_text("\n".join(rows) + "\n", "utf-8")
    (tags / "task.yaml").write_text("kind: multilabel\n", "utf-8")
    digits, member = (_prepare(data, tmp_path / "art", t) for t in ("digits", "tags"))
    _, leader = _split(digits)
    _, alone = _split(member)
    assert "labels" in alone.columns and cross_task_leaks([leader, alone]) > 0

    _, grouped = _split(member, digits)
    assert _by_hash(grouped).equals(_by_hash(leader))
    assert cross_task_leaks([leader, grouped]) == 0


def test_a_new_leader_manifest_resplits_the_member(tmp_path: Path, tiny_root: Path) -> None:
    data = tmp_path / "data"
    _digits(data, tiny_root)
    _parity(data)
    digits, parity = (_prepare(data, tmp_path / "art", t) for t in ("digits", "parity"))
    _split(digits)
    first, _ = _split(parity, digits)
    inputs = stored_fingerprint(parity.splits)
    assert _split(parity, digits)[0].reused

    _, leader = _split(digits, config=SplitConfig(seed=7))  # every digit re-split
    second, grouped = _split(parity, digits)
    assert not second.reused and stored_fingerprint(parity.splits) != inputs
    assert second.fingerprint != first.fingerprint
    assert _by_hash(grouped).equals(_by_hash(leader))

    add_images(data / "digits", 3)  # images parity does not have: its manifest stays as it is
    _prepare(data, tmp_path / "art", "digits")
    _split(digits, config=SplitConfig(seed=7))
    third, _ = _split(parity, digits)
    assert not third.reused and third.fingerprint == second.fingerprint


def test_a_members_val_folder_wins_and_the_group_reports_the_leak(
    tmp_path: Path, tiny_root: Path
) -> None:
    data = tmp_path / "data"
    _digits(data, tiny_root)
    digits = _prepare(data, tmp_path / "art", "digits")
    _, leader = _split(digits)
    trained = frozenset(sorted(leader.loc[leader["split"] == "train", "relpath"])[:5])
    _parity(data, val_folder=trained)
    parity = _prepare(data, tmp_path / "art", "parity")
    _, member = _split(parity, digits)

    split = member.set_index("relpath")["split"]
    folder_val = split[split.index.str.startswith("val/")]
    assert len(folder_val) == 5 and (folder_val == "val").all()
    assert (split.drop(folder_val.index) != "val").all()
    leaks = cross_task_leaks([leader, member])
    assert leaks >= 5

    for art in (digits, parity):
        stages.run_sampling(art, load_task_config(data / art.task).sampling)
    group = SharedGroup(name="digits_all", tasks=["digits", "parity"])
    lines: list[str] = []
    config = TrainConfig(**{**RECIPE, "epochs": 1})
    cpu = resolve_runtime("cpu")
    result = run_shared_training(group, data, tmp_path / "art", config, cpu, lines.append)
    assert result.metadata["cross_task_leaks"] == leaks
    warnings = [line for line in lines if line.startswith("warning:")]
    assert warnings == [
        f"warning: group 'digits_all': {leaks} images are in one member's train split and in "
        "another's val or test split: the scores of the members that hold them out are "
        "optimistic"
    ]
