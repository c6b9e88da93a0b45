"""A run's wall-clock budget: its deadline, the epochs that fit before it, the schedule refitted.

``train.time_budget`` gives a run a deadline. After each epoch the epochs still to come are cut
to what the measured epoch time leaves room for, and the learning-rate curve is refitted to
end there (a cosine from the current rate down to zero, no jump); a step that finds the deadline
passed stops the epoch (:class:`cnnft.training.engine.StopFlag`), so the run ends in time with a
resumable checkpoint. ``cnnft tune`` gives each trial the time the search has left this way.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

from ..config import duration_seconds


class Budget:
    """The deadline of a run (``time.monotonic()`` clock) and the epochs that fit before it."""

    def __init__(self, seconds: float, spent: float = 0.0, *, log: Callable[[str], None] = lambda m: None) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + max(seconds - spent, 0.0)
        self.log = log
        self.epochs: int | None = None  # the fitted number of epochs (None: not cut)
        self.ended = False  # True once the budget has ended the run
        self._scheduler = None
        self._steps = 0
        self._planned = 0

    @classmethod
    def of(cls, setting: str | None, resumed: dict | None, log: Callable[[str], None]) -> "Budget | None":
        """``train.time_budget`` as a Budget (None: unset); a resumed run has spent the wall
        time of its earlier processes already."""
        if setting is None:
            return None
        spent = resumed["history"][-1]["wall_seconds"] if resumed and resumed["history"] else 0.0
        return cls(duration_seconds(setting), spent, log=log)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def expired(self) -> bool:
        return time.monotonic() >= self.deadline

    def drive(self, scheduler, steps_per_epoch: int, planned_epochs: int) -> None:
        """The schedule to refit when the epochs are cut, and the epochs the config asks for."""
        self._scheduler, self._steps, self._planned = scheduler, steps_per_epoch, planned_epochs

    def after_epoch(self, row: dict, history: list[dict]) -> bool:
        """Fit the epochs still to come to the time left; False: no further epoch fits (the run
        ends here). The head phase (epoch 0) is not a training epoch and is not measured."""
        if row["phase"] == "head" and not self.expired():
            return True
        timed = [r["epoch_seconds"] for r in history if r["phase"] == "train"] or [row["epoch_seconds"]]
        per_epoch = max(sum(timed) / len(timed), 1e-3)
        done = row["epoch"]
        fits = done + int(max(self.left(), 0.0) // per_epoch)
        target = min(self._planned, fits)
        if target <= done:
            if done < self._planned:
                self.ended = True
                self.log(f"train.time_budget: {max(self.left(), 0):.0f}s left at {per_epoch:.0f}s an epoch; "
                         f"the run ends after epoch {done} of {self._planned}")
                return False
            return True
        if target < (self.epochs or self._planned):
            self.epochs = target
            self.ended = True
            refit_schedule(self._scheduler, target * self._steps)
            self.log(f"train.time_budget: {self.left():.0f}s left at {per_epoch:.0f}s an epoch: "
                     f"{target} epochs instead of {self._planned}; learning-rate schedule refitted to end there")
        return True


def chained(fn: Callable[[dict], bool] | None, budget: "Budget | None",
            history: list[dict]) -> Callable[[dict], bool] | None:
    """An epoch hook that asks both ``fn`` (a caller's: a tuning trial's pruner) and the budget
    whether the run goes on; each sees every epoch."""
    if budget is None:
        return fn

    def both(row: dict) -> bool:
        wants = fn is None or fn(row) is not False
        return budget.after_epoch(row, history) and wants

    return both


def refit_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR | None, end_step: int) -> None:
    """Make a per-step LambdaLR end at ``end_step``: from each group's current factor, a cosine
    down to 0 there (the rate does not jump). A constant rate (None) is left alone."""
    if scheduler is None:
        return
    now = scheduler.last_epoch
    span = max(1, end_step - now)

    def curve(start: float) -> Callable[[int], float]:
        return lambda step: start * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0, step - now) / span)))

    scheduler.lr_lambdas = [curve(f(now)) for f in scheduler.lr_lambdas]
