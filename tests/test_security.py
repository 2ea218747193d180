"""Load paths never unpickle: weights are safetensors, metadata JSON, user torch files are
read with weights_only=True. This test reads the source so a regression cannot slip in."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from mtmc_pipeline.training.models import PretrainedUnavailableError, read_weights

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*ROOT.glob("mtmc_pipeline/**/*.py"), *ROOT.glob("assets/**/*.py")])


def test_sources_exist() -> None:
    assert len(SOURCES) > 10


def test_no_pickle_module_or_pickle_loaders() -> None:
    pattern = re.compile(r"\bimport pickle\b|\bfrom pickle\b|\bread_pickle\b|\bjoblib\b|dill\b")
    offenders = [str(p) for p in SOURCES if pattern.search(p.read_text("utf-8"))]
    assert not offenders


def test_every_torch_load_is_weights_only() -> None:
    for path in SOURCES:
        text = path.read_text("utf-8")
        for match in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in match.group(1), f"{path}: {match.group(0)}"


def test_numpy_loads_never_allow_pickle() -> None:
    for path in SOURCES:
        assert "allow_pickle=True" not in path.read_text("utf-8"), path


def test_a_pickled_object_in_a_torch_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint that smuggles an arbitrary object is rejected, not executed."""

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": Payload()}, path)
    with pytest.raises(PretrainedUnavailableError, match=r"evil\.pt"):
        read_weights(path)
    assert "this must never run" not in capsys.readouterr().out
