"""The Dagster layer: one asset per pipeline stage and task, each a thin call into
:mod:`mtmc_pipeline.stages`. The code location is :mod:`assets.definitions`."""
