"""A hostile data root: what users point the pipeline at when they did not curate the folder.

``write_hostile_root(root)`` builds several tasks and returns what the pipeline must make of
them, so tests can assert that every problem is recorded with its code, every trainable task
is trained, and every untrainable one fails with a message naming its folder.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

PLANTED = 10**6  # seed offset of planted files, far from the good images' seeds

FAST_TRAIN = """\
train:
  model: test_resnet
  img_size: 16
  pretrained: false
  epochs: 2
  batch_size: 16
"""


def _img(seed: int, size: tuple[int, int] = (24, 24), mode: str = "RGB") -> Image.Image:
    """A noisy single-colour image, different for every seed."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, 3)
    arr = np.clip(base + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_header_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + _png_chunk(b"IEND", b"")
    )


def exif_rotated_jpeg(seed: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    return _encode(_img(seed, (32, 20)), "JPEG", exif=exif.tobytes())


def animated_gif(seed: int) -> bytes:
    frames = [_img(seed + i).convert("P") for i in range(3)]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


def sixteen_bit_png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 65535, (24, 24), dtype=np.uint16)
    return _encode(Image.fromarray(arr), "PNG")


def palette_alpha_png(seed: int) -> bytes:
    return _encode(_img(seed).convert("P"), "PNG", transparency=0)


@dataclass
class Expectations:
    """What the pipeline must make of the hostile root."""

    # task -> {relpath: issue code}
    codes: dict[str, dict[str, str]] = field(default_factory=dict)
    trainable: list[str] = field(default_factory=list)
    # task -> words the failure message must contain
    untrainable: dict[str, list[str]] = field(default_factory=dict)
    # task -> relpaths the scan must list (hostile names included)
    listed: dict[str, list[str]] = field(default_factory=dict)
    # task -> relpaths that must be decoded as good images (status ok, no issue code)
    clean: dict[str, list[str]] = field(default_factory=dict)
    # task -> {task-level finding code: class name}, from the integrity file's metadata
    findings: dict[str, dict[str, str]] = field(default_factory=dict)
    # task -> {walk problem: relpath}, from the inventory file's metadata
    walk_problems: dict[str, dict[str, str]] = field(default_factory=dict)
    # task -> {skip reason: count}, from the inventory file's metadata
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)
    # (task, check) -> words the failed check's description must contain
    checks_failed: dict[tuple[str, str], list[str]] = field(default_factory=dict)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _good_images(task: Path, split: str, cls: str, n: int, seed: int) -> list[str]:
    """``n`` valid PNGs; seeds 0-999 give disjoint images (planted files use 10**6 and up)."""
    rels = []
    for i in range(n):
        rel = f"{split}/{cls}/{cls}_{i:03d}.png" if split else f"{cls}/{cls}_{i:03d}.png"
        _write(task / rel, _encode(_img(seed * 1000 + i), "PNG"))
        rels.append(rel)
    return rels


def write_hostile_root(root: Path) -> Expectations:
    exp = Expectations()

    # ---- "mixed": trainable, split layout, every kind of bad file -------------------------
    t = root / "mixed"
    for s, (split, n) in enumerate((("train", 40), ("val", 10))):
        for k, cls in enumerate(("条纹", "格子", "波点")):
            _good_images(t, split, cls, n, seed=100 * s + k)
    (t / "task.yaml").write_text(FAST_TRAIN + "integrity:\n  max_error_fraction: 0.2\n", "utf-8")
    jpeg = _encode(_img(PLANTED + 1), "JPEG")
    png = _encode(_img(PLANTED + 2), "PNG")
    bad = {
        "train/条纹/zero bytes.jpg": (b"", "empty_file"),
        "train/条纹/truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "train/条纹/truncated.png": (png[: len(png) // 2], "truncated"),
        "train/格子/random.jpg": (np.random.default_rng(3).bytes(600), "not_an_image"),
        "train/格子/notes.png": ("just some text, 不是图片\n".encode(), "not_an_image"),
        "train/格子/png named.jpg": (_encode(_img(PLANTED + 4), "PNG"), "extension_mismatch"),
        "train/波点/cmyk.jpg": (_encode(_img(PLANTED + 5, mode="CMYK"), "JPEG"), "cmyk"),
        "train/波点/sixteen.png": (sixteen_bit_png(PLANTED + 6), "high_bit_depth"),
        "train/波点/palette alpha.png": (palette_alpha_png(PLANTED + 7), "palette_alpha"),
        "train/波点/animated.gif": (animated_gif(PLANTED + 8), "animated"),
        "train/波点/rotated.jpg": (exif_rotated_jpeg(PLANTED + 9), "exif_rotated"),
        "train/条纹/huge header.png": (huge_header_png(), "decompression_bomb"),
        "train/条纹/one pixel.png": (_encode(_img(PLANTED + 10, (1, 1)), "PNG"), "too_small"),
        "train/条纹/深/更深/嵌套 😀.png": (_encode(_img(PLANTED + 11), "PNG"), ""),
    }
    for rel, (data, _) in bad.items():
        _write(t / rel, data)
    conflict = _encode(_img(PLANTED + 12), "PNG")
    _write(t / "train/条纹/same bytes.png", conflict)
    _write(t / "train/格子/same bytes.png", conflict)
    leak = _encode(_img(PLANTED + 13), "PNG")
    _write(t / "train/波点/leak.png", leak)
    _write(t / "val/波点/leak copy.png", leak)
    os.symlink(t / "no-such-file.png", t / "train/条纹/broken link.png")
    os.symlink(t / "train/格子", t / "train/格子/loop")
    _write(t / "train/条纹/.hidden.png", png)
    _write(t / "train/格子/.DS_Store", b"\x00\x00\x00\x01Bud1")
    _write(t / "train/格子/Thumbs.db", b"\xd0\xcf\x11\xe0")
    (t / "train/空类").mkdir(parents=True)  # an empty class folder
    os.mkfifo(t / "train/波点/pipe.jpg")  # reading it would block forever
    no_read = "train/波点/no permission.png"
    _write(t / no_read, _encode(_img(PLANTED + 14), "PNG"))
    (t / no_read).chmod(0)  # root reads it anyway: then it must be decoded like any other
    exp.codes["mixed"] = {rel: code for rel, (_, code) in bad.items() if code}
    exp.codes["mixed"].update(
        {
            "train/条纹/same bytes.png": "conflicting_labels",
            "train/格子/same bytes.png": "conflicting_labels",
            "val/波点/leak copy.png": "cross_split_leak",
            "train/条纹/broken link.png": "unreadable",
            "train/波点/pipe.jpg": "unreadable",
        }
    )
    nested = "train/条纹/深/更深/嵌套 😀.png"
    exp.clean["mixed"] = [nested]
    if os.geteuid() == 0:
        exp.clean["mixed"].append(no_read)
    else:
        exp.codes["mixed"][no_read] = "unreadable"
    exp.listed["mixed"] = [nested, "train/条纹/zero bytes.jpg", no_read]
    exp.findings["mixed"] = {"class_without_usable_image": "空类"}
    exp.walk_problems["mixed"] = {"symlink_loop": "train/格子/loop"}
    exp.skipped["mixed"] = {"hidden": 2, "os_litter": 1}
    exp.trainable.append("mixed")

    # ---- "val_only": a class that exists only in val; still trainable --------------------
    t = root / "val_only"
    for cls in ("a", "b"):
        _good_images(t, "train", cls, 12, seed=ord(cls))
        _good_images(t, "val", cls, 4, seed=ord(cls) + 50)
    _good_images(t, "val", "only_in_val", 4, seed=99)
    (t / "task.yaml").write_text(FAST_TRAIN, "utf-8")
    exp.findings["val_only"] = {"class_not_in_train": "only_in_val"}
    exp.trainable.append("val_only")

    # ---- untrainable tasks ----------------------------------------------------------------
    t = root / "one_class"
    _good_images(t, "", "lonely", 10, seed=7)
    exp.untrainable["one_class"] = ["one_class", "at least two classes"]

    t = root / "no_images"
    _write(t / "cats" / "readme.txt", b"the photos are elsewhere")
    (t / "dogs").mkdir(parents=True)
    exp.untrainable["no_images"] = ["no_images", "no image files"]

    t = root / "mostly_broken"
    _good_images(t, "", "a", 5, seed=20)
    _good_images(t, "", "b", 5, seed=21)
    for i in range(5):
        _write(t / "a" / f"broken_{i}.jpg", b"")
    exp.untrainable["mostly_broken"] = ["error_fraction"]
    exp.checks_failed[("mostly_broken", "error_fraction")] = ["mostly_broken", "5 of 15 files"]
    return exp
