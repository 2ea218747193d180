"""Settings: defaults < task.yaml < run config, and errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtmc_pipeline.config import ConfigError, TaskConfig, load_task_config


def test_precedence(tmp_path: Path) -> None:
    (tmp_path / "task.yaml").write_text("train:\n  epochs: 7\n  lr: 0.1\n", "utf-8")
    cfg = load_task_config(tmp_path, {"train": {"lr": 0.5}})
    assert cfg.train.epochs == 7  # from task.yaml
    assert cfg.train.lr == 0.5  # run config wins
    assert cfg.train.batch_size == TaskConfig().train.batch_size  # default


def test_unknown_key_in_task_yaml_names_file_and_key(tmp_path: Path) -> None:
    (tmp_path / "task.yaml").write_text("train:\n  epoch: 7\n", "utf-8")
    with pytest.raises(ConfigError, match=r"task\.yaml: train\.epoch = 7"):
        load_task_config(tmp_path)


def test_bad_run_config_value_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"run config .*train\.epochs = -1"):
        load_task_config(tmp_path, {"train": {"epochs": -1}})
    with pytest.raises(ConfigError, match=r"train\.loss = 'hinge'"):
        load_task_config(tmp_path, {"train": {"loss": "hinge"}})


def test_split_fractions_must_leave_training_data(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="val_fraction \\+ test_fraction"):
        load_task_config(tmp_path, {"split": {"val_fraction": 0.6, "test_fraction": 0.4}})


def test_broken_yaml_is_reported(tmp_path: Path) -> None:
    (tmp_path / "task.yaml").write_text("train: [unclosed\n", "utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_task_config(tmp_path)


def test_calibration_levels_default_and_validation(tmp_path: Path) -> None:
    levels = TaskConfig().calibration.levels
    assert levels[0] == 0.10 and levels[-1] == 0.98 and len(levels) == 45
    with pytest.raises(ConfigError, match="levels"):
        load_task_config(tmp_path, {"calibration": {"levels": [0.5, 1.5]}})


def test_configuration_reference_is_current() -> None:
    """docs/configuration.md is generated; regenerate it with `mtmc config-reference`."""
    from mtmc_pipeline.config import reference_markdown

    path = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert path.read_text("utf-8") == reference_markdown()
