"""``<task>/export``: the calibrated model as ONNX, gated by parity and by safe promotion."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg

from assets.config import ExportOverrides, PromotionOverrides, overrides_of
from assets.resources import ArtifactStore

CHECKS = [
    (
        "onnx_parity",
        True,
        "onnxruntime logits match PyTorch's on every val image (export.parity_atol) with the "
        "same top-1.",
    ),
    (
        "no_regression",
        True,
        "The retrain's macro F1 and per-class recall on the newest held-out images are no "
        "worse than the served model's (promotion.*); otherwise the previous export stays.",
    ),
]


class ExportRunConfig(dg.Config):
    export: ExportOverrides = ExportOverrides()  # type: ignore[valid-type]
    promotion: PromotionOverrides = PromotionOverrides()  # type: ignore[valid-type]


def build_export_asset(
    task: str,
    task_dir: Path,
    spec: dict[str, Any],
    run: Callable[[Callable[[], Any]], Any],
) -> dg.AssetsDefinition:
    """The export asset; ``run`` calls the stage inside the factory's error handling and
    yields its events."""

    @dg.asset(
        **spec,
        description="Self-describing ONNX (+ export.json) of the calibrated model, served by "
        "`mtmc serve` once parity holds and it does not regress.",
    )
    def export(config: ExportRunConfig, artifacts: ArtifactStore):
        from mtmc_pipeline.config import load_task_config
        from mtmc_pipeline.stages.export import run_export

        def stage() -> Any:
            overrides = {
                "export": overrides_of(config.export),
                "promotion": overrides_of(config.promotion),
            }
            cfg = load_task_config(task_dir, overrides, check_model=False)
            return run_export(task_dir, artifacts.task(task), cfg.export, cfg.promotion)

        yield from run(stage)

    return export
