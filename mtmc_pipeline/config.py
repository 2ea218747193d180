"""Typed configuration of every stage, and how the three sources of settings combine.

Precedence: built-in defaults < ``<task>/task.yaml`` < run config (Dagster launchpad or
``--config``). Each stage reads one section; unknown keys and bad values fail with a message
that names the file, the key and the value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

TASK_FILE = "task.yaml"


class ConfigError(ValueError):
    """A setting is unknown or has a value the pipeline cannot use."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ScanConfig(_Section):
    extensions: list[str] = Field(
        default=[".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"],
        description="Extensions that count as images (any case); other files are skipped.",
    )

    @field_validator("extensions")
    @classmethod
    def _dotted_lower_case(cls, extensions: list[str]) -> list[str]:
        if not extensions:
            raise ValueError("needs at least one extension, e.g. ['.jpg', '.png']")
        return sorted({e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions})


class IntegrityConfig(_Section):
    min_side: int = Field(
        8, ge=1, description="Images with a side shorter than this are too_small."
    )
    max_pixels: int = Field(
        89_478_485, ge=1, description="Width x height above this is a decompression_bomb."
    )
    max_error_fraction: float = Field(
        0.05, ge=0, le=1, description="Blocking check: fraction of files with errors allowed."
    )
    workers: int = Field(0, ge=0, description="Decode processes; 0 means one per CPU core.")
    severity: dict[str, Literal["error", "warn", "ignore"]] = Field(
        default_factory=dict,
        description="Override the severity of an issue code: error (excluded from training), "
        "warn (kept) or ignore (not reported).",
    )

    @field_validator("severity")
    @classmethod
    def _known_issue_codes(cls, severity: dict[str, str]) -> dict[str, str]:
        from mtmc_pipeline.data.integrity import ISSUES  # the codes live with the checks

        unknown = sorted(set(severity) - set(ISSUES))
        if unknown:
            raise ValueError(f"unknown issue codes {unknown}; known: {', '.join(ISSUES)}")
        return severity


class SplitConfig(_Section):
    val_fraction: float = Field(0.2, gt=0, lt=1, description="Share of each class held out.")
    test_fraction: float = Field(0.0, ge=0, lt=1, description="Share held out as test.")
    folds: int = Field(0, ge=0, description="If >= 2, assign a k-fold column on train.")
    seed: int = Field(0, description="Salt of the hash that assigns files to splits.")

    @model_validator(mode="after")
    def _fractions_leave_train(self) -> SplitConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1")
        return self


class SamplingConfig(_Section):
    strategy: Literal["none", "inverse", "sqrt_inverse", "effective_number", "repeat_factor"] = (
        Field("inverse", description="How each class is weighted when sampling train images.")
    )
    beta: float = Field(0.999, ge=0, lt=1, description="effective_number: Cui et al. beta.")
    repeat_threshold: float = Field(
        0.1, gt=0, le=1, description="repeat_factor: classes rarer than this share are repeated."
    )


class TrainConfig(_Section):
    model: str = Field("mobilenetv3_large_100", description="Any timm model name.")
    img_size: int = Field(224, ge=8, le=1024, description="Square training resolution.")
    pretrained: bool = Field(True, description="Start from timm's pretrained weights (hub).")
    pretrained_path: str | None = Field(
        None, description="Local .safetensors/.pth weights to start from (no network)."
    )
    drop_rate: float = Field(0.0, ge=0, lt=1, description="Dropout before the classifier.")
    epochs: int = Field(30, ge=1, description="Maximum passes over the training images.")
    batch_size: int = Field(
        64, ge=2, description="Images per optimisation step (batch norm needs at least 2)."
    )
    optimizer: Literal["adamw", "sgd", "adam", "radam"] = Field(
        "adamw", description="adamw, sgd (with momentum; see nesterov), adam or radam."
    )
    lr: float = Field(1e-3, gt=0, description="Peak learning rate, reached after warmup.")
    weight_decay: float = Field(0.05, ge=0, description="Not applied to norm layers and biases.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    nesterov: bool = Field(
        True, description="SGD: Nesterov momentum (timm's sgd); false: classical (timm's momentum)."
    )
    scheduler: Literal["cosine", "step", "multistep", "plateau", "warm_restarts"] = Field(
        "cosine",
        description="Learning-rate schedule after warmup: cosine decay, step, multistep, "
        "plateau (decay when the monitored metric stalls) or warm_restarts (cosine cycles).",
    )
    warmup_epochs: float = Field(1.0, ge=0, description="Linear warmup from lr / 100.")
    min_lr_ratio: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Floor of cosine, warm_restarts and plateau, as a share of lr.",
    )
    decay_epochs: float = Field(10.0, gt=0, description="step: epochs between decays.")
    decay_milestones: list[int] = Field(
        default=[15, 25], description="multistep: epochs at which the lr decays."
    )
    decay_rate: float = Field(
        0.1, gt=0, lt=1, description="step, multistep, plateau: lr factor at each decay."
    )
    plateau_patience: int = Field(
        3, ge=0, description="plateau: epochs without gain in the monitored metric first."
    )
    restart_epochs: int = Field(10, ge=1, description="warm_restarts: length of the first cycle.")
    restart_mult: float = Field(
        1.0, ge=1, description="warm_restarts: each cycle is this much longer than the last."
    )
    restart_decay: float = Field(
        1.0, gt=0, le=1, description="warm_restarts: peak lr factor from one cycle to the next."
    )
    clip_grad_norm: float | None = Field(
        None, gt=0, description="Clip the global gradient norm to this value (none: no clipping)."
    )
    loss: Literal["ce", "focal", "ghm", "bce"] = Field(
        "ce", description="ce (cross-entropy), focal, ghm (GHM-C) or bce (one-vs-rest)."
    )
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="For ce, bce and mixup targets.")
    focal_gamma: float = Field(2.0, ge=0, description="Focusing exponent of the focal loss.")
    focal_alpha: list[float] | None = Field(
        None,
        description="Focal loss alpha: one weight per class (in class order) for its term, or a "
        "single number for every class (the paper's alpha of the positive term; softmax focal "
        "loss has no negative terms, so one number only scales the loss).",
    )
    ghm_bins: int = Field(10, ge=1, description="GHM-C: gradient-norm bins.")
    ghm_momentum: float = Field(0.75, ge=0, lt=1, description="GHM-C: bin count moving average.")
    class_weights: bool = Field(
        False,
        description="Weight each class's loss term by the sampling stage's class_weight (focal: "
        "on top of focal_alpha); an alternative to balanced_sampling, rarely useful with it.",
    )
    balanced_sampling: bool = Field(True, description="Draw train images by sampling weights.")
    freeze_epochs: int = Field(0, ge=0, description="Epochs that train only the head.")
    ema: bool = Field(
        False,
        description="Keep an exponential moving average of the weights (timm ModelEmaV3); "
        "validation and the bundle use the average.",
    )
    ema_decay: float = Field(0.999, gt=0, lt=1, description="EMA decay (ramped up from 0).")
    patience: int = Field(10, ge=1, description="Early stop after this many epochs without gain.")
    monitor: Literal["macro_f1", "accuracy", "balanced_accuracy", "val_loss"] = Field(
        "macro_f1", description="Validation quantity that picks the best epoch."
    )
    augment: bool = Field(True, description="Random resized crop, flip and colour jitter.")
    hflip: bool = Field(True, description="Horizontal flips (turn off for digits, text...).")
    randaugment: bool = Field(
        False, description="torchvision RandAugment per image (2 ops), before the batch jitter."
    )
    randaugment_magnitude: int = Field(9, ge=0, le=30, description="RandAugment magnitude.")
    mixup_alpha: float = Field(0.0, ge=0, description="Mixup Beta(alpha) (timm); 0 is off.")
    cutmix_alpha: float = Field(0.0, ge=0, description="CutMix Beta(alpha) (timm); 0 is off.")
    seed: int = Field(0, description="Seeds initialisation, sampling and augmentation.")

    @field_validator("model")
    @classmethod
    def _is_timm_model(cls, name: str, info: ValidationInfo) -> str:
        if not (info.context or {}).get("check_model", True):
            return name  # checked when the model is built (training/models.py)
        from mtmc_pipeline.training.models import model_name_problem  # imports timm: only when set

        problem = model_name_problem(name)
        if problem:
            raise ValueError(problem)
        return name

    @field_validator("decay_milestones")
    @classmethod
    def _milestones_increase(cls, milestones: list[int]) -> list[int]:
        if not milestones or milestones[0] < 1 or milestones != sorted(set(milestones)):
            raise ValueError("must be a non-empty, strictly increasing list of epochs >= 1")
        return milestones

    @field_validator("focal_alpha", mode="before")
    @classmethod
    def _one_alpha_is_a_list_of_one(cls, alpha: Any) -> Any:
        """A bare number (task.yaml) becomes [number]; the launchpad takes lists only."""
        return [alpha] if isinstance(alpha, int | float) and not isinstance(alpha, bool) else alpha

    @field_validator("focal_alpha")
    @classmethod
    def _alpha_is_a_weight(cls, alpha: list[float] | None) -> list[float] | None:
        if alpha is not None and (not alpha or any(a < 0 for a in alpha)):
            raise ValueError("must be a number >= 0 or a non-empty list of them, one per class")
        return alpha

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> TrainConfig:
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            raise ValueError(
                "nesterov = true needs momentum > 0 with optimizer sgd (set nesterov: false)"
            )
        return self

    @model_validator(mode="after")
    def _mixing_needs_pairs(self) -> TrainConfig:
        if (self.mixup_alpha or self.cutmix_alpha) and self.batch_size % 2:
            raise ValueError(
                f"batch_size = {self.batch_size}: must be even with mixup_alpha or cutmix_alpha "
                "(images are mixed in pairs)"
            )
        return self


class EvaluationConfig(_Section):
    top_k: int = Field(5, ge=1, description="k of the top-k accuracy.")
    min_macro_f1: float | None = Field(
        None, ge=0, le=1, description="Optional floor; the quality check fails below it."
    )
    ovr_threshold: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="One-vs-rest metrics (CP ... OF1): class present at score >= this.",
    )
    ovr_scores: Literal["auto", "softmax", "sigmoid"] = Field(
        "auto",
        description="Per-class scores of the one-vs-rest metrics and mAP; auto: sigmoid for "
        "models trained with a one-vs-rest loss (bce, ghm), else softmax.",
    )


def default_levels() -> list[float]:
    return [round(0.10 + 0.02 * i, 2) for i in range(45)]


class CalibrationConfig(_Section):
    levels: list[float] = Field(
        default_factory=default_levels, description="Precision levels of the threshold table."
    )
    tolerance: float = Field(
        0.05, ge=0, le=1, description="Test split: realised precision may fall this far short."
    )
    min_support: int = Field(
        1,
        ge=1,
        description="A threshold counts only if this many val images score at or above it "
        "(raise it so one high-scoring mistake cannot leave a class without levels).",
    )

    @field_validator("levels")
    @classmethod
    def _levels_are_probabilities(cls, levels: list[float]) -> list[float]:
        if not levels or any(not 0 < lv < 1 for lv in levels):
            raise ValueError("levels must be a non-empty list of numbers strictly between 0 and 1")
        return sorted(set(levels))


class TaskConfig(_Section):
    scan: ScanConfig = ScanConfig()
    integrity: IntegrityConfig = IntegrityConfig()
    split: SplitConfig = SplitConfig()
    sampling: SamplingConfig = SamplingConfig()
    train: TrainConfig = TrainConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    calibration: CalibrationConfig = CalibrationConfig()


SECTIONS: dict[str, type[_Section]] = {
    name: field.annotation for name, field in TaskConfig.model_fields.items()
}


def _describe(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        value = e.get("input")
        msg = e["msg"].removeprefix("Value error, ")  # our own validators say what is wrong
        lines.append(f"{source}: {key} = {value!r}: {msg}")
    return "\n".join(lines)


def read_task_yaml(task_dir: Path) -> dict[str, Any]:
    """The overrides in ``task_dir/task.yaml`` ({} when there is none)."""
    path = task_dir / TASK_FILE
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text("utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_task_config(
    task_dir: Path, overrides: dict[str, dict[str, Any]] | None = None, check_model: bool = True
) -> TaskConfig:
    """Defaults < task.yaml < ``overrides`` (a mapping of section name to settings).

    ``check_model=False`` leaves ``train.model`` unchecked: checking it imports timm and torch,
    which a pipeline step that only reuses its stored output must not pay for.
    """
    from_file = read_task_yaml(task_dir)
    context = {"check_model": check_model}
    try:
        TaskConfig.model_validate(from_file, context=context)
    except ValidationError as e:
        raise ConfigError(_describe(e, str(task_dir / TASK_FILE))) from None
    merged = _merge(from_file, overrides or {})
    try:
        return TaskConfig.model_validate(merged, context=context)
    except ValidationError as e:
        raise ConfigError(_describe(e, f"run config for task {task_dir.name!r}")) from None


def _default_text(field: Any) -> str:
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, list) and len(value) > 6:
        return f"{value[0]}, {value[1]}, …, {value[-1]} ({len(value)} values)"
    return "none" if value is None else str(value)


def reference_markdown() -> str:
    """Every setting of every section, with its default and meaning (docs/configuration.md)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated by `mtmc config-reference`; a test keeps it in step with the code.",
        "Set these per task in `<task>/task.yaml` (a mapping of section to settings) or per",
        "run in the Dagster launchpad / `--config` (the asset of each stage takes its section).",
    ]
    for section, model in SECTIONS.items():
        lines += ["", f"## `{section}`", "", "| setting | default | meaning |", "|---|---|---|"]
        for name, field in model.model_fields.items():
            desc = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{section}.{name}` | `{_default_text(field)}` | {desc} |")
    return "\n".join(lines) + "\n"
