"""A no-op Dagster graph of the pipeline's shape: the yardstick for a rerun that only reuses.

Built from the pipeline's own definitions for the task folders under ``MTMC_DATA_ROOT``, so it
keeps their shape as stages are added: every materialisable asset with its key, group,
dependencies, checks (blocking where the pipeline's are), pool and op tags, and the same
executor (forked steps, multiprocess, the per-run training limit); every asset returns at
once. ``incremental.py`` runs it through the same CLI as the pipeline:
``dagster asset materialize -m benchmarks.noop_graph --select '*'``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import dagster as dg

from assets.definitions import build_definitions
from assets.deployment import step_executor


def noop_asset(
    key: dg.AssetKey,
    deps: list[dg.AssetKey],
    group: str,
    checks: list[dg.AssetCheckSpec],
    pool: str | None,
    op_tags: dict[str, Any],
) -> dg.AssetsDefinition:
    @dg.asset(key=key, deps=deps, group_name=group, check_specs=checks, pool=pool, op_tags=op_tags)
    def noop() -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
        yield dg.MaterializeResult(asset_key=key, data_version=dg.DataVersion("same"))
        for spec in checks:
            yield dg.AssetCheckResult(asset_key=key, check_name=spec.name, passed=True)

    return noop


def build() -> dg.Definitions:
    pipeline = build_definitions()
    graph = pipeline.resolve_asset_graph()
    assets: list[Any] = []
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        if not node.is_materializable:  # the observed raw folders
            assets.append(dg.AssetSpec(key, group_name=node.group_name))
            continue
        checks = [
            dg.AssetCheckSpec(k.name, asset=key, blocking=graph.get_check_spec(k).blocking)
            for k in node.check_keys
        ]
        tags = dict(pipeline.resolve_assets_def(key).op.tags)
        pool = next(iter(node.pools), None) if node.pools else None
        assets.append(noop_asset(key, list(node.parent_keys), node.group_name, checks, pool, tags))
    return dg.Definitions(
        assets=assets,
        executor=step_executor(__name__),  # the pipeline's, preloading this module
    )


defs = build()
