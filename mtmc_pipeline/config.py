"""Typed configuration of every stage, and how the three sources of settings combine.

Precedence: built-in defaults < ``<task>/task.yaml`` < run config (Dagster launchpad or
``--config``). Each stage reads one section; unknown keys and bad values fail with a message
that names the file, the key and the value.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

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
LABELS_FILE = "labels.csv"  # multi-label tasks: relpath,labels (see data/labels.py)


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
    near_duplicates: bool = Field(
        True,
        description="Find near copies (re-encoded, resized) by perceptual hash and colour "
        "thumbnail: near_duplicate, near_duplicate_conflict, near_duplicate_leak.",
    )
    near_duplicate_distance: int = Field(
        12,
        ge=0,
        le=32,
        description="Near copies: most differing bits of the 64-bit perceptual hashes.",
    )
    near_duplicate_colour: float = Field(
        4.0,
        ge=0,
        le=255,
        description="Near copies: most mean absolute difference (0-255) of the 4x4 colour "
        "thumbnails.",
    )
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
    val_fraction: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="Share of each class carved as val (picks the epoch, fits calibration) "
        "when there is no val/ folder.",
    )
    test_fraction: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="Share of each class carved as test when there is no test/ folder: the "
        "headline metrics and the realised-precision check come from it (0: none; metrics "
        "then come from val, which selection and calibration also saw).",
    )
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
    multilabel_combine: Literal["max", "mean"] = Field(
        "max",
        description="Multi-label tasks: an image's weight is the max (LVIS) or mean of its "
        "labels' class weights.",
    )

    adaptive: bool = Field(
        False,
        description="Every adaptive_period epochs, re-set each class's share of the draws"
        " to adaptive_min + (1 - its validation adaptive_metric) * "
        "(adaptive_max - adaptive_min) (MTMC-Pytorch's balancing).",
    )
    adaptive_period: int = Field(20, ge=1, description="adaptive: epochs between re-sets.")
    adaptive_metric: Literal["recall", "precision"] = Field(
        "recall",
        description="adaptive: per-class validation metric; recall draws more of the classes "
        "the model misses (low precision means a class is over-predicted).",
    )
    adaptive_min: float = Field(
        1.0, gt=0, description="adaptive: M, the draw weight of a class at metric 1."
    )
    adaptive_max: float | None = Field(
        None, gt=0, description="adaptive: N, the draw weight of a class at metric 0 (none: 2M)."
    )

    @model_validator(mode="after")
    def _adaptive_bounds_ordered(self) -> SamplingConfig:
        if self.adaptive_max is not None and self.adaptive_max < self.adaptive_min:
            raise ValueError("adaptive_max must be at least adaptive_min")
        return self


AUTO = "auto"
Auto = Literal["auto"]


class TrainConfig(_Section):
    """Training settings; those that may be ``auto`` are resolved by
    :mod:`mtmc_pipeline.training.recipe` from the data and the machine when the model stage runs."""

    model: str = Field("auto", description="Any timm model name, or auto.")
    img_size: Annotated[int, Field(ge=8, le=1024)] | Auto = Field(
        "auto", description="Square training resolution in pixels, or auto."
    )
    pretrained: bool | Auto = Field(
        "auto",
        description="Start from pretrained weights: true (fail if unreachable), false, or auto "
        "(pretrained_path, the local timm/Hugging Face cache or the hub, else from scratch).",
    )
    pretrained_path: str | None = Field(
        None, description="Local .safetensors/.pth weights to start from (no network)."
    )
    drop_rate: float = Field(0.0, ge=0, lt=1, description="Dropout before the classifier.")
    epochs: Annotated[int, Field(ge=1)] | Auto = Field(
        "auto", description="Maximum passes over the training images, or auto."
    )
    time_budget_minutes: Annotated[float, Field(gt=0)] | Literal["auto", "none"] = Field(
        "auto",
        description="Training time limit: the epochs are fitted to it from the throughput of the "
        "first steps and the schedule is compressed to match; none: train for epochs; auto: "
        "none when epochs is set, else chosen from the data and the device.",
    )
    batch_size: Annotated[int, Field(ge=2)] | Auto = Field(
        "auto", description="Images per optimisation step (batch norm needs at least 2), or auto."
    )
    optimizer: Literal["adamw", "sgd", "adam", "radam"] | Auto = Field(
        "auto", description="adamw, sgd (with momentum; see nesterov), adam, radam or auto."
    )
    lr: Annotated[float, Field(gt=0)] | Auto = Field(
        "auto", description="Peak learning rate, reached after warmup, or auto."
    )
    weight_decay: Annotated[float, Field(ge=0)] | Auto = Field(
        "auto", description="Not applied to norm layers and biases; or auto."
    )
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
    loss: Literal["ce", "focal", "ghm", "bce", "asl"] = Field(
        "ce",
        description="ce (cross-entropy), focal, ghm (GHM-C) or bce (one-vs-rest). Multi-label "
        "tasks train one sigmoid per class: bce, focal (sigmoid focal) or asl (asymmetric "
        "loss); ce there means bce.",
    )
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="For ce, bce and mixup targets.")
    focal_gamma: float = Field(2.0, ge=0, description="Focusing exponent of the focal loss.")
    focal_alpha: list[float] | None = Field(
        None,
        description="Focal loss alpha: one weight per class (in class order) for its term, or a "
        "single number for every class (the paper's alpha of the positive term; softmax focal "
        "loss has no negative terms, so one number only scales the loss).",
    )
    asl_gamma_neg: float = Field(4.0, ge=0, description="ASL: focusing exponent of negatives.")
    asl_gamma_pos: float = Field(0.0, ge=0, description="ASL: focusing exponent of positives.")
    asl_clip: float = Field(
        0.05, ge=0, lt=1, description="ASL: probability margin shifted off every negative."
    )
    pos_weight: bool = Field(
        False,
        description="Multi-label: weight each class's positive term by its train negatives / "
        "positives (BCE pos_weight).",
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
    patience: int = Field(
        10,
        ge=1,
        description="Early stop after this many epochs in which neither the monitor nor the "
        "validation loss improved.",
    )
    monitor: Literal["macro_f1", "accuracy", "balanced_accuracy", "val_loss", "mAP"] = Field(
        "macro_f1",
        description="Validation quantity that picks the best epoch. Multi-label tasks: mAP is "
        "used unless val_loss is set.",
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
        if name == AUTO:
            return name
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
        odd = self.batch_size != AUTO and self.batch_size % 2
        if (self.mixup_alpha or self.cutmix_alpha) and odd:
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
        0.05,
        ge=0,
        le=1,
        description="Test split: realised precision may fall this far short of its level (or "
        "by the 95% Clopper-Pearson slack of the test images, when that is larger).",
    )
    min_support: int = Field(
        10,
        ge=1,
        description="A threshold counts only if this many val images score at or above it: "
        "no level rests on a couple of images (and one high-scoring mistake cannot leave a "
        "class without levels).",
    )
    fit_confidence: float = Field(
        0.9,
        ge=0,
        lt=1,
        description="A level's threshold needs the one-sided Clopper-Pearson lower bound of "
        "this confidence of its val precision to reach the level (0: the precision itself); "
        "higher levels and fewer images need more margin, so new images rarely fall short.",
    )

    @field_validator("levels")
    @classmethod
    def _levels_are_probabilities(cls, levels: list[float]) -> list[float]:
        if not levels or any(not 0 < lv < 1 for lv in levels):
            raise ValueError("levels must be a non-empty list of numbers strictly between 0 and 1")
        return sorted(set(levels))


class LabelQualityConfig(_Section):
    enabled: bool = Field(
        False, description="Train k fold models and rank suspected label errors (label_issues)."
    )
    folds: int = Field(5, ge=2, le=20, description="Fold models, each trained on k - 1 folds.")
    method: Literal["self_confidence", "normalized_margin", "confidence_weighted_entropy"] = Field(
        "self_confidence",
        description="cleanlab label quality score that ranks the images (lowest first).",
    )
    filter_by: Literal[
        "prune_by_noise_rate",
        "prune_by_class",
        "both",
        "confident_learning",
        "predicted_neq_given",
        "low_normalized_margin",
        "low_self_confidence",
    ] = Field("prune_by_noise_rate", description="cleanlab find_label_issues filter_by.")


class ExportConfig(_Section):
    parity_atol: float = Field(
        1e-4, gt=0, description="Blocking check: largest |ONNX - PyTorch| logit allowed (fp32)."
    )
    torch_export: bool = Field(
        False, description="Also save the graph as a torch.export program (model.pt2)."
    )
    unknown_score: Literal["energy", "max_logit"] = Field(
        "energy", description="Open-set score: energy (-logsumexp of the logits) or max_logit."
    )
    false_reject_rate: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="Share of val images of known classes the unknown threshold rejects.",
    )
    speed_seconds: float = Field(
        0.5, ge=0, description="Time spent measuring onnxruntime and PyTorch images/s each."
    )


class PromotionConfig(_Section):
    macro_f1_tolerance: float = Field(
        0.0, ge=0, le=1, description="A retrain may score this much below the served macro F1."
    )
    recall_tolerance: float = Field(
        0.05, ge=0, le=1, description="A retrain may lose this much recall on any one class."
    )
    force: bool = Field(
        False, description="Promote the retrained model even if it regresses (the check warns)."
    )


class TaskConfig(_Section):
    kind: Literal["single", "multilabel"] = Field(
        "single",
        description="single: one class per image (its folder). multilabel: any number of classes "
        "per image, from labels.csv or the same bytes in several class folders.",
    )
    classes: list[str] | None = Field(
        None,
        description="multilabel with labels.csv: the class list; a label outside it is "
        "labels_unknown_class (default: every label labels.csv names).",
    )
    scan: ScanConfig = ScanConfig()
    integrity: IntegrityConfig = IntegrityConfig()
    split: SplitConfig = SplitConfig()
    sampling: SamplingConfig = SamplingConfig()
    train: TrainConfig = TrainConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    label_quality: LabelQualityConfig = LabelQualityConfig()
    export: ExportConfig = ExportConfig()
    promotion: PromotionConfig = PromotionConfig()

    @field_validator("classes")
    @classmethod
    def _class_names(cls, classes: list[str] | None) -> list[str] | None:
        if classes is not None:
            bad = [c for c in classes if not c.strip() or ";" in c or c != c.strip()]
            if not classes or bad or len(set(classes)) != len(classes):
                raise ValueError(
                    "must be a non-empty list of distinct names without ';' or outer spaces"
                )
            return sorted(classes)
        return classes


SECTIONS: dict[str, type[_Section]] = {
    name: field.annotation
    for name, field in TaskConfig.model_fields.items()
    if isinstance(field.annotation, type) and issubclass(field.annotation, _Section)
}
TOP_LEVEL = [name for name in TaskConfig.model_fields if name not in SECTIONS]


_UNION_BRANCH = re.compile(r"constrained-\w+|literal\[.*\]|int|float|bool|str")
"""How pydantic names the member of a union (``epochs: int | "auto"``) in an error's location."""


def _describe(err: ValidationError, source: str) -> str:
    """One line per bad setting; a number-or-auto setting's branches share their line."""
    problems: dict[str, tuple[Any, list[str]]] = {}
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"] if not _UNION_BRANCH.fullmatch(str(p)))
        msg = e["msg"].removeprefix("Value error, ")  # our own validators say what is wrong
        problems.setdefault(key or "(top level)", (e.get("input"), []))[1].append(msg)
    return "\n".join(
        f"{source}: {key} = {value!r}: {' or '.join(msgs)}"
        for key, (value, msgs) in problems.items()
    )


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
    merged = _merge(from_file, overrides or {})
    for settings, source in (
        (from_file, str(task_dir / TASK_FILE)),
        (merged, f"run config for task {task_dir.name!r}"),
    ):
        try:
            config = TaskConfig.model_validate(settings, context=context)
        except ValidationError as e:
            if not check_model:  # failing anyway: name every bad setting, the model too
                load_task_config(task_dir, overrides, check_model=True)
            raise ConfigError(_describe(e, source)) from None
    return config


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
    lines += [
        "",
        "## Top level",
        "",
        "Set in `task.yaml` only (they describe the data, not a run).",
        "",
    ]
    lines += ["| setting | default | meaning |", "|---|---|---|"]
    for name in TOP_LEVEL:
        field = TaskConfig.model_fields[name]
        desc = (field.description or "").replace("|", "\\|")
        lines.append(f"| `{name}` | `{_default_text(field)}` | {desc} |")
    for section, model in SECTIONS.items():
        lines += ["", f"## `{section}`", "", "| setting | default | meaning |", "|---|---|---|"]
        for name, field in model.model_fields.items():
            desc = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{section}.{name}` | `{_default_text(field)}` | {desc} |")
    return "\n".join(lines) + "\n"
