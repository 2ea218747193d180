"""Groups of tasks that share one backbone, declared in the data root's ``mtmc.yaml``.

```yaml
shared:
  garments: [pattern, colour]          # short form: equal loss weights
  digits_all:                          # long form
    tasks: [digits, parity]
    loss_weights: {parity: 0.5}        # default 1.0 per task
    freeze_backbone_at: 20             # from this epoch (1-based) on, only the heads train
    batch_mixing: interleaved          # default mixed: see SharedGroup.batch_mixing
    task_sampling: proportional        # default equal: see SharedGroup.task_sampling
    train: {epochs: 30}                # on top of the first member's train section
```

Each task stays a task (its own folder, splits, integrity and sampling weights); only its
model comes from the group. A task belongs to at most one group. A group of one task trains
exactly what that task would train alone. The first member leads the group's splits: the
others take its split of every image they share with it (:func:`split_leaders`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mtmc_pipeline.config import ConfigError

GROUPS_FILE = "mtmc.yaml"


class SharedGroup(BaseModel):
    """One group: its member tasks (in declared order) and the settings of the joint model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    tasks: list[str] = Field(min_length=1)
    loss_weights: dict[str, float] = Field(default_factory=dict)
    freeze_backbone_at: int | None = Field(None, ge=1)
    batch_mixing: Literal["mixed", "interleaved"] = "mixed"
    """``mixed``: every batch holds images of every member, so batch norm trains on the mix
    it normalises with at inference; ``interleaved``: one member per batch (MTMC-Pytorch)."""
    task_sampling: Literal["equal", "proportional"] = "equal"
    """Each member's share of the training draws. ``equal``: mixed batches in equal parts, or
    as many interleaved batches per epoch as the largest member has, so a small task is not
    starved of updates (it draws again); ``proportional``: in proportion to the members'
    train splits."""
    train: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _weights_name_members(self) -> SharedGroup:
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks {self.tasks} lists a task twice")
        unknown = sorted(set(self.loss_weights) - set(self.tasks))
        if unknown:
            raise ValueError(f"loss_weights names {unknown}, which are not in tasks")
        if any(w < 0 for w in self.loss_weights.values()):
            raise ValueError("loss_weights must be >= 0")
        return self

    def weight(self, task: str) -> float:
        return self.loss_weights.get(task, 1.0)


def read_groups(data_root: Path, tasks: list[str]) -> list[SharedGroup]:
    """The groups declared in ``data_root/mtmc.yaml`` ([] when there is no such file).

    Fails with the file, the group and the problem: an unknown task folder, a task in two
    groups, unknown keys or values of the wrong type.
    """
    path = data_root / GROUPS_FILE
    if not path.is_file():
        return []
    try:
        data = yaml.safe_load(path.read_text("utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict) or set(data) - {"shared"}:
        raise ConfigError(f"{path}: expected one key, 'shared', mapping group names to tasks")
    declared = data.get("shared") or {}
    if not isinstance(declared, dict):
        raise ConfigError(f"{path}: shared must map each group name to its tasks")
    groups, owner = [], {}
    for name, entry in declared.items():
        fields = {"tasks": entry} if isinstance(entry, list) else entry
        if not isinstance(fields, dict):
            raise ConfigError(f"{path}: shared.{name}: expected a list of tasks or a mapping")
        try:
            group = SharedGroup(name=str(name), **fields)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'value'}: "
                f"{err['msg'].removeprefix('Value error, ')}"
                for err in e.errors()
            )
            raise ConfigError(f"{path}: shared.{name}: {problems}") from None
        for task in group.tasks:
            if task not in tasks:
                raise ConfigError(
                    f"{path}: shared.{name}: {task!r} is not a task folder under {data_root}"
                )
            if task in owner:
                raise ConfigError(
                    f"{path}: task {task!r} is in two groups, {owner[task]!r} and {name!r}"
                )
            owner[task] = str(name)
        groups.append(group)
    return groups


def split_leaders(groups: list[SharedGroup]) -> dict[str, str]:
    """member -> the first member of its group, for every member but the first: the task whose
    splits it takes for the images both have, so the shared backbone does not train on what
    another member holds out."""
    return {task: group.tasks[0] for group in groups for task in group.tasks[1:]}
