"""Turn a stage's plain-Python report into Dagster metadata a person can read in the UI.

Tables become typed tables (``MetadataValue.table``: sortable, every row), and a Parquet
output gets Dagster's standard keys: ``dagster/row_count``, ``dagster/column_schema`` (from
the file's schema) and ``dagster/uri``; a directory output gets ``dagster/uri``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from mtmc_pipeline.stages import CheckOutcome, Markdown, Png, StageResult
from mtmc_pipeline.stages.common import png_markdown


def _column_type(dtype: Any) -> str:
    if pd.api.types.is_bool_dtype(dtype):
        return "bool"
    if pd.api.types.is_integer_dtype(dtype):
        return "int"
    if pd.api.types.is_float_dtype(dtype):
        return "float"
    return "string"


def _cell(value: Any) -> str | int | float | bool | None:
    """A table cell Dagster can store: lists joined, NaN empty, numpy scalars as Python."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value))
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def table_value(df: pd.DataFrame) -> dg.TableMetadataValue:
    """A typed table of every row (the index is a column when it is named)."""
    if df.index.name is not None or not isinstance(df.index, pd.RangeIndex):
        df = df.reset_index()
    columns = [dg.TableColumn(str(c), _column_type(df[c].dtype)) for c in df.columns]
    records = [
        dg.TableRecord({str(c): _cell(v) for c, v in row.items()}) for row in df.to_dict("records")
    ]
    return dg.MetadataValue.table(records, schema=dg.TableSchema(columns=columns))


def output_metadata(path: Path) -> dict[str, Any]:
    """Dagster's standard keys for a stage's output file or directory."""
    md: dict[str, Any] = {"dagster/uri": path.resolve().as_uri()}
    if path.suffix == ".parquet" and path.is_file():
        meta = pq.read_metadata(path)
        fields = meta.schema.to_arrow_schema()
        md["dagster/row_count"] = meta.num_rows
        md["dagster/column_schema"] = dg.TableSchema(
            columns=[dg.TableColumn(f.name, str(f.type)) for f in fields]
        )
    return md


def to_metadata_value(name: str, value: Any) -> Any:
    if isinstance(value, pd.DataFrame):
        return table_value(value)
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
    if "path" in result.metadata:
        md.update(output_metadata(Path(result.metadata["path"])))
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
