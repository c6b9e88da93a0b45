"""The one clock of a search: the budget, what earlier processes of it used, the deadline every
worker reads from the study, and what each trial may still spend.

The whole search, final steps included, ends within ``--budget``: trials start only while a
useful one fits, each is given the time left (``train.time_budget``: its epochs fitted to it,
stopped at a step boundary at the deadline), and a small reserve is kept for choosing the
winner, evaluating it on ``data.test`` and writing the summary and plots.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .. import files

FILE = "clock.json"
RESERVE_SHARE, RESERVE_MIN, RESERVE_MAX = 0.03, 8.0, 60.0  # seconds kept for the final steps (plots: ~5s)
START_SHARE, START_MIN = 0.02, 3.0  # a trial is not started with less time than this left


class Clock:
    """The budget of one search in this process; ``used_before``: seconds earlier processes of
    the same search (a resumed one) spent."""

    def __init__(self, budget: float, used_before: float = 0.0, started: float | None = None) -> None:
        self.budget, self.used_before = budget, used_before
        self.started = time.monotonic() if started is None else started  # when this process began the search
        self.deadline_unix = time.time() - (time.monotonic() - self.started) + budget - used_before
        self.reserve = min(max(RESERVE_SHARE * budget, RESERVE_MIN), RESERVE_MAX)

    def used(self) -> float:
        return self.used_before + time.monotonic() - self.started

    def left(self, deadline_unix: float | None = None) -> float:
        """Seconds left before the deadline (the study's, when given: all workers share it)."""
        return (deadline_unix if deadline_unix is not None else self.deadline_unix) - time.time()

    def for_trial(self, deadline_unix: float | None = None) -> float:
        """Seconds the next trial may spend: the time left less the reserve for the final steps."""
        return self.left(deadline_unix) - self.reserve

    def can_start(self, deadline_unix: float | None = None, shortest: float = 0.0) -> bool:
        """Whether a trial fits: at least a few seconds, and half the shortest trial seen so far
        (a trial that cannot get through its setup and an epoch only spends the reserve)."""
        return self.for_trial(deadline_unix) >= max(START_SHARE * self.budget, START_MIN, shortest / 2)

    def save(self, folder: Path) -> None:
        files.atomic_write_json(folder / FILE, {"budget_seconds": round(self.budget, 3),
                                               "used_seconds": round(self.used(), 3)})


def used_before(folder: Path) -> tuple[float | None, float]:
    """The budget and the seconds used by the earlier processes of the search in ``folder``."""
    path = folder / FILE
    if not path.is_file():
        return None, 0.0
    saved = json.loads(path.read_text(encoding="utf-8"))
    return float(saved["budget_seconds"]), float(saved["used_seconds"])
