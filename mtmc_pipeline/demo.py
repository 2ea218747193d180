"""The demo data set: three deterministic tasks that exercise every stage.

- ``digits``: the real handwritten digits shipped with scikit-learn (``load_digits``), written
  as 32x32 PNGs in the flat layout ``digits/<0..9>/``, so the pipeline must make the split.
- ``pattern``: procedurally drawn textures in ``train/``, ``val/`` and ``test/`` folders (so
  no test images are carved out of its small train split), with Chinese
  class names, deliberately imbalanced, plus planted problems the integrity stage must catch:
  a zero-byte file, a truncated JPEG, a text file named ``.jpg`` and an image copied into both
  train and val. The full-size pattern task also has label-quality problems
  (:func:`pattern_label_problems`): 5% of its training images filed under a wrong class (val
  stays clean) and near copies (re-encoded, resized) of training images in val and train.
- ``pattern_multi``: a multi-label task (``kind: multilabel``, labels in ``labels.csv``): each
  image puts two or three of the textures side by side, in warm or cool colours, and is
  labelled with every texture it shows plus the colour attribute 暖色 (warm) when warm. One
  planted ``labels.csv`` row names a file that does not exist.

Rewriting an existing demo leaves unchanged files untouched (same bytes, same mtime), so a
second ``make demo`` finds nothing stale.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

PATTERN_CLASSES = (
    "条纹",
    "格子",
    "波点",
    "渐变色",
    "纯色",
)  # stripes, checks, dots, gradient, solid
PATTERN_TRAIN = (200, 120, 80, 40, 20)
PATTERN_VAL = (40, 30, 20, 12, 8)  # and as many in test/
PLANTED = {
    "empty": "train/条纹/空文件.jpg",
    "truncated": "train/格子/truncated.jpg",
    "text": "train/波点/readme.jpg",
    "leak": "val/渐变色/copied from train.jpg",
}

DIGITS_TASK_YAML = """\
# Everything else is left to the automatic recipe (see "Recipes" in the README); what only a
# person knows goes here: a mirrored digit is another digit, or none.
train:
  hflip: false
"""


MULTI_CLASSES = ("条纹", "格子", "波点", "渐变色")  # the textures a multi-label image combines
WARM = "暖色"
MULTI_IMAGES = 400
MULTI_MISSING = "images/不存在.png"
MULTI_TASK_YAML = """\
# Only what a person knows: an image can show several classes at once.
kind: multilabel
"""


def _write_if_changed(path: Path, data: bytes) -> bool:
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return True


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_digits(task_dir: Path, per_class: int | None = None) -> int:
    """The scikit-learn digits as 32x32 grayscale PNGs; returns the number of files written."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts: dict[int, int] = {}
    written = 0
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        label = int(label)
        if per_class is not None and counts.get(label, 0) >= per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        small = Image.fromarray((pixels * (255.0 / 16.0)).astype(np.uint8), "L")
        img = small.resize((32, 32), Image.BICUBIC)
        written += _write_if_changed(task_dir / str(label) / f"{i:04d}.png", _png(img))
    _write_if_changed(task_dir / "task.yaml", DIGITS_TASK_YAML.encode())
    return written


def _draw(kind: int, rng: np.random.Generator, size: int) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    while np.abs(c1 - c2).sum() < 150:  # keep the two colours distinguishable
        c2 = rng.uniform(0, 255, 3)
    angle = rng.uniform(0, np.pi)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    if kind == 0:  # stripes
        mask = np.sin(u * 2 * np.pi / rng.uniform(5, 14)) > 0
    elif kind == 1:  # checks
        period = rng.uniform(6, 16)
        mask = (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    elif kind == 2:  # polka dots
        period = rng.uniform(9, 16)
        radius = period * rng.uniform(0.2, 0.35)
        du = (u % period) - period / 2
        dv = (v % period) - period / 2
        mask = du**2 + dv**2 < radius**2
    elif kind == 3:  # gradient
        t = (u - u.min()) / (np.ptp(u) + 1e-9)
        img = c1[None, None] * (1 - t[..., None]) + c2[None, None] * t[..., None]
        mask = None
    else:  # solid
        img = np.broadcast_to(c1, (size, size, 3)).astype(np.float64)
        mask = None
    if mask is not None:
        img = np.where(mask[..., None], c1[None, None], c2[None, None])
    img = img + rng.normal(0, rng.uniform(2, 14), img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def write_pattern(
    task_dir: Path,
    train_counts: tuple[int, ...] = PATTERN_TRAIN,
    val_counts: tuple[int, ...] = PATTERN_VAL,
    size: int = 64,
    seed: int = 0,
    label_problems: bool = True,
    test_counts: tuple[int, ...] | None = None,
) -> int:
    """The texture task with its planted problems; returns the number of files written.
    ``test_counts`` defaults to ``val_counts``."""
    rng = np.random.default_rng(seed)
    written = 0
    first_image: dict[str, bytes] = {}
    flips = pattern_label_problems(train_counts, seed).flips if label_problems else {}
    splits = (("train", train_counts), ("val", val_counts), ("test", test_counts or val_counts))
    for split, counts in splits:
        for kind, (name, n) in enumerate(zip(PATTERN_CLASSES, counts, strict=True)):
            for j in range(n):
                img = _draw(kind, rng, size)
                as_png = j % 5 == 4
                data = _png(img) if as_png else _jpeg(img)
                first_image.setdefault(f"{split}/{name}", data)
                rel = f"{split}/{name}/{name}_{j:03d}.{'png' if as_png else 'jpg'}"
                path = task_dir / flips.get(rel, (rel, ""))[0]
                written += _write_if_changed(path, data)
    planted = {
        PLANTED["empty"]: b"",
        PLANTED["truncated"]: first_image["train/格子"][: len(first_image["train/格子"]) // 2],
        PLANTED["text"]: "这不是图片 / this is not an image\n".encode(),
        PLANTED["leak"]: first_image["train/渐变色"],
    }
    for rel, data in planted.items():
        written += _write_if_changed(task_dir / rel, data)
    if label_problems:
        written += write_near_copies(task_dir, pattern_label_problems(train_counts, seed))
    return written


@dataclass(frozen=True)
class LabelProblems:
    """The pattern task's planted label problems, for benchmarks to score against."""

    flips: dict[str, tuple[str, str]]  # relpath it would have -> (relpath it has, true class)
    near_copies: dict[str, tuple[str, str]]  # copy's relpath -> (source relpath, how)


def pattern_label_problems(
    train_counts: tuple[int, ...] = PATTERN_TRAIN, seed: int = 0
) -> LabelProblems:
    """5% of each class's training images under another class (drawn in proportion to the
    classes' sizes, so that no small class is swamped), and one near copy for every 20
    training images: half in val (leaks), half in train; re-encoded at JPEG quality 85 or
    resized by 1.25 or 0.75."""
    rng = np.random.default_rng(seed + 17)
    flips: dict[str, tuple[str, str]] = {}
    copies: dict[str, tuple[str, str]] = {}
    hows = ("jpeg85", "resize1.25", "resize0.75")
    for kind, (name, n) in enumerate(zip(PATTERN_CLASSES, train_counts, strict=True)):
        names = [f"{name}_{j:03d}.{'png' if j % 5 == 4 else 'jpg'}" for j in range(n)]
        chosen = rng.permutation(n)
        for j in chosen[: round(0.05 * n)]:
            share = np.array([0 if k == kind else c for k, c in enumerate(train_counts)])
            other = PATTERN_CLASSES[rng.choice(len(share), p=share / share.sum())]
            new = f"{other}_{900 + len(flips)}{Path(names[j]).suffix}"
            flips[f"train/{name}/{names[j]}"] = (f"train/{other}/{new}", name)
        for k, j in enumerate(chosen[round(0.05 * n) :][: n // 20]):
            split, how = ("val", "train")[k % 2], hows[k % 3]
            ext = "jpg" if how == "jpeg85" else "png"
            copies[f"{split}/{name}/{name}_{800 + k}.{ext}"] = (f"train/{name}/{names[j]}", how)
    return LabelProblems(flips, copies)


def write_near_copies(task_dir: Path, problems: LabelProblems) -> int:
    """Write each planted near copy from its (already written) source image."""
    written = 0
    for rel, (source, how) in problems.near_copies.items():
        with Image.open(task_dir / source) as img:
            img = img.convert("RGB")
        if how == "jpeg85":
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=85)
            data = buf.getvalue()
        else:
            scale = float(how.removeprefix("resize"))
            data = _png(img.resize((round(img.width * scale), round(img.height * scale))))
        written += _write_if_changed(task_dir / rel, data)
    return written


def _texture(kind: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """A size x size pattern in [0, 1], fine enough that a third of a 32 px image shows it."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    angle = rng.uniform(0, np.pi)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    if kind == 0:  # stripes
        return (np.sin(u * 2 * np.pi / rng.uniform(3.5, 6)) > 0).astype(np.float64)
    if kind == 1:  # checks
        period = rng.uniform(3, 5)
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float64)
    if kind == 2:  # dots
        period = rng.uniform(6, 8)
        du, dv = (u % period) - period / 2, (v % period) - period / 2
        return (du**2 + dv**2 < (period * 0.3) ** 2).astype(np.float64)
    return (u - u.min()) / (np.ptp(u) + 1e-9)  # gradient


def _palette(warm: bool, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Dark and light colour of a warm (red-orange) or cool (blue-green) image."""
    a, b = rng.uniform(0, 1, 2)
    if warm:
        return np.array([150 + 80 * a, 30, 20]), np.array([255, 140 + 80 * b, 40])
    return np.array([20, 40 + 60 * a, 120]), np.array([60, 200, 160 + 80 * b])


def write_multilabel(task_dir: Path, n: int = MULTI_IMAGES, size: int = 32, seed: int = 0) -> int:
    """The multi-label texture task and its labels.csv; returns the number of files written."""
    rng = np.random.default_rng(seed)
    written = 0
    lines = ["relpath,labels"]
    for i in range(n):
        kinds = sorted(rng.choice(len(MULTI_CLASSES), size=rng.integers(2, 4), replace=False))
        warm = bool(rng.random() < 0.4)
        bands = np.array_split(np.arange(size), len(kinds))
        order = rng.permutation(kinds)
        dark, light = _palette(warm, rng)
        t = np.zeros((size, size))
        for kind, band in zip(order, bands, strict=True):  # horizontal bands
            t[band] = _texture(int(kind), rng, size)[band]
        canvas = dark * (1 - t[..., None]) + light * t[..., None]
        canvas += rng.normal(0, 4, canvas.shape)
        img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
        rel = f"images/{i:04d}.png"
        written += _write_if_changed(task_dir / rel, _png(img))
        labels = [MULTI_CLASSES[k] for k in kinds] + ([WARM] if warm else [])
        lines.append(f"{rel},{';'.join(labels)}")
    lines.append(f"{MULTI_MISSING},{MULTI_CLASSES[0]}")
    written += _write_if_changed(task_dir / "labels.csv", ("\n".join(lines) + "\n").encode())
    _write_if_changed(task_dir / "task.yaml", MULTI_TASK_YAML.encode())
    return written


def write_demo(root: Path, small: bool = False) -> dict[str, int]:
    """Write the demo tasks under ``root``; ``small`` makes a tiny copy of the single-label
    ones for tests (the multi-label task is tested on its own, with :func:`write_multilabel`)."""
    if small:
        return {
            "digits": write_digits(root / "digits", per_class=12),
            "pattern": write_pattern(
                root / "pattern", (24, 16, 12, 10, 8), (6, 5, 5, 4, 4), 32, label_problems=False
            ),
        }
    return {
        "digits": write_digits(root / "digits"),
        "pattern": write_pattern(root / "pattern"),
        "pattern_multi": write_multilabel(root / "pattern_multi"),
    }
