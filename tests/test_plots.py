"""Plots with 24+ Chinese class names: drawn with a CJK font when one is installed, and as
indices with an ASCII legend when none is; never a missing glyph (an empty box)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from fontTools.fontBuilder import FontBuilder
from fontTools.pens.ttGlyphPen import TTGlyphPen
from matplotlib import font_manager
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.ft2font import FT2Font
from matplotlib.text import Text
from PIL import Image

from mtmc_pipeline.plots import class_labels, confusion_figure, font_for, thumbnails_png

NAMES = [
    "条纹",
    "格子",
    "波点",
    "渐变色",
    "纯色",
    "人物",
    "卡通",
    "花卉",
    "动物",
    "几何",
    "佩斯利",
    "迷彩",
    "字母",
    "风景",
    "建筑",
    "水果",
    "星星",
    "爱心",
    "千鸟格",
    "豹纹",
    "斑马纹",
    "扎染",
    "民族风",
    "抽象",
    "卡通 cartoon v2",  # mixed scripts: Latin from the default font, the rest from the CJK one
    "a long English class name that must be shortened",
]
TEST_FAMILY = "MTMC Test CJK"


def _square_glyph():
    pen = TTGlyphPen(None)
    pen.moveTo((100, 0))
    pen.lineTo((100, 700))
    pen.lineTo((900, 700))
    pen.lineTo((900, 0))
    pen.closePath()
    return pen.glyph()


def write_cjk_font(path: Path, chars: set[str]) -> Path:
    """A tiny TrueType font whose only glyphs are ``chars`` (no Latin letters at all)."""
    names = {ord(c): f"uni{ord(c):04X}" for c in sorted(chars)}
    order = [".notdef", *names.values()]
    fb = FontBuilder(1000, isTTF=True)
    fb.setupGlyphOrder(order)
    fb.setupCharacterMap(names)
    fb.setupGlyf({name: _square_glyph() for name in order})
    fb.setupHorizontalMetrics({name: (1000, 100) for name in order})
    fb.setupHorizontalHeader(ascent=880, descent=-120)
    fb.setupNameTable({"familyName": TEST_FAMILY, "styleName": "Regular"})
    fb.setupOS2(sTypoAscender=880, usWinAscent=880, usWinDescent=120)
    fb.setupPost()
    fb.save(str(path))
    return path


def _cjk(text: str) -> set[str]:
    return {c for c in text if ord(c) > 0x2E80}


@pytest.fixture
def only_dejavu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine with no CJK font: only the fonts matplotlib ships."""
    fm = font_manager.fontManager
    monkeypatch.setattr(fm, "ttflist", [e for e in fm.ttflist if e.name.startswith("DejaVu")])
    monkeypatch.setattr(font_manager, "findSystemFonts", lambda *a, **k: [])


@pytest.fixture
def cjk_font(only_dejavu: None, tmp_path: Path) -> Path:
    """Those fonts plus one CJK font that covers exactly the class names' Chinese characters."""
    path = write_cjk_font(tmp_path / "test-cjk.ttf", set().union(*map(_cjk, NAMES)))
    font_manager.fontManager.addfont(str(path))
    return path


def _charset(path: str) -> set[int]:
    return set(FT2Font(path).get_charmap())


def _undrawable(fig: Figure) -> list[str]:
    """Characters of any text in ``fig`` that none of its fonts (with fallbacks) can draw."""
    missing = []
    for text in fig.findobj(Text):
        prop: FontProperties = text.get_fontproperties()
        paths = font_manager.fontManager._find_fonts_by_props(prop)
        covered = set().union(*(_charset(str(p)) for p in paths))
        missing += [c for c in text.get_text() if not c.isspace() and ord(c) not in covered]
    return missing


def _render(fig: Figure) -> list[str]:
    """Save the figure; return matplotlib's missing-glyph warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.savefig(io.BytesIO(), format="png")
    return [str(w.message) for w in caught if "missing from font" in str(w.message)]


def _confusion(k: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    y = rng.integers(0, k, 20 * k)
    p = np.where(rng.random(20 * k) < 0.7, y, rng.integers(0, k, 20 * k))
    return np.bincount(y * k + p, minlength=k * k).reshape(k, k)


@pytest.mark.parametrize("normalize", [False, True])
def test_a_cjk_font_draws_the_names(cjk_font: Path, normalize: bool) -> None:
    assert len(NAMES) >= 24
    font = font_for(NAMES)
    assert font is not None and TEST_FAMILY in font.get_family()
    fig = confusion_figure(_confusion(len(NAMES)), NAMES, "Confusion matrix (val)", normalize)
    ax = fig.axes[0]
    ticks = [t.get_text() for t in ax.get_yticklabels()]
    assert ticks[:25] == NAMES[:25]
    assert ticks[25].endswith("..") and len(ticks[25]) <= 24  # long names are shortened
    assert [t.get_text() for t in ax.get_xticklabels()] == ticks
    assert _undrawable(fig) == []
    assert _render(fig) == []


def test_without_a_cjk_font_indices_and_an_ascii_legend_stand_in(only_dejavu: None) -> None:
    assert font_for(NAMES) is None
    labels, font, legend = class_labels(NAMES)
    assert labels == [str(i) for i in range(len(NAMES))] and font is None
    assert legend is not None and legend.isascii()
    assert "0: TiaoWen" in legend and "24: KaTong cartoon v2" in legend
    fig = confusion_figure(_confusion(len(NAMES)), NAMES, "Confusion matrix (val)", False)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == labels
    assert any(t.get_text() == legend for t in fig.texts)
    assert _undrawable(fig) == []
    assert _render(fig) == []


def test_the_no_tofu_checks_can_fail(only_dejavu: None) -> None:
    """Drawing Chinese with the default font is what the two tests above rule out."""
    fig = Figure()
    fig.add_subplot().set_title("条纹")
    assert _undrawable(fig) == ["条", "纹"]
    assert len(_render(fig)) == 2


def test_ascii_names_keep_the_default_font() -> None:
    labels, font, legend = class_labels(["cat", "dog"])
    assert labels == ["cat", "dog"] and legend is None
    assert font is not None and font.get_family() == FontProperties().get_family()


def test_thumbnail_sheets_show_every_image_enlarged_and_grey_for_a_lost_file(
    tmp_path: Path,
) -> None:
    colours = {"small.png": ((200, 30, 30), 16), "large.png": ((30, 30, 200), 300)}
    for name, (colour, side) in colours.items():
        Image.new("RGB", (side, side), colour).save(tmp_path / name)
    rows = [[(str(tmp_path / "small.png"), "train/a\nok"), (str(tmp_path / "gone.png"), "b")]]
    rows.append([(str(tmp_path / "large.png"), "val/b\nerror")])
    sheet = np.asarray(Image.open(io.BytesIO(thumbnails_png(rows, "groups"))).convert("RGB"))
    tile = {
        colour: int((sheet == colour).all(axis=2).sum())
        for colour in [(200, 30, 30), (30, 30, 200), (128, 128, 128)]
    }
    assert min(tile.values()) > 96 * 96  # each at least as large as the 96-pixel tile
    assert max(tile.values()) < 1.5 * min(tile.values())  # the 16-pixel one enlarged
