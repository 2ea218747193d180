"""Integrity findings with stable codes, cross-file checks, and incremental reruns."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import stat
import struct
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFile

from mtmc_pipeline.config import IntegrityConfig
from mtmc_pipeline.data import integrity
from mtmc_pipeline.data.integrity import check_integrity, task_findings
from mtmc_pipeline.data.layout import scan_task
from tests.images import image_bytes, write


def _check(task: Path, **cfg) -> pd.DataFrame:
    df, _ = check_integrity(task, scan_task(task).inventory, IntegrityConfig(workers=1, **cfg))
    return df.set_index("relpath")


def test_per_file_issue_codes(tmp_path: Path) -> None:
    task = tmp_path / "t"
    jpg = image_bytes("JPEG", seed=1)
    write(task / "a" / "ok.png", image_bytes("PNG", seed=2))
    write(task / "a" / "empty.jpg", b"")
    write(task / "a" / "truncated.jpg", jpg[: len(jpg) // 2])
    write(task / "a" / "text.jpg", b"hello, not an image")
    write(task / "a" / "png_named.jpg", image_bytes("PNG", seed=3))
    write(task / "a" / "cmyk.jpg", image_bytes("JPEG", seed=4, mode="CMYK"))
    write(task / "a" / "tiny.png", image_bytes("PNG", size=(4, 4), seed=5))
    write(task / "a" / "big.png", image_bytes("PNG", size=(64, 64), seed=6))
    df = _check(task, max_pixels=64 * 64 - 1)
    issues = df["issues"].map(list).to_dict()
    assert issues["a/ok.png"] == []
    assert issues["a/empty.jpg"] == ["empty_file"]
    assert issues["a/truncated.jpg"] == ["truncated"]
    assert issues["a/text.jpg"] == ["not_an_image"]
    assert issues["a/png_named.jpg"] == ["extension_mismatch"]
    assert issues["a/cmyk.jpg"] == ["cmyk"]
    assert issues["a/tiny.png"] == ["too_small"]
    assert issues["a/big.png"] == ["decompression_bomb"]
    assert df.loc["a/ok.png", "status"] == "ok"
    assert df.loc["a/png_named.jpg", "status"] == "warn"
    assert df.loc["a/truncated.jpg", "status"] == "error"
    assert df.loc["a/ok.png", "width"] == 16 and df.loc["a/ok.png", "format"] == "PNG"


def test_cross_file_findings(tmp_path: Path) -> None:
    task = tmp_path / "t"
    same = image_bytes("PNG", seed=10)
    write(task / "train" / "a" / "1.png", same)
    write(task / "train" / "a" / "1b.png", same)  # duplicate within the class
    write(task / "val" / "a" / "1.png", same)  # same bytes in val: leak
    other = image_bytes("PNG", seed=11)
    write(task / "train" / "a" / "2.png", other)
    write(task / "train" / "b" / "2.png", other)  # same bytes under two classes
    df = _check(task)
    # the first copy in (split, path) order is kept as is, later copies are flagged
    assert list(df.loc["train/a/1.png", "issues"]) == []
    assert list(df.loc["train/a/1b.png", "issues"]) == ["exact_duplicate"]
    assert list(df.loc["val/a/1.png", "issues"]) == ["cross_split_leak"]
    assert df.loc["val/a/1.png", "status"] == "error"
    assert list(df.loc["train/a/2.png", "issues"]) == ["conflicting_labels"]
    assert list(df.loc["train/b/2.png", "issues"]) == ["conflicting_labels"]


def test_severity_overrides(tmp_path: Path) -> None:
    task = tmp_path / "t"
    write(task / "a" / "png_named.jpg", image_bytes("PNG"))
    df = _check(task, severity={"extension_mismatch": "error"})
    assert df.loc["a/png_named.jpg", "status"] == "error"
    df = _check(task, severity={"extension_mismatch": "ignore"})
    assert df.loc["a/png_named.jpg", "status"] == "ok"


def test_task_findings(tmp_path: Path) -> None:
    task = tmp_path / "t"
    write(task / "train" / "a" / "1.png", image_bytes(seed=1))
    write(task / "train" / "broken" / "1.jpg", b"")
    write(task / "val" / "only_val" / "1.png", image_bytes(seed=2))
    df = _check(task).reset_index()
    codes = {(f["code"], f["class_name"]) for f in task_findings(df)}
    assert codes == {
        ("class_without_usable_image", "broken"),
        ("class_not_in_train", "only_val"),
    }


def test_incremental_rerun_decodes_only_new_files(tmp_path: Path) -> None:
    task = tmp_path / "t"
    for i in range(20):
        write(task / "a" / f"{i}.png", image_bytes(seed=i))
    cfg = IntegrityConfig(workers=1)
    first, summary = check_integrity(task, scan_task(task).inventory, cfg)
    assert summary["decoded"] == 20
    write(task / "a" / "new.png", image_bytes(seed=99))
    write(task / "a" / "3.png", image_bytes(seed=100))  # changed content
    second, summary = check_integrity(task, scan_task(task).inventory, cfg, first)
    assert summary["decoded"] == 2 and summary["reused"] == 19
    assert (second["status"] == "ok").all()
    assert (
        second.set_index("relpath").loc["a/3.png", "content_hash"]
        != first.set_index("relpath").loc["a/3.png", "content_hash"]
    )


def test_parallel_and_serial_agree(tmp_path: Path) -> None:
    task = tmp_path / "t"
    for i in range(80):
        write(task / "a" / f"{i}.png", image_bytes(seed=i))
    write(task / "a" / "bad.jpg", b"garbage")
    inv = scan_task(task).inventory
    serial, _ = check_integrity(task, inv, IntegrityConfig(workers=1))
    parallel, _ = check_integrity(task, inv, IntegrityConfig(workers=2))
    cols = ["relpath", "status", "content_hash", "width", "height"]
    pd.testing.assert_frame_equal(serial[cols], parallel[cols])


def _png(width: int, height: int, bit_depth: int = 8, color_type: int = 2) -> bytes:
    """A PNG written chunk by chunk, so its header can claim any size and bit depth."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    channels = {0: 1, 2: 3, 6: 4}[color_type]
    row = b"\x00" + bytes(width * channels * bit_depth // 8) if width * height < 10**6 else b""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * height if row else b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_unusual_but_usable_images_are_warned_about(tmp_path: Path) -> None:
    task = tmp_path / "t"
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    write(task / "a" / "rotated.jpg", _save(rgb, "JPEG", exif=exif))
    write(task / "a" / "rotated.png", _save(rgb, "PNG", exif=exif))
    write(task / "a" / "rotated.webp", _save(rgb, "WEBP", exif=exif))
    write(task / "a" / "rotated.tif", _save(rgb, "TIFF", exif=exif))
    upright = Image.Exif()
    upright[0x0112] = 1
    write(task / "a" / "upright.jpg", _save(rgb, "JPEG", exif=upright))
    gray16 = Image.fromarray(np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 200)
    write(task / "a" / "gray16.png", _save(gray16, "PNG"))
    write(task / "a" / "rgb16.png", _png(16, 16, bit_depth=16, color_type=2))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    write(task / "a" / "palette_alpha.png", _save(palette, "PNG", transparency=0))
    write(task / "a" / "palette.png", _save(palette, "PNG"))
    frames = [rgb, rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    write(
        task / "a" / "animated.gif",
        _save(frames[0], "GIF", save_all=True, append_images=frames[1:]),
    )
    write(task / "a" / "still.gif", _save(rgb, "GIF"))
    df = _check(task, near_duplicates=False)  # one picture in many formats: all near copies
    issues = df["issues"].map(list).to_dict()
    assert issues == {
        "a/rotated.jpg": ["exif_rotated"],
        "a/rotated.png": ["exif_rotated"],
        "a/rotated.webp": ["exif_rotated"],
        "a/rotated.tif": ["exif_rotated"],
        "a/upright.jpg": [],
        "a/gray16.png": ["high_bit_depth"],
        "a/rgb16.png": ["high_bit_depth"],
        "a/palette_alpha.png": ["palette_alpha"],
        "a/palette.png": [],
        "a/animated.gif": ["animated"],
        "a/still.gif": [],
    }
    assert set(df.loc[list(issues), "status"]) == {"ok", "warn"}
    assert df.loc["a/rotated.jpg", "width"] == 32  # stored size, before any rotation
    assert df.loc["a/gray16.png", "mode"] == "I;16"


def test_a_huge_header_is_caught_without_decoding_pixels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = tmp_path / "t"
    write(task / "a" / "bomb.png", _png(100_000, 100_000))
    write(task / "a" / "fine.png", image_bytes("PNG"))
    decoded: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile):
        decoded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    df = _check(task)  # default limits
    assert list(df.loc["a/bomb.png", "issues"]) == ["decompression_bomb"]
    assert (df.loc["a/bomb.png", "width"], df.loc["a/bomb.png", "height"]) == (100_000, 100_000)
    assert "max_pixels=89478485" in df.loc["a/bomb.png", "detail"]
    assert set(decoded) == {(16, 16)}  # only the fine image reached the pixel decoder
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's own guard is restored afterwards


def test_mismatched_extensions_are_decoded_by_their_real_format(tmp_path: Path) -> None:
    task = tmp_path / "t"
    write(task / "a" / "jpeg_named.png", image_bytes("JPEG"))
    write(task / "a" / "gif_named.webp", image_bytes("GIF"))
    write(task / "a" / "riff_not_webp.webp", b"RIFF\x00\x00\x00\x00WAVEfmt " + bytes(64))
    df = _check(task)
    assert list(df.loc["a/jpeg_named.png", "issues"]) == ["extension_mismatch"]
    assert df.loc["a/jpeg_named.png", "format"] == "JPEG"
    assert list(df.loc["a/gif_named.webp", "issues"]) == ["extension_mismatch"]
    assert list(df.loc["a/riff_not_webp.webp", "issues"]) == ["not_an_image"]


@contextlib.contextmanager
def _unprivileged() -> Iterator[None]:
    """Run the block as an ordinary user: root reads every file whatever its permissions."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture
def world_readable_dir() -> Iterator[Path]:
    """A folder an unprivileged user can traverse (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="mtmc-perm-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_a_file_without_read_permission_is_unreadable(world_readable_dir: Path) -> None:
    task = world_readable_dir / "t"
    write(task / "a" / "ok.png", image_bytes(seed=1))
    secret = write(task / "a" / "secret.png", image_bytes(seed=2))
    secret.chmod(0)
    inventory = scan_task(task).inventory
    with _unprivileged():
        with pytest.raises(PermissionError):
            secret.read_bytes()  # the premise: this process really cannot read it
        df, _ = check_integrity(task, inventory, IntegrityConfig(workers=1))
    df = df.set_index("relpath")
    assert list(df.loc["a/secret.png", "issues"]) == ["unreadable"]
    assert df.loc["a/secret.png", "detail"].startswith("PermissionError")
    assert df.loc["a/secret.png", "status"] == "error"
    assert df.loc["a/ok.png", "status"] == "ok"
    assert stat.S_IMODE(secret.stat().st_mode) == 0  # permissions left as they were


def test_links_pipes_and_devices_are_unreadable_and_never_block(tmp_path: Path) -> None:
    task = tmp_path / "t"
    write(task / "a" / "ok.png", image_bytes())
    os.mkfifo(task / "a" / "pipe.jpg")  # reading a pipe with no writer would wait forever
    os.symlink("/dev/zero", task / "a" / "zeros.jpg")  # reading it would never end
    os.symlink(tmp_path / "gone.png", task / "a" / "broken.png")
    os.symlink(task / "a" / "loop2.png", task / "a" / "loop1.png")
    os.symlink(task / "a" / "loop1.png", task / "a" / "loop2.png")
    signal.alarm(20)  # fail loudly instead of hanging the suite
    try:
        df = _check(task)
    finally:
        signal.alarm(0)
    for rel in ("pipe.jpg", "zeros.jpg", "broken.png", "loop1.png", "loop2.png"):
        assert list(df.loc[f"a/{rel}", "issues"]) == ["unreadable"], rel
        assert df.loc[f"a/{rel}", "bytes"] == -1
    assert "not a regular file" in df.loc["a/pipe.jpg", "detail"]
    assert "FileNotFoundError" in df.loc["a/broken.png", "detail"]
    assert df.loc["a/ok.png", "status"] == "ok"


def test_a_dying_decoder_process_costs_one_file_not_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = tmp_path / "t"
    for i in range(70):
        write(task / "a" / f"{i:02d}.png", image_bytes(seed=i))
    write(task / "a" / "crash.png", image_bytes(seed=99))
    real = integrity.inspect_file

    def crashing(path: str, ext: str, limits: integrity.Limits):
        if path.endswith("crash.png"):
            os._exit(1)  # what a segfault in a decoder looks like to the pool
        return real(path, ext, limits)

    monkeypatch.setattr(integrity, "inspect_file", crashing)  # forked workers inherit it
    df, summary = check_integrity(task, scan_task(task).inventory, IntegrityConfig(workers=2))
    df = df.set_index("relpath")
    assert list(df.loc["a/crash.png", "issues"]) == ["unreadable"]
    assert df.loc["a/crash.png", "detail"] == "the decoder process died on this file"
    assert (df.drop(index="a/crash.png")["status"] == "ok").all()
    assert summary["decoded"] == 71


def test_empty_class_folder_and_class_only_in_val_are_task_findings(tmp_path: Path) -> None:
    task = tmp_path / "t"
    write(task / "train" / "a" / "1.png", image_bytes(seed=1))
    write(task / "train" / "b" / "1.png", image_bytes(seed=2))
    (task / "train" / "empty").mkdir()
    write(task / "train" / "notes" / "readme.txt", b"no images here")
    write(task / "val" / "a" / "2.png", image_bytes(seed=3))
    write(task / "val" / "only_val" / "1.png", image_bytes(seed=4))
    scan = scan_task(task)
    _, summary = check_integrity(
        task, scan.inventory, IntegrityConfig(workers=1), class_folders=scan.class_folders
    )
    assert summary["task_findings"] == [
        {
            "code": "class_without_usable_image",
            "class_name": "empty",
            "detail": "folder train/empty has no image files",
        },
        {
            "code": "class_without_usable_image",
            "class_name": "notes",
            "detail": "folder train/notes has no image files",
        },
        {
            "code": "class_not_in_train",
            "class_name": "only_val",
            "detail": "usable images only in val: it cannot be learned",
        },
    ]


def test_unknown_severity_codes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown issue codes \['trunkated'\]"):
        IntegrityConfig(severity={"trunkated": "warn"})


def test_large_files_are_hashed_in_blocks_with_the_same_findings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = tmp_path / "t"
    jpg = image_bytes("JPEG", size=(64, 64), seed=3)
    write(task / "a" / "ok.jpg", jpg)
    write(task / "a" / "cut.jpg", jpg[: len(jpg) // 2])
    write(task / "a" / "png_named.jpg", image_bytes("PNG", size=(64, 64)))
    in_memory = _check(task)
    monkeypatch.setattr(integrity, "_IN_MEMORY_LIMIT", 100)  # every file counts as large
    streamed = _check(task)
    cols = ["issues", "status", "width", "height", "format", "content_hash"]
    pd.testing.assert_frame_equal(in_memory[cols], streamed[cols])
    assert list(streamed.loc["a/cut.jpg", "issues"]) == ["truncated"]
