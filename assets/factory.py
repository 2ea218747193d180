"""Build the asset graph of one task folder: raw_images -> inventory -> integrity -> splits ->
sampling_weights -> model -> evaluation -> calibration, keyed ``<task>/<stage>``.

Each asset resolves its configuration section, calls one function of
:mod:`mtmc_pipeline.stages`, and reports metadata, its data version and its checks.
"""

import contextlib
import hashlib
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
from anyascii import anyascii

from assets.automation import retrain_condition
from assets.config import (
    CalibrationOverrides,
    EvaluationOverrides,
    IntegrityOverrides,
    SamplingOverrides,
    ScanOverrides,
    SplitOverrides,
    TrainOverrides,
    overrides_of,
)
from assets.deployment import PRIORITY_TAG, training_step
from assets.export import CHECKS as EXPORT_CHECKS
from assets.export import build_export_asset
from assets.label_issues import build_label_issues
from assets.metadata import check_result, stage_metadata
from assets.pipes import TrainingLauncher
from assets.resources import ArtifactStore, TorchDevice
from mtmc_pipeline import stages
from mtmc_pipeline.artifacts import UnsafePathError
from mtmc_pipeline.config import ConfigError, TaskConfig, load_task_config
from mtmc_pipeline.data.layout import DataRootError
from mtmc_pipeline.data.splits import TaskDataError
from mtmc_pipeline.errors import DeviceError, PretrainedUnavailableError
from mtmc_pipeline.stages.training import run_training

STAGES = (
    "raw_images",
    "inventory",
    "integrity",
    "splits",
    "sampling_weights",
    "model",
    "evaluation",
    "calibration",
    "label_issues",
    "export",
)
DATA_STAGES = ("inventory", "integrity", "splits", "sampling_weights")
"""The steps a training waits for. Trainings run one at a time, so a ready training starts
first, then these, one task after another: the first training starts once its own task's
data is ready, not every task's, and the other tasks' data steps run beside it."""
KINDS = {  # the icons the UI shows: what each stage's output is
    "inventory": {"parquet"},
    "integrity": {"parquet"},
    "splits": {"parquet"},
    "sampling_weights": {"parquet"},
    "model": {"pytorch", "safetensors"},
    "evaluation": {"pytorch", "parquet"},
    "calibration": {"parquet"},
    "label_issues": {"pytorch", "cleanlab"},
    "export": {"onnx"},
}
_VALID = re.compile(r"^[A-Za-z0-9_]+$")
USER_ERRORS = (
    ConfigError,
    TaskDataError,
    DataRootError,
    UnsafePathError,
    PretrainedUnavailableError,
    DeviceError,
    FileNotFoundError,
)


def task_key(task: str) -> str:
    """The task's name in asset keys and group names (Dagster allows only [A-Za-z0-9_]).

    Names that qualify are kept; others are transliterated (``印花`` -> ``yinhua_1a2b``) with a
    short hash of the real name, so two folders never share a key.
    """
    if _VALID.match(task):
        return task
    slug = re.sub(r"[^a-z0-9]+", "_", anyascii(task).lower()).strip("_") or "task"
    return f"{slug}_{hashlib.sha1(task.encode()).hexdigest()[:4]}"


CHECKS: dict[str, list[tuple[str, bool, str]]] = {
    # stage -> (check name, blocking, description)
    "integrity": [
        (
            "error_fraction",
            True,
            "Share of files with errors is within integrity.max_error_fraction.",
        ),
        ("no_split_leakage", False, "No identical bytes in two split folders."),
    ],
    "splits": [
        ("every_class_in_train", False, "Every class folder has usable training images."),
        ("no_hash_in_two_splits", True, "No content hash appears in two splits."),
    ],
    "evaluation": [
        (
            "beats_majority_baseline",
            False,
            "Accuracy beats always predicting the largest class (multi-label: mAP beats a "
            "random ranking).",
        ),
        ("macro_f1_floor", False, "Macro F1 reaches evaluation.min_macro_f1 (when set)."),
    ],
    "calibration": [
        ("thresholds_monotone", False, "Thresholds never decrease as precision rises."),
        (
            "realised_precision_on_test",
            False,
            "With a test split: precision at each threshold is at least its level minus "
            "calibration.tolerance.",
        ),
    ],
    "export": EXPORT_CHECKS,
}


def asset_owners() -> list[str]:
    """``MTMC_OWNERS``: comma-separated emails or ``team:name``, shown on every asset."""
    given = os.environ.get("MTMC_OWNERS", "")
    owners = [o.strip() for o in given.split(",") if o.strip()]
    for owner in owners:
        if not (owner.startswith("team:") or re.fullmatch(r"[^@\s]+@[^@\s]+", owner)):
            raise ConfigError(f"MTMC_OWNERS={given!r}: {owner!r} is neither an email nor team:name")
    return owners


@contextlib.contextmanager
def user_errors(task_dir: Path) -> Iterator[None]:
    """Turn problems with the user's data or settings into a clean failure message."""
    try:
        yield
    except USER_ERRORS as e:
        raise dg.Failure(description=f"{task_dir}: {e}", allow_retries=False) from e


def _events(key: dg.AssetKey, stage: str, result: stages.StageResult) -> Iterator[Any]:
    yield dg.MaterializeResult(
        asset_key=key,
        data_version=dg.DataVersion(result.fingerprint),
        metadata=stage_metadata(result),
    )
    for name, _, _ in CHECKS.get(stage, []):
        # a check that does not apply is not "passed": a warning that says so (an @asset must
        # yield every check it declares; only blocking checks' errors stop anything)
        outcome = result.checks.get(name) or stages.CheckOutcome(
            False, "not applicable to this task's data or settings: not evaluated", "warn"
        )
        yield check_result(key, name, outcome)


def build_task_assets(
    task: str,
    data_root: Path,
    model_key: dg.AssetKey | None = None,
    split_leader: str | None = None,
    data_priority: int = 0,
    training_priority: int = 0,
) -> list[Any]:
    """The assets of one task folder (plus their checks).

    ``model_key``: the shared-backbone asset that writes this task's model (the task then has
    no ``model`` asset of its own). ``split_leader``: the first task of its shared group,
    whose splits this task's ``splits`` reads and depends on. ``data_priority`` and
    ``training_priority``: the ``dagster/priority`` of this task's data steps
    (``DATA_STAGES``) and of its model; the other steps have 0.
    """
    tk = task_key(task)
    task_dir = data_root / task
    keys = {stage: dg.AssetKey([tk, stage]) for stage in STAGES}
    keys["model"] = model_key or keys["model"]
    leader_splits = [dg.AssetKey([task_key(split_leader), "splits"])] if split_leader else []
    tags = {"task": tk}
    condition = retrain_condition()
    owners = asset_owners()

    def spec_kwargs(stage: str, upstream: list[str], *more: dg.AssetKey) -> dict[str, Any]:
        data = stage in DATA_STAGES and data_priority
        return {
            **({"op_tags": {PRIORITY_TAG: str(data_priority)}} if data else {}),
            "key": keys[stage],
            "deps": [*(keys[u] for u in upstream), *more],
            "group_name": tk,
            "code_version": stages.CODE_VERSIONS[stage],
            "automation_condition": condition,
            "tags": tags,
            "kinds": KINDS[stage],
            "owners": owners,
            "check_specs": [
                dg.AssetCheckSpec(name, asset=keys[stage], blocking=blocking, description=desc)
                for name, blocking, desc in CHECKS.get(stage, [])
            ],
        }

    def resolve(section: str, config: dg.Config) -> Any:
        # train.model is checked when the model is built: checking it imports torch
        overrides = {section: overrides_of(config)}
        cfg: TaskConfig = load_task_config(task_dir, overrides, check_model=False)
        return getattr(cfg, section)

    with warnings.catch_warnings():
        # AssetSpec-based observation replaces the deprecated SourceAsset that
        # @observable_source_asset builds; Dagster 1.13 (pinned <1.14) still marks it beta
        warnings.simplefilter("ignore", dg.BetaWarning)
        observation = dg.multi_observable_source_asset(
            name=f"{tk}__raw_images",
            specs=[
                dg.AssetSpec(
                    keys["raw_images"],
                    group_name=tk,
                    tags=tags,
                    kinds={"folder"},
                    owners=owners,
                    description=f"The image files under `{task_dir}` (never modified). Data "
                    "version: fingerprint of every file's (path, size, mtime) and of task.yaml.",
                )
            ],
        )

    @observation
    def raw_images() -> dg.ObserveResult:
        with user_errors(task_dir):
            scan = load_task_config(task_dir, check_model=False).scan
            version, md = stages.observe_raw(task_dir, scan)
        return dg.ObserveResult(data_version=dg.DataVersion(version), metadata=md)

    @dg.asset(**spec_kwargs("inventory", ["raw_images"]), description="One row per image file.")
    def inventory(config: ScanOverrides, artifacts: ArtifactStore):  # type: ignore[valid-type]
        with user_errors(task_dir):
            result = stages.run_inventory(task_dir, artifacts.task(task), resolve("scan", config))
        yield from _events(keys["inventory"], "inventory", result)

    @dg.asset(
        **spec_kwargs("integrity", ["inventory"]),
        description="Every file fully decoded and hashed; findings with stable issue codes.",
    )
    def integrity(config: IntegrityOverrides, artifacts: ArtifactStore):  # type: ignore[valid-type]
        with user_errors(task_dir):
            cfg = resolve("integrity", config)
            result = stages.run_integrity(task_dir, artifacts.task(task), cfg)
        yield from _events(keys["integrity"], "integrity", result)

    @dg.asset(
        **spec_kwargs("splits", ["integrity"], *leader_splits),
        description="Stable, stratified train/val/test manifest of the usable images.",
    )
    def splits(config: SplitOverrides, artifacts: ArtifactStore):  # type: ignore[valid-type]
        with user_errors(task_dir):
            leader = artifacts.task(split_leader) if split_leader else None
            result = stages.run_splits(
                artifacts.task(task), resolve("split", config), task_dir, leader
            )
        yield from _events(keys["splits"], "splits", result)

    @dg.asset(
        **spec_kwargs("sampling_weights", ["splits"]),
        description="Per-image sampling weights (mean 1 over train) and the per-class table.",
    )
    def sampling_weights(config: SamplingOverrides, artifacts: ArtifactStore):  # type: ignore[valid-type]
        with user_errors(task_dir):
            result = stages.run_sampling(artifacts.task(task), resolve("sampling", config))
        yield from _events(keys["sampling_weights"], "sampling_weights", result)

    @dg.asset(
        **spec_kwargs("model", ["splits", "sampling_weights"]),
        **training_step(training_priority),
        description="A timm classifier trained on the train split; best epoch on val.",
    )
    def model(
        context: dg.AssetExecutionContext,
        config: TrainOverrides,  # type: ignore[valid-type]
        artifacts: ArtifactStore,
        torch_device: TorchDevice,
        training: TrainingLauncher,
    ):
        with user_errors(task_dir):
            train, art = resolve("train", config), artifacts.task(task)
            if training.out_of_process:  # Dagster Pipes: this step does not import torch
                result = training.train(context, task_dir, art, train, torch_device)
            else:
                leases = Path(context.instance.root_directory) / "gpu-leases"
                result = run_training(
                    task_dir, art, train, torch_device.settings(leases), context.log.info
                )
        yield from _events(keys["model"], "model", result)

    @dg.asset(
        **spec_kwargs("evaluation", ["model", "splits"]),
        description="Metrics, per-class table, confusion matrix, predictions and report.",
    )
    def evaluation(
        config: EvaluationOverrides,  # type: ignore[valid-type]
        artifacts: ArtifactStore,
        torch_device: TorchDevice,
    ):
        from mtmc_pipeline.stages.reporting import run_evaluation

        with user_errors(task_dir):
            result = run_evaluation(
                task_dir,
                artifacts.task(task),
                resolve("evaluation", config),
                torch_device.settings(),
            )
        yield from _events(keys["evaluation"], "evaluation", result)

    @dg.asset(
        **spec_kwargs("calibration", ["evaluation"]),
        description="Per-class precision-threshold tables, temperature and calibrator.",
    )
    def calibration(config: CalibrationOverrides, artifacts: ArtifactStore):  # type: ignore[valid-type]
        from mtmc_pipeline.stages.reporting import run_calibration

        with user_errors(task_dir):
            result = run_calibration(artifacts.task(task), resolve("calibration", config))
        yield from _events(keys["calibration"], "calibration", result)

    def export_events(stage: Any) -> Iterator[Any]:
        with user_errors(task_dir):
            result = stage()
        yield from _events(keys["export"], "export", result)

    export = build_export_asset(
        task, task_dir, spec_kwargs("export", ["calibration"]), export_events
    )

    own_model = [] if model_key else [model]
    return [
        raw_images,
        inventory,
        integrity,
        splits,
        sampling_weights,
        *own_model,
        evaluation,
        calibration,
        build_label_issues(task, task_dir, spec_kwargs("label_issues", ["splits"])),
        export,
    ]


def build_leaderboard(tasks: list[str], root_problem: str | None = None) -> dg.AssetsDefinition:
    """``summary/leaderboard``: one row per task, from every task's latest results.

    ``root_problem`` says why the data root could not be read; the leaderboard then fails with
    it, so ``--select '*'`` on a mistyped ``MTMC_DATA_ROOT`` exits non-zero instead of
    materialising an empty summary.
    """
    deps = [dg.AssetKey([task_key(t), "calibration"]) for t in tasks]

    @dg.asset(
        key=dg.AssetKey(["summary", "leaderboard"]),
        deps=deps,
        group_name="summary",
        kinds={"parquet"},
        owners=asset_owners(),
        code_version=stages.CODE_VERSIONS["leaderboard"],
        automation_condition=retrain_condition(),
        description="One row per task: data counts, model, metrics, calibration, when trained.",
    )
    def leaderboard(artifacts: ArtifactStore) -> dg.MaterializeResult:
        if root_problem:
            raise dg.Failure(description=root_problem)
        from mtmc_pipeline.stages.reporting import run_leaderboard

        result = run_leaderboard(artifacts.path, tasks)
        return dg.MaterializeResult(
            data_version=dg.DataVersion(result.fingerprint), metadata=stage_metadata(result)
        )

    return leaderboard
