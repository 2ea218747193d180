"""Run configuration in the launchpad: one optional override per setting of a stage's section.

The Dagster config classes are generated from the core's pydantic sections so the two never
drift apart. Every field defaults to None ("not set here"), and the core validates the merged
result (defaults < task.yaml < run config), so errors name the setting the same way whether it
came from task.yaml or from the launchpad.
"""

from __future__ import annotations

import typing
from typing import Any, Literal

import dagster as dg
import pydantic

from mtmc_pipeline.config import SECTIONS


def _loose(annotation: Any) -> Any:
    """Dagster config has no Literal and no plain unions: accept the string, or any value for
    a number-or-"auto" setting, and let the core validate it."""
    if typing.get_origin(annotation) is Literal:
        return str
    if Literal in map(typing.get_origin, typing.get_args(annotation)):
        return Any
    if typing.get_origin(annotation) is dict:
        return dict[str, str]
    return annotation


def _overrides_class(section: str) -> type[dg.Config]:
    model = SECTIONS[section]
    fields = {
        name: (
            _loose(f.annotation) | None,
            pydantic.Field(None, description=f.description),
        )
        for name, f in model.model_fields.items()
    }
    return pydantic.create_model(  # type: ignore[call-overload]
        f"{model.__name__}Overrides", __base__=dg.Config, __doc__=model.__doc__, **fields
    )


OVERRIDES: dict[str, type[dg.Config]] = {name: _overrides_class(name) for name in SECTIONS}


def overrides_of(config: dg.Config) -> dict[str, Any]:
    """The settings actually given in the run config."""
    return config.model_dump(exclude_none=True)


ScanOverrides = OVERRIDES["scan"]
IntegrityOverrides = OVERRIDES["integrity"]
SplitOverrides = OVERRIDES["split"]
SamplingOverrides = OVERRIDES["sampling"]
TrainOverrides = OVERRIDES["train"]
EvaluationOverrides = OVERRIDES["evaluation"]
CalibrationOverrides = OVERRIDES["calibration"]
ExportOverrides = OVERRIDES["export"]
PromotionOverrides = OVERRIDES["promotion"]
