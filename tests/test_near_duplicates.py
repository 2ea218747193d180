"""Near duplicates: the indexed search finds what a full comparison finds; integrity codes."""

from __future__ import annotations

import io
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mtmc_pipeline.config import IntegrityConfig
from mtmc_pipeline.data import near_duplicates
from mtmc_pipeline.data.integrity import check_integrity
from mtmc_pipeline.data.layout import scan_task
from mtmc_pipeline.data.near_duplicates import (
    fingerprints,
    group_labels,
    near_duplicate_pairs,
    reduced,
)
from mtmc_pipeline.demo import _draw, pattern_label_problems, write_pattern
from mtmc_pipeline.stages.prepare import near_duplicate_preview
from tests.images import write


def _brute_force(hashes: np.ndarray, thumbs: np.ndarray, distance: int, colour: float) -> set:
    d = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    i, j = np.nonzero(np.triu(d <= distance, k=1))
    c = np.abs(thumbs[i].astype(int) - thumbs[j].astype(int)).mean(axis=1)
    return set(zip(i[c <= colour].tolist(), j[c <= colour].tolist(), strict=True))


def test_indexed_search_finds_every_pair_a_full_comparison_finds() -> None:
    rng = np.random.default_rng(0)
    n, copies = 1500, 300
    hashes = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    thumbs = rng.integers(0, 256, (n, 48), dtype=np.uint8)
    src = rng.integers(0, n, copies)
    flips = [rng.choice(64, rng.integers(0, 7), replace=False) for _ in range(copies)]
    masks = np.array([sum(1 << int(b) for b in f) for f in flips], dtype=np.uint64)
    hashes = np.concatenate([hashes, hashes[src] ^ masks])
    noise = rng.integers(-3, 4, (copies, 48))
    thumbs = np.concatenate([thumbs, np.clip(thumbs[src] + noise, 0, 255).astype(np.uint8)])
    hashes[-1] = hashes[0]  # a copy sharing its hash but not its colours: no pair
    thumbs[-1] = 255 - thumbs[0]
    found = {tuple(p) for p in near_duplicate_pairs(hashes, thumbs, 6, 4.0).tolist()}
    expected = _brute_force(hashes, thumbs, 6, 4.0)
    assert found == expected
    assert len(expected) >= copies - 5  # the planted copies (a few coincide or lose colour)
    assert (0, n + copies - 1) not in found


def test_groups_are_connected_components_numbered_by_first_member() -> None:
    labels = group_labels(np.array([[3, 5], [1, 4], [5, 6]]), 8)
    assert labels.tolist() == [-1, 0, -1, 1, 0, 1, 1, -1]


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_integrity_codes_for_near_copies(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    task = tmp_path / "t"
    pictures = [_draw(kind, rng, 64) for kind in (0, 1, 2, 0, 1, 2)]
    for i, img in enumerate(pictures):
        write(task / "train" / ("a" if i < 3 else "b") / f"{i}.png", _png(img))
    write(task / "val" / "a" / "reencoded.jpg", _jpeg(pictures[0], 90))  # leak
    write(task / "train" / "a" / "bigger.png", _png(pictures[1].resize((80, 80))))  # duplicate
    write(task / "train" / "b" / "smaller.png", _png(pictures[2].resize((48, 48))))  # conflict
    flat = Image.new("RGB", (32, 32), (120, 30, 200))
    write(task / "train" / "b" / "flat.png", _png(flat))
    config = IntegrityConfig(workers=1)
    df, _ = check_integrity(task, scan_task(task).inventory, config)
    issues = df.set_index("relpath")["issues"].map(list).to_dict()
    assert issues["val/a/reencoded.jpg"] == ["near_duplicate_leak"]
    assert issues["train/a/bigger.png"] == ["near_duplicate"]
    assert issues["train/a/2.png"] == ["near_duplicate_conflict"]
    assert issues["train/b/smaller.png"] == ["near_duplicate_conflict"]
    for rel in ("train/a/0.png", "train/a/1.png", "train/b/3.png", "train/b/flat.png"):
        assert issues[rel] == []
    rows = df.set_index("relpath")
    assert rows.loc["val/a/reencoded.jpg", "status"] == "error"
    assert rows.loc["train/a/bigger.png", "status"] == "warn"
    assert (
        rows.loc["train/a/0.png", "near_duplicate_group"]
        == (rows.loc["val/a/reencoded.jpg", "near_duplicate_group"])
    )
    assert pd.isna(rows.loc["train/b/3.png", "near_duplicate_group"])
    assert pd.isna(rows.loc["train/b/flat.png", "perceptual_hash"])  # too flat to hash
    assert rows["perceptual_hash"].dropna().str.fullmatch("[0-9a-f]{16}").all()

    # a rerun with the previous table reuses every fingerprint and finds the same groups
    again, summary = check_integrity(task, scan_task(task).inventory, config, previous=df)
    assert summary["decoded"] == 0
    assert again["perceptual_hash"].equals(df["perceptual_hash"])
    assert again["issues"].map(list).equals(df["issues"].map(list))

    off, _ = check_integrity(
        task, scan_task(task).inventory, IntegrityConfig(workers=1, near_duplicates=False)
    )
    assert off["perceptual_hash"].isna().all()
    assert not any("near_duplicate" in c for codes in off["issues"] for c in codes)


def test_the_hash_is_imagehash_phash() -> None:
    rng = np.random.default_rng(5)
    pictures = [_draw(kind % 5, rng, 48) for kind in range(40)]
    pictures += [Image.fromarray(rng.integers(0, 255, (20, 30, 3), np.uint8)) for _ in range(40)]
    pictures.append(Image.new("RGB", (16, 16), (9, 9, 9)).convert("P"))
    pictures[-1].putpixel((3, 4), 200)
    hashes = [h for h, _ in fingerprints([reduced(img) for img in pictures])]  # one batch
    assert hashes == [str(imagehash.phash(img)) for img in pictures]


def test_batched_reductions_are_pillows_own_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    # both orders of Pillow's two passes (it goes vertical first for 31 x 33, 20 x 40), one
    # side already 32, the largest size batched and one pixel more, which is not
    sizes = [(16, 16), (31, 33), (20, 40), (100, 7), (32, 50), (64, 64), (65, 64)]
    pictures = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).convert(mode)
        for w, h in sizes
        for mode in ("RGB", "L")
        for _ in range(4)
    ]
    pictures.append(pictures[0].resize((10, 12)))  # alone of its size: reduced on its own
    smalls = [reduced(img) for img in pictures]
    assert sum(isinstance(s, Image.Image) for s in smalls) == len(pictures) - 8
    expected = [
        (str(imagehash.phash(img)), img.convert("RGB").resize((4, 4), Image.BOX).tobytes())
        for img in pictures
    ]
    one_by_one = []
    reduce_one = near_duplicates._reduce_one
    monkeypatch.setattr(
        near_duplicates, "_reduce_one", lambda img: one_by_one.append(img) or reduce_one(img)
    )
    assert fingerprints(smalls) == expected
    assert one_by_one == [pictures[-1]]  # the others in one batch per mode and size
    one_by_one.clear()
    monkeypatch.setattr(near_duplicates, "_pass_order", lambda *_: "")  # passes never match
    assert fingerprints(smalls) == expected  # then each image is reduced on its own
    assert len(one_by_one) == len(pictures) - 8


def test_an_image_that_cannot_load_again_loses_only_its_own_fingerprint() -> None:
    rng = np.random.default_rng(3)
    frames = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), np.uint8)) for _ in range(2)]
    buf = io.BytesIO()
    frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:])
    with io.BytesIO(buf.getvalue()) as source:
        tiff = Image.open(source)
        tiff.load()
        assert tiff.n_frames == 2  # counting the frames seeks, so the pixels must be read again
    (none, no_thumb), (h, _) = fingerprints([reduced(tiff), reduced(frames[1])])
    assert none is None and no_thumb is None
    assert h == str(imagehash.phash(frames[1]))


def test_flat_images_have_no_fingerprint() -> None:
    flat, textured = Image.new("1", (1, 1)), _draw(0, np.random.default_rng(2), 32)
    (none, no_thumb), (h, thumb) = fingerprints([reduced(flat), reduced(textured)])
    assert none is None and no_thumb is None
    assert len(h) == 16 and len(thumb) == 48
    assert fingerprints([None, reduced(textured)]) == [(None, None), (h, thumb)]


def test_the_demo_plants_flips_and_near_copies_that_integrity_finds(tmp_path: Path) -> None:
    counts = (60, 40, 40, 20, 20)
    task = tmp_path / "pattern"
    write_pattern(task, counts, (8, 6, 6, 4, 4), 64)
    problems = pattern_label_problems(counts)
    assert len(problems.flips) == 3 + 2 + 2 + 1 + 1  # 5% of each class
    for original, (moved, true_class) in problems.flips.items():
        assert not (task / original).exists() and (task / moved).is_file()
        assert moved.split("/")[1] != true_class and moved.startswith("train/")
    df, _ = check_integrity(task, scan_task(task).inventory, IntegrityConfig(workers=1))
    group = df.set_index("relpath")["near_duplicate_group"]
    found = [group[c] == group[s] for c, (s, _) in problems.near_copies.items()]
    assert len(found) == 9 and sum(bool(f) for f in found) >= 8
    preview = near_duplicate_preview(df, task)
    assert preview["near_duplicate_groups"] >= 8
    assert preview["near_duplicate_thumbnails"].data.startswith(b"\x89PNG")
