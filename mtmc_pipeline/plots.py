"""PNG plots that stay readable with many classes and with Chinese class names.

Class names are drawn with the default font plus, for characters it lacks, installed fonts
that have them (matplotlib falls back glyph by glyph along a family list). When no installed
font can draw every name, axes show class indices and a legend maps each index to an ASCII
transliteration (``条纹`` -> ``TiaoWen``): a plot never shows empty boxes.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from functools import cache

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from anyascii import anyascii
from matplotlib import font_manager
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.ft2font import FT2Font

from mtmc_pipeline.evaluation.metrics import row_fractions

MAX_LABEL_CHARS = 24


@cache
def _font_charset(path: str) -> frozenset[int]:
    try:
        return frozenset(FT2Font(path).get_charmap())
    except (OSError, RuntimeError):
        return frozenset()


def _family_file(family: str) -> str | None:
    try:
        return font_manager.findfont(FontProperties(family=family), fallback_to_default=False)
    except ValueError:
        return None


@cache
def _register_new_system_fonts() -> None:
    """Add the fonts installed since matplotlib built its font cache (it never rescans), so
    a CJK font installed after matplotlib is used without deleting that cache."""
    known = {entry.fname for entry in font_manager.fontManager.ttflist}
    for path in font_manager.findSystemFonts():
        if path not in known:
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                font_manager.fontManager.addfont(path)


def _families_covering(missing: set[int]) -> list[str] | None:
    """Installed families that together have every character of ``missing`` (greedy)."""
    families = []
    for family in sorted({entry.name for entry in font_manager.fontManager.ttflist}):
        path = _family_file(family)
        covered = _font_charset(path) & missing if path else frozenset()
        if covered:
            families.append(family)
            missing = missing - covered
            if not missing:
                return families
    return None


def font_for(texts: Sequence[str]) -> FontProperties | None:
    """Font properties that draw every character of ``texts``, or None when no font can.

    The default family comes first, then installed families for the characters it lacks
    (matplotlib falls back glyph by glyph along the list).
    """
    default = FontProperties()
    missing = {ord(ch) for text in texts for ch in text if not ch.isspace()}
    missing -= _font_charset(font_manager.findfont(default))
    if not missing:
        return default
    extra = _families_covering(missing)
    if extra is None:
        _register_new_system_fonts()
        extra = _families_covering(missing)
    return None if extra is None else FontProperties(family=[*default.get_family(), *extra])


def _shorten(name: str) -> str:
    return name if len(name) <= MAX_LABEL_CHARS else name[: MAX_LABEL_CHARS - 2] + ".."


def class_labels(names: Sequence[str]) -> tuple[list[str], FontProperties | None, str | None]:
    """Tick labels, the font to draw them, and a legend text when indices stand in for names."""
    labels = [_shorten(str(n)) for n in names]
    font = font_for(labels)
    if font is not None:
        return labels, font, None
    legend = "\n".join(f"{i}: {anyascii(str(n)) or '?'}" for i, n in enumerate(names))
    return [str(i) for i in range(len(names))], None, legend


def to_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _add_legend(fig: Figure, legend: str | None) -> None:
    """The index -> name legend, just right of the rightmost axes (colour bar included)."""
    if legend:
        renderer = fig.canvas.get_renderer()
        right = max(ax.get_tightbbox(renderer).x1 for ax in fig.axes) / fig.bbox.width
        fig.text(right + 0.02, 0.5, legend, va="center", ha="left", fontsize=8, family="monospace")


def confusion_figure(cm: np.ndarray, names: Sequence[str], title: str, normalize: bool) -> Figure:
    """Colours are row fractions (recall per true class); cells show counts or percentages.

    The figure grows with the number of classes and the tick and cell text shrink, so 24+
    classes stay legible; cell values are left out beyond 40 classes, where colour must do.
    """
    k = len(names)
    labels, font, legend = class_labels(names)
    frac = row_fractions(cm)
    side = float(np.clip(2.5 + 0.42 * k, 4.5, 24))
    tick_size = 10 if k <= 12 else 8 if k <= 30 else 6
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    image = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="share of the true class")
    ax.set_xticks(range(k), labels, rotation=90 if k > 6 else 0, fontproperties=font)
    ax.set_yticks(range(k), labels, fontproperties=font)
    ax.tick_params(labelsize=tick_size)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if k <= 40:
        cell_size = 9 if k <= 12 else 7 if k <= 24 else 5
        for i, j in zip(*np.nonzero(cm), strict=True):
            text = f"{100 * frac[i, j]:.0f}" if normalize else str(cm[i, j])
            color = "white" if frac[i, j] > 0.5 else "black"
            ax.text(j, i, text, ha="center", va="center", fontsize=cell_size, color=color)
    _add_legend(fig, legend)
    return fig


def confusion_png(
    cm: np.ndarray, names: Sequence[str], title: str = "Confusion matrix", normalize: bool = False
) -> bytes:
    return to_png(confusion_figure(cm, names, title, normalize))


def history_png(history: pd.DataFrame) -> bytes:
    """Training and validation loss, and validation metrics, per epoch."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    epochs = history["epoch"] + 1
    a.plot(epochs, history["train_loss"], label="train loss")
    a.plot(epochs, history["val_loss"], label="val loss")
    a.set_xlabel("epoch")
    a.legend()
    for col in ("val_accuracy", "val_macro_f1"):
        b.plot(epochs, history[col], label=col)
    b.set_xlabel("epoch")
    b.set_ylim(0, 1.02)
    b.legend()
    return to_png(fig)


def reliability_png(
    before: pd.DataFrame,
    after: pd.DataFrame,
    temperature: float,
    names: tuple[str, str, str] | None = None,
) -> bytes:
    """Accuracy against top-1 confidence per bin, before and after temperature scaling, with
    the number of images per bin underneath (a gap in a near-empty bin means little).

    ``names`` (before, after, x axis) relabel the curves for other scores, e.g. the per-class
    sigmoid of a multi-label task before and after Platt scaling.
    """
    label_before, label_after, x_label = names or (
        "softmax",
        f"temperature {temperature:.2f}",
        "top-1 confidence",
    )
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(4.8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    top.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
    width = float((before["upper"] - before["lower"]).iloc[0])
    for offset, (table, label) in enumerate(((before, label_before), (after, label_after))):
        t = table.dropna()
        top.plot(t["confidence"], t["accuracy"], "o-", ms=4, label=label)
        bottom.bar(
            table["lower"] + width * (0.25 + 0.5 * offset),
            table["count"],
            width * 0.45,
            label=label,
        )
    top.set_ylabel("accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.legend(loc="upper left")
    top.set_title("Reliability (validation)")
    bottom.set_xlabel(x_label)
    bottom.set_ylabel("images")
    return to_png(fig)


def bar_png(values: pd.Series | pd.DataFrame, title: str) -> bytes:
    """Horizontal bars (class shares and the like), class names drawn as above.

    A DataFrame draws one bar per column for each row (e.g. shares before and after), with a
    legend naming the columns.
    """
    table = values.to_frame() if isinstance(values, pd.Series) else values
    labels, font, legend = class_labels([str(i) for i in table.index])
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(table) * table.shape[1] ** 0.5 + 1.2))
    height = 0.8 / table.shape[1]
    rows = np.arange(len(table))
    for j, column in enumerate(table.columns):
        ax.barh(rows + (j - (table.shape[1] - 1) / 2) * height, table[column], height, label=column)
    ax.set_yticks(rows, labels, fontproperties=font)
    ax.invert_yaxis()
    ax.set_title(title)
    if table.shape[1] > 1:
        ax.legend(loc="lower right")
    _add_legend(fig, legend)
    return to_png(fig)


def _tile(path: str, side: int) -> np.ndarray:
    """An image scaled to fit ``side`` x ``side`` (small ones enlarged, pixels kept sharp);
    grey when it cannot be read."""
    from PIL import Image  # only the thumbnail sheet reads images

    try:
        with Image.open(path) as img:
            img.thumbnail((side, side))
            scale = side / max(img.size)
            if scale > 1:
                size = (round(img.width * scale), round(img.height * scale))
                img = img.resize(size, Image.Resampling.NEAREST)
            return np.asarray(img.convert("RGB"))
    except Exception:  # a file that went away or broke since the stage read it
        return np.full((side, side, 3), 128, np.uint8)


def thumbnails_png(rows: Sequence[Sequence[tuple[str, str]]], title: str, side: int = 96) -> bytes:
    """A grid of image thumbnails: one row per group, each image captioned above it.

    ``rows`` holds (image path, caption) pairs; an image that cannot be read shows as grey.
    The grid is one picture in one axes: an axes per image cost a second to draw for 40.
    """
    width, height = max((len(r) for r in rows), default=1), max(len(rows), 1)
    captions = [caption for row in rows for _, caption in row]
    font = font_for(captions)
    props = font.copy() if font is not None else FontProperties()
    props.set_size(7)
    band = 4 + 10 * max((c.count("\n") + 1 for c in captions), default=1)  # caption space
    cell_w, cell_h = side + side // 12, band + side
    sheet = np.full((height * cell_h, width * cell_w, 3), 255, np.uint8)
    fig, ax = plt.subplots(figsize=(1.9 * width, 2.0 * height + 0.4))
    for r, row in enumerate(rows):
        for c, (path, caption) in enumerate(row):
            pixels = _tile(path, side)
            top, left = r * cell_h + band, c * cell_w
            y, x = top + (side - pixels.shape[0]) // 2, left + (side - pixels.shape[1]) // 2
            sheet[y : y + pixels.shape[0], x : x + pixels.shape[1]] = pixels
            shown = caption if font is not None else anyascii(caption)
            ax.text(left + side / 2, top - 2, shown, ha="center", va="bottom", fontproperties=props)
    ax.imshow(sheet, interpolation="nearest")
    ax.set_axis_off()
    fig.suptitle(title)
    return to_png(fig)
