"""A :class:`StageResult` as plain JSON, for a stage that ran in another process.

Training through Dagster Pipes runs the model stage in a subprocess or a Kubernetes pod; its
result (plots, the history table, numbers) travels back as one JSON message, and the asset
turns it into the same metadata as a stage run in its own process.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import pandas as pd

from mtmc_pipeline.stages.common import CheckOutcome, Markdown, Png, StageResult


def _encode(value: Any) -> Any:
    if isinstance(value, Png):
        return {"__png__": base64.b64encode(value.data).decode()}
    if isinstance(value, Markdown):
        return {"__markdown__": value.text}
    if isinstance(value, pd.DataFrame):
        return {"__frame__": value.to_json(orient="split", index=False)}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and len(value) == 1:
        ((kind, payload),) = value.items()
        if kind == "__png__":
            return Png(base64.b64decode(payload))
        if kind == "__markdown__":
            return Markdown(payload)
        if kind == "__frame__":
            return pd.read_json(io.StringIO(payload), orient="split")
    return value


def _plain(metadata: dict[str, Any]) -> dict[str, Any]:
    """JSON-able metadata (numpy scalars become Python numbers)."""
    encoded = {k: _encode(v) for k, v in metadata.items()}
    return json.loads(json.dumps(encoded, default=lambda o: o.item()))


def to_json(result: StageResult) -> dict[str, Any]:
    return {
        "fingerprint": result.fingerprint,
        "reused": result.reused,
        "metadata": _plain(result.metadata),
        "checks": {
            name: {
                "passed": c.passed,
                "description": c.description,
                "severity": c.severity,
                "metadata": _plain(c.metadata),
            }
            for name, c in result.checks.items()
        },
    }


def from_json(payload: dict[str, Any]) -> StageResult:
    def decoded(metadata: dict[str, Any]) -> dict[str, Any]:
        return {k: _decode(v) for k, v in metadata.items()}

    return StageResult(
        fingerprint=payload["fingerprint"],
        reused=payload["reused"],
        metadata=decoded(payload["metadata"]),
        checks={
            name: CheckOutcome(c["passed"], c["description"], c["severity"], decoded(c["metadata"]))
            for name, c in payload["checks"].items()
        },
    )
