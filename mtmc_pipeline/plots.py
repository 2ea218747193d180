"""PNG plots that stay readable with many classes and with Chinese class names.

Class names are drawn with a font that has every glyph they need, when one is installed.
Without one, axes show class indices and the legend shows an ASCII transliteration
(``条纹`` -> ``TiaoWen``), so no plot ever shows empty boxes.
"""

from __future__ import annotations

import io
from functools import cache, lru_cache

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from anyascii import anyascii
from matplotlib import font_manager
from matplotlib.font_manager import FontProperties
from matplotlib.ft2font import FT2Font


@cache
def _font_charset(path: str) -> frozenset[int]:
    try:
        return frozenset(FT2Font(path).get_charmap())
    except (OSError, RuntimeError):
        return frozenset()


@lru_cache(maxsize=64)
def font_covering(text: str) -> FontProperties | None:
    """A font that can draw every character of ``text`` (None when none is installed)."""
    needed = {ord(ch) for ch in text if not ch.isspace()}
    default = font_manager.findfont(FontProperties())
    if needed <= _font_charset(default):
        return FontProperties(fname=default)
    for entry in font_manager.fontManager.ttflist:
        if needed <= _font_charset(entry.fname):
            return FontProperties(fname=entry.fname)
    return None


def class_labels(names: list[str]) -> tuple[list[str], FontProperties | None, str | None]:
    """Tick labels, the font to draw them, and a legend text when indices stand in for names."""
    font = font_covering("".join(names))
    if font is not None:
        return list(names), font, None
    legend = "\n".join(f"{i}: {anyascii(n)}" for i, n in enumerate(names))
    return [str(i) for i in range(len(names))], None, legend


def to_png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def confusion_png(cm: np.ndarray, names: list[str], title: str = "Confusion matrix") -> bytes:
    """Row-normalised colours with counts written in the cells (up to 30 classes)."""
    k = len(names)
    labels, font, legend = class_labels(names)
    side = min(4 + 0.45 * k, 22)
    fig, ax = plt.subplots(figsize=(side + (2.5 if legend else 0), side))
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), labels, rotation=90 if k > 8 else 0, fontproperties=font)
    ax.set_yticks(range(k), labels, fontproperties=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    color = "white" if norm[i, j] > 0.5 else "black"
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8, color=color)
    if legend:
        fig.text(0.99, 0.5, legend, va="center", ha="left", fontsize=8, family="monospace")
    return to_png(fig)


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


def reliability_png(before: pd.DataFrame, after: pd.DataFrame, temperature: float) -> bytes:
    """Accuracy against confidence per bin, before and after temperature scaling."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
    for table, label in ((before, "softmax"), (after, f"temperature {temperature:.2f}")):
        t = table.dropna()
        ax.plot(t["confidence"], t["accuracy"], "o-", label=label)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
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
    if legend:
        fig.text(0.99, 0.5, legend, va="center", ha="left", fontsize=8, family="monospace")
    return to_png(fig)
