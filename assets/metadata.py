"""Turn a stage's plain-Python report into Dagster metadata a person can read in the UI."""

from __future__ import annotations

import math
from typing import Any

import dagster as dg
import pandas as pd

from mtmc_pipeline.stages import CheckOutcome, Markdown, Png, StageResult
from mtmc_pipeline.stages.common import png_markdown

MAX_TABLE_ROWS = 50


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    text = ", ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pd.DataFrame, max_rows: int = MAX_TABLE_ROWS) -> str:
    """A Markdown table (the index is shown when it is named)."""
    if df.index.name is not None or not isinstance(df.index, pd.RangeIndex):
        df = df.reset_index()
    shown = df.head(max_rows)
    lines = [
        "| " + " | ".join(_cell(c) for c in shown.columns) + " |",
        "|" + "---|" * len(shown.columns),
    ]
    lines += [
        "| " + " | ".join(_cell(v) for v in row) + " |" for row in shown.itertuples(index=False)
    ]
    if len(df) > max_rows:
        lines.append(f"\n… {len(df) - max_rows} more rows")
    return "\n".join(lines)


def to_metadata_value(name: str, value: Any) -> Any:
    if isinstance(value, pd.DataFrame):
        return dg.MetadataValue.md(markdown_table(value))
    if isinstance(value, Markdown):
        return dg.MetadataValue.md(value.text)
    if isinstance(value, Png):
        return dg.MetadataValue.md(png_markdown(value.data, name))
    if isinstance(value, dict | list):
        return dg.MetadataValue.json(value)
    if name == "path":
        return dg.MetadataValue.path(value)
    return value


def stage_metadata(result: StageResult) -> dict[str, Any]:
    md = {k: to_metadata_value(k, v) for k, v in result.metadata.items()}
    md["reused"] = result.reused
    md["fingerprint"] = result.fingerprint
    if result.reused:
        md["status"] = "reused: the stored output was made from the same inputs and settings"
    return md


def check_result(key: dg.AssetKey, name: str, outcome: CheckOutcome) -> dg.AssetCheckResult:
    severity = (
        dg.AssetCheckSeverity.WARN if outcome.severity == "warn" else dg.AssetCheckSeverity.ERROR
    )
    return dg.AssetCheckResult(
        asset_key=key,
        check_name=name,
        passed=outcome.passed,
        severity=severity,
        description=outcome.description,
        metadata={k: to_metadata_value(k, v) for k, v in outcome.metadata.items()},
    )
