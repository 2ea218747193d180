"""Automation: observe the raw folders, rerun only what went stale, and notice new task folders.

What runs unattended under ``dagster dev`` or a deployed daemon:

- ``observe_raw_images`` (schedule, on): observes every task folder, by default every 15
  minutes (``MTMC_OBSERVE_CRON``). New, removed or touched files give that task's
  ``raw_images`` a new data version; an unchanged folder gives the same one.
- ``mtmc_automation`` (automation sensor, on): evaluates each asset's automation condition, so
  a new data version reruns that task's chain and nothing else. ``MTMC_AUTOMATION`` picks the
  condition: ``eager`` (default, :data:`RETRAIN`) or ``nightly`` (:func:`nightly`: the same
  changes, held until the nightly cron tick ``MTMC_NIGHTLY_CRON``, default 02:00).
- ``task_folders`` (sensor, on): says when a task folder appeared or disappeared, since only a
  reload of the code location adds or removes its assets.
"""

from __future__ import annotations

import contextlib
import os
import zoneinfo
from collections.abc import Iterator, Sequence
from pathlib import Path

import dagster as dg

from mtmc_pipeline.data.layout import DataRootError, discover_tasks

OBSERVE_CRON = "*/15 * * * *"
NIGHTLY_CRON = "0 2 * * *"

# eager() alone reacts to upstream updates and newly missing assets, not to a new code version;
# code_version_changed() alone is true on a single tick and knows nothing of runs in progress.
# Adding it to eager()'s triggers keeps a code change pending until the asset is requested or
# updated, under eager()'s guards: never while the asset or a dependency is in progress or
# missing. all_deps_blocking_checks_passed() adds the guard across runs: an input whose
# blocking check failed (say a hand-run `integrity` over its error_fraction) is not built on
# until a rerun passes it; a run that rebuilds the input and its check is still allowed.
RETRAIN: dg.AutomationCondition = (
    dg.AutomationCondition.eager()
    .replace(
        "newly_missing",
        dg.AutomationCondition.newly_missing() | dg.AutomationCondition.code_version_changed(),
    )
    .with_label("eager() | code_version_changed()")
    & dg.AutomationCondition.all_deps_blocking_checks_passed()
).with_label("retrain")


class AutomationSettingError(ValueError):
    """A scheduling environment variable holds something Dagster cannot use."""


def _setting(variable: str, default: str) -> str:
    return os.environ.get(variable, default).strip()


@contextlib.contextmanager
def _settings_named(*variables: str) -> Iterator[None]:
    """Name the environment variables when Dagster rejects a cron string or a timezone."""
    try:
        yield
    except (dg.DagsterInvalidDefinitionError, ValueError, zoneinfo.ZoneInfoNotFoundError) as e:
        given = ", ".join(f"{v}={os.environ[v]!r}" for v in variables if v in os.environ)
        raise AutomationSettingError(f"{e} (set by {given or 'the defaults'})") from e


def observe_schedule(raw_keys: Sequence[dg.AssetKey]) -> dg.ScheduleDefinition:
    """Observe every task folder; in process, since observing only lists files."""
    job = dg.define_asset_job(
        "observe_raw_images",
        selection=dg.AssetSelection.assets(*raw_keys),
        executor_def=dg.in_process_executor,
        description="Fingerprint every task folder's file listing (nothing is decoded).",
    )
    with _settings_named("MTMC_OBSERVE_CRON", "MTMC_TIMEZONE"):
        return dg.ScheduleDefinition(
            name="observe_raw_images",
            job=job,
            cron_schedule=_setting("MTMC_OBSERVE_CRON", OBSERVE_CRON),
            execution_timezone=_setting("MTMC_TIMEZONE", "UTC"),
            default_status=dg.DefaultScheduleStatus.RUNNING,
            description="Observe the raw folders; a changed one makes its task stale.",
        )


def automation_sensor() -> dg.AutomationConditionSensorDefinition:
    """Dagster's own sensor starts stopped; this one is declared running."""
    return dg.AutomationConditionSensorDefinition(
        "mtmc_automation",
        target=dg.AssetSelection.all(),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Reruns the assets whose inputs or code version changed, task by task.",
    )


def nightly(cron: str = NIGHTLY_CRON, timezone: str = "UTC") -> dg.AutomationCondition:
    """:data:`RETRAIN`, held until a tick of ``cron`` passes: what changed during the day is
    rebuilt in one go at night, under the same guards."""
    return (
        RETRAIN & dg.AutomationCondition.cron_tick_passed(cron, timezone).since_last_handled()
    ).with_label(f"retrain at {cron} ({timezone})")


def retrain_condition() -> dg.AutomationCondition:
    """The condition every materialisable asset carries, as ``MTMC_AUTOMATION`` chooses."""
    mode = _setting("MTMC_AUTOMATION", "eager")
    if mode == "eager":
        return RETRAIN
    if mode != "nightly":
        raise AutomationSettingError(f"MTMC_AUTOMATION={mode!r}: use eager or nightly")
    cron, timezone = _setting("MTMC_NIGHTLY_CRON", NIGHTLY_CRON), _setting("MTMC_TIMEZONE", "UTC")
    with _settings_named("MTMC_NIGHTLY_CRON", "MTMC_TIMEZONE"):
        zoneinfo.ZoneInfo(timezone)
        try:
            return nightly(cron, timezone)
        except Exception as e:  # Dagster's parameter check: not one of its public errors
            raise ValueError(f"invalid cron schedule {cron!r}") from e


def folder_changes(root: Path, loaded: Sequence[str]) -> str | None:
    """What differs between the task folders on disk and those the code location loaded."""
    try:
        present = set(discover_tasks(root))
    except DataRootError:
        present = set()
    added, removed = sorted(present - set(loaded)), sorted(set(loaded) - present)
    if not added and not removed:
        return None
    changes = []
    if added:
        changes.append(f"new task folder(s) {', '.join(added)}")
    if removed:
        changes.append(f"task folder(s) {', '.join(removed)} removed")
    return (
        f"Under {root}: {' and '.join(changes)}. Reload the code location to update the "
        "assets (Deployment > Reload in the UI, or restart `dagster dev` or the code server); "
        "until then a new folder has no assets and a removed one fails to observe."
    )


def task_folder_sensor(root: Path, loaded: Sequence[str]) -> dg.SensorDefinition:
    """Compares the task folders on disk with those loaded; it launches nothing."""

    @dg.sensor(
        name="task_folders",
        minimum_interval_seconds=60,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Tells when a task folder is added to or removed from {root}.",
    )
    def task_folders(context: dg.SensorEvaluationContext) -> dg.SkipReason:
        message = folder_changes(root, loaded)
        if message is None:
            return dg.SkipReason(f"the task folders under {root} match the loaded assets")
        context.log.warning(message)
        return dg.SkipReason(message)

    return task_folders
