"""A training time budget, like Ultralytics' ``time``: how many epochs fit, from the first steps.

The planner times the first optimisation steps of the first epoch (after one step of warm-up,
whose kernel selection and allocation are not typical), adds an estimate of each epoch's
validation pass, and fits the number of epochs to the budget, at most ``max_epochs``. The
training loop then rebuilds its learning-rate schedule for that many epochs, so the schedule
is compressed to end at its floor on the last epoch instead of being cut off.

After every epoch the loop fits the epochs again with :func:`refit_epochs`, from the mean
time of the epochs done, as Ultralytics does: a first measurement taken while another step
shared the CPU (the demo evaluates one task while it trains the next) would otherwise leave
most of the budget unused.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

PROBE_STEPS = 8
"""Steps timed (after the first) before the plan is made; fewer when an epoch is shorter."""
VALIDATION_COST = 1 / 3
"""Validating an image costs about a third of training on it (a forward pass, no backward)."""


@dataclass
class EpochPlanner:
    """Call :meth:`begin` before the first update and :meth:`step_done` after each one until it
    returns the number of epochs."""

    budget_seconds: float
    max_epochs: int
    steps_per_epoch: int
    images_per_step: int
    val_images: int
    step_seconds: float = field(default=0.0, init=False)
    _marks: list[float] = field(default_factory=list, init=False)

    def begin(self) -> None:
        self._marks = [time.perf_counter()]

    def step_done(self) -> int | None:
        """The plan once enough steps are timed, else None."""
        self._marks.append(time.perf_counter())
        steps = len(self._marks) - 1
        if self.steps_per_epoch == 1:  # nothing to skip: the only step is the measurement
            return self.plan(self._marks[1] - self._marks[0])
        timed = steps - 1
        if timed < min(PROBE_STEPS, self.steps_per_epoch - 1):
            return None
        return self.plan((self._marks[-1] - self._marks[1]) / timed)

    def plan(self, step_seconds: float) -> int:
        """Epochs that fit the budget at ``step_seconds`` per update, between 1 and the cap."""
        self.step_seconds = step_seconds
        per_image = step_seconds / self.images_per_step
        epoch = step_seconds * self.steps_per_epoch + per_image * self.val_images * VALIDATION_COST
        return max(1, min(self.max_epochs, math.floor(self.budget_seconds / epoch)))

    def describe(self, epochs: int) -> str:
        rate = self.images_per_step / self.step_seconds if self.step_seconds > 0 else 0.0
        return (
            f"time budget {self.budget_seconds / 60:.2f} min at {rate:.0f} train images/s "
            f"measured: {epochs} epoch(s) (at most {self.max_epochs})"
        )


def refit_epochs(budget_seconds: float, max_epochs: int, epoch_seconds: Sequence[float]) -> int:
    """Epochs that fit the budget at the mean duration (training and validation) of the epochs
    done so far: at most ``max_epochs``, and never fewer than are done."""
    done = len(epoch_seconds)
    mean = sum(epoch_seconds) / done
    fitted = math.floor(budget_seconds / mean) if mean > 0 else max_epochs
    return max(done, min(max_epochs, fitted))


def describe_refit(budget_seconds: float, epoch_seconds: Sequence[float], epochs: int) -> str:
    mean = sum(epoch_seconds) / len(epoch_seconds)
    return (
        f"time budget {budget_seconds / 60:.2f} min at {mean:.2f} s per epoch over "
        f"{len(epoch_seconds)} epoch(s): {epochs} epoch(s)"
    )
