"""Split manifests: honoured folders, stratification, stability as images are added."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest

from mtmc_pipeline.config import SplitConfig
from mtmc_pipeline.data.splits import (
    TaskDataError,
    cross_task_leaks,
    leaking_hashes,
    make_splits,
)


def _usable(counts: dict[str, int], split_dir: str = "none", offset: int = 0) -> pd.DataFrame:
    rows = []
    for cls, n in counts.items():
        for i in range(offset, offset + n):
            h = hashlib.md5(f"{cls}/{i}".encode()).hexdigest()
            rows.append((f"{cls}/{i}.png", split_dir, cls, h))
    return pd.DataFrame(rows, columns=["relpath", "split_dir", "class_name", "content_hash"])


def test_flat_layout_is_stratified_and_every_class_gets_val() -> None:
    usable = _usable({"a": 200, "b": 40, "c": 2})
    manifest, classes = make_splits(usable, SplitConfig(val_fraction=0.2, test_fraction=0))
    assert classes == ["a", "b", "c"]
    counts = manifest.groupby(["class_name", "split"]).size().unstack(fill_value=0)
    assert (counts["val"] >= 1).all()
    assert counts.loc["a", "val"] / 200 == pytest.approx(0.2, abs=0.07)
    assert counts.loc["c", "train"] == 1 and counts.loc["c", "val"] == 1
    assert set(manifest["split"]) == {"train", "val"}


def test_deterministic_and_seeded() -> None:
    usable = _usable({"a": 50, "b": 50})
    m1, _ = make_splits(usable, SplitConfig(seed=1))
    m2, _ = make_splits(usable.sample(frac=1, random_state=3), SplitConfig(seed=1))
    m3, _ = make_splits(usable, SplitConfig(seed=2))
    assert m1.equals(m2)
    assert set(m1.loc[m1["split"] == "val", "relpath"]) != set(
        m3.loc[m3["split"] == "val", "relpath"]
    )


def test_adding_images_never_moves_an_existing_one() -> None:
    cfg = SplitConfig(val_fraction=0.2, test_fraction=0.1)
    before = _usable({"a": 30, "b": 3})
    first, _ = make_splits(before, cfg)
    grown = pd.concat([before, _usable({"a": 40, "b": 10, "c": 5}, offset=1000)])
    second, _ = make_splits(grown, cfg, previous=first)
    merged = first.merge(second, on="relpath", suffixes=("_before", "_after"))
    assert len(merged) == len(first)
    assert (merged["split_before"] == merged["split_after"]).all()
    # and the grown classes' shares are still their targets up to one image
    _assert_shares_within_one_image(second, cfg)


def _assert_shares_within_one_image(manifest: pd.DataFrame, cfg: SplitConfig) -> None:
    counts = manifest.groupby(["class_name", "split"]).size().unstack(fill_value=0)
    counts = counts.reindex(columns=["train", "val", "test"], fill_value=0)
    n = counts.sum(axis=1)
    assert ((counts["val"] - n * cfg.val_fraction).abs() <= 1).all(), counts
    assert ((counts["test"] - n * cfg.test_fraction).abs() <= 1).all(), counts
    assert (counts["train"] >= 1).all()
    assert (counts.loc[n >= 2, "val"] >= 1).all()


@pytest.mark.parametrize("seed", range(5))
def test_per_class_shares_are_exact_up_to_one_image(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sizes = {f"c{i}": int(rng.integers(1, 400)) for i in range(12)} | {"二": 2, "三": 3}
    cfg = SplitConfig(val_fraction=0.2, test_fraction=0.1, seed=seed)
    manifest, _ = make_splits(_usable(sizes), cfg)
    _assert_shares_within_one_image(manifest, cfg)


def test_a_small_class_never_loses_its_last_train_image() -> None:
    """Classes of 2 and 3 images over many seeds: >= 1 train image always, >= 1 val image."""
    for seed in range(60):
        cfg = SplitConfig(val_fraction=0.2, test_fraction=0.1, seed=seed)
        manifest, classes = make_splits(_usable({"big": 20, "pair": 2, "trio": 3}), cfg)
        assert classes == ["big", "pair", "trio"]
        counts = manifest.groupby(["class_name", "split"]).size().unstack(fill_value=0)
        assert (counts["train"] >= 1).all() and (counts["val"] >= 1).all(), (seed, counts)


def test_identical_bytes_land_in_the_same_split() -> None:
    usable = _usable({"a": 40, "b": 40})
    dupes = usable.head(10).assign(relpath=lambda d: d["relpath"] + ".copy.png")
    manifest, _ = make_splits(pd.concat([usable, dupes]), SplitConfig(), task="t")
    assert len(leaking_hashes(manifest)) == 0


def test_split_folders_are_honoured_and_val_is_carved_when_missing() -> None:
    usable = pd.concat([_usable({"a": 20, "b": 20}, "train"), _usable({"a": 5}, "test", 100)])
    manifest, _ = make_splits(usable, SplitConfig(val_fraction=0.25))
    test_rows = manifest[manifest["relpath"].str.match(r"a/10\d\.png")]
    assert len(test_rows) == 5
    assert (test_rows["split"] == "test").all()
    assert (manifest["split"] == "val").sum() >= 2


def test_k_fold_column() -> None:
    manifest, _ = make_splits(_usable({"a": 100, "b": 100}), SplitConfig(folds=5))
    train = manifest[manifest["split"] == "train"]
    assert set(train["fold"]) == {0, 1, 2, 3, 4}
    assert manifest[manifest["split"] != "train"]["fold"].isna().all()


def test_k_folds_are_stratified_and_stable_as_images_are_added() -> None:
    cfg = SplitConfig(folds=5)
    first, _ = make_splits(_usable({"a": 103, "b": 27, "c": 9}), cfg)
    per_class = first[first["split"] == "train"].groupby(["class_name", "fold"]).size()
    spread = per_class.groupby(level=0).agg(lambda s: s.max() - s.min())
    assert (spread <= 1).all()  # as even as each class's count allows
    grown = _usable({"a": 140, "b": 60, "c": 30})  # the first files plus new ones
    second, _ = make_splits(grown, cfg, previous=first)
    merged = first.merge(second, on="relpath", suffixes=("_before", "_after"))
    train = merged[merged["split_before"] == "train"]
    assert (train["fold_before"] == train["fold_after"]).all()
    per_class = second[second["split"] == "train"].groupby(["class_name", "fold"]).size()
    assert (per_class.groupby(level=0).agg(lambda s: s.max() - s.min()) <= 1).all()


def test_untrainable_tasks_fail_with_the_task_name() -> None:
    with pytest.raises(TaskDataError, match=r"'solo'.*at least two classes"):
        make_splits(_usable({"only": 10}), SplitConfig(), task="solo")
    with pytest.raises(TaskDataError, match="no usable images"):
        make_splits(_usable({}), SplitConfig(), task="empty")


def _u(key: str, seed: int = 0, salt: str = "split") -> float:
    """The documented rule, written out independently: blake2b-64 of 'salt:seed:key' / 2**64."""
    digest = hashlib.blake2b(f"{salt}:{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def test_every_file_is_placed_by_the_hash_of_its_content_within_its_class() -> None:
    usable = _usable({"a": 120, "b": 90})
    cfg = SplitConfig(val_fraction=0.2, test_fraction=0.1, seed=7, folds=4)
    manifest, _ = make_splits(usable, cfg)
    for _, part in manifest.groupby("class_name"):
        ranked = sorted(part.itertuples(), key=lambda r: _u(r.content_hash, seed=7))
        n_test, n_val = round(len(ranked) * 0.1), round(len(ranked) * 0.2)
        train = []
        for i, row in enumerate(ranked):
            expected = "test" if i < n_test else "val" if i < n_test + n_val else "train"
            assert row.split == expected, row.relpath
            if expected == "train":
                train.append(row)
            else:
                assert pd.isna(row.fold)
        # train files are dealt round the folds in fold-hash order within each class
        by_fold_hash = sorted(train, key=lambda r: _u(r.content_hash, seed=7, salt="fold"))
        for rank, row in enumerate(by_fold_hash):
            assert row.fold == rank % 4, row.relpath


def test_a_two_image_class_gets_exactly_one_val_image_the_lower_hash() -> None:
    usable = _usable({"big": 50, "pair": 2})
    pair = usable[usable["class_name"] == "pair"]
    hashes = sorted(pair["content_hash"], key=_u)
    # a val_fraction small enough that the hash alone puts neither file in val
    cfg = SplitConfig(val_fraction=min(_u(h) for h in hashes) / 2)
    manifest, _ = make_splits(usable, cfg)
    placed = manifest[manifest["class_name"] == "pair"].set_index("content_hash")["split"]
    assert placed.to_dict() == {hashes[0]: "val", hashes[1]: "train"}


def test_missing_split_folders_are_carved_from_train_only() -> None:
    usable = pd.concat([_usable({"a": 60, "b": 60}, "train"), _usable({"a": 4}, "val", 500)])
    manifest, _ = make_splits(usable, SplitConfig(val_fraction=0.3, test_fraction=0.25))
    by_rel = manifest.set_index("relpath")
    for row in usable.itertuples():
        if row.split_dir == "val":
            assert by_rel.loc[row.relpath, "split"] == "val"
        else:  # val exists as a folder, so only test is carved, at its own fraction
            same = usable[
                (usable["class_name"] == row.class_name) & (usable["split_dir"] == "train")
            ]
            rank = sorted(same["content_hash"], key=_u).index(row.content_hash)
            expected = "test" if rank < 15 else "train"  # 25% of 60
            assert by_rel.loc[row.relpath, "split"] == expected


def test_split_folders_win_over_a_previous_manifest() -> None:
    flat = _usable({"a": 30, "b": 30})
    first, _ = make_splits(flat, SplitConfig())
    moved = flat.assign(split_dir="train")  # the user now sorted everything into train/ ...
    extra = _usable({"a": 3, "b": 3}, "val", 900)  # ... and made a val/ folder
    second, _ = make_splits(pd.concat([moved, extra]), SplitConfig(), previous=first)
    in_train = second[second["relpath"].isin(flat["relpath"])]
    assert (in_train["split"] != "val").all()  # val is the folder now; test is still carved
    assert (first["split"] == "val").any()  # the earlier manifest did have val files there


def test_stability_with_the_previous_manifest_over_many_additions() -> None:
    cfg = SplitConfig(val_fraction=0.25, test_fraction=0.1)
    manifest, _ = make_splits(_usable({"a": 6, "b": 6}), cfg)
    for step in range(1, 6):
        grown = pd.concat(
            [_usable({"a": 6, "b": 6}), _usable({"a": 5 * step, "b": step}, offset=10)]
        )
        nxt, _ = make_splits(grown, cfg, previous=manifest)
        kept = manifest.merge(nxt, on="relpath", suffixes=("_old", "_new"))
        assert len(kept) == len(manifest)
        assert (kept["split_old"] == kept["split_new"]).all()
        manifest = nxt


def _split_by_hash(manifest: pd.DataFrame) -> pd.Series:
    return manifest.drop_duplicates("content_hash").set_index("content_hash")["split"]


def test_a_group_member_takes_its_leaders_splits_over_its_own_previous_ones() -> None:
    cfg = SplitConfig(val_fraction=0.2, test_fraction=0.2)
    leader_usable = _usable({"a": 30, "b": 30})
    leader, _ = make_splits(leader_usable, cfg)
    # the same 60 images under other labels, plus 20 images the leader does not have
    relabelled = leader_usable.assign(class_name=np.where(np.arange(60) % 2, "odd", "even"))
    member_usable = pd.concat([relabelled, _usable({"even": 10, "odd": 10}, offset=500)])
    alone, _ = make_splits(member_usable, cfg)
    grouped, _ = make_splits(member_usable, cfg, previous=alone, leader=leader)

    theirs, mine = _split_by_hash(leader), _split_by_hash(grouped)
    assert (_split_by_hash(alone).reindex(theirs.index) != theirs).any()  # alone, they differ
    assert mine.reindex(theirs.index).equals(theirs)
    assert cross_task_leaks([leader, grouped]) == 0 < cross_task_leaks([leader, alone])
    # without a previous manifest: each class of 40 wants 8 val and 8 test, and the new images
    # make up what the leader's images of that class lack
    fresh, _ = make_splits(member_usable, cfg, leader=leader)
    counts = fresh.groupby(["class_name", "split"]).size().unstack()
    assert (counts[["val", "test"]] == 8).all().all()
    assert (_split_by_hash(fresh).reindex(theirs.index) == theirs).all()


def test_a_members_split_folders_win_over_its_leader() -> None:
    cfg = SplitConfig(val_fraction=0.2, test_fraction=0.2)
    leader, _ = make_splits(_usable({"a": 30, "b": 30}), cfg)
    by_leader = _split_by_hash(leader)
    member_usable = _usable({"a": 30, "b": 30}, "train")
    in_val_folder = member_usable["content_hash"].map(by_leader) == "train"
    member_usable.loc[in_val_folder.to_numpy().nonzero()[0][:5], "split_dir"] = "val"
    member, _ = make_splits(member_usable, cfg, leader=leader)

    split = member.set_index("relpath")["split"]
    folder_val = member_usable.loc[member_usable["split_dir"] == "val", "relpath"]
    assert (split[folder_val] == "val").all() and len(folder_val) == 5
    assert (split.drop(folder_val) != "val").all()  # val is the member's folder alone
    leader_test = member_usable.loc[member_usable["content_hash"].map(by_leader) == "test"]
    assert (split[leader_test["relpath"]] == "test").all()  # test is carved: the leader's wins


def test_cross_task_leaks_count_each_image_trained_on_and_held_out_once() -> None:
    def manifest(splits: dict[str, str]) -> pd.DataFrame:
        return pd.DataFrame({"content_hash": list(splits), "split": list(splits.values())})

    a = manifest({"h1": "train", "h2": "val", "h3": "train", "h4": "test"})
    b = manifest({"h1": "val", "h2": "val", "h4": "train"})
    c = manifest({"h1": "test", "h3": "train"})
    assert cross_task_leaks([a, b, c]) == 2  # h1 (train in a, held out in b and c) and h4
    assert cross_task_leaks([a]) == 0
