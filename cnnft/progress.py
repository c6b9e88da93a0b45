"""Progress bars for long loops, drawn only at a terminal: logs and pipes get plain lines from
the caller instead of a bar that floods them."""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


def bar(iterable: Iterable[T], desc: str, enabled: bool) -> Iterable[T]:
    """``iterable`` wrapped in a tqdm bar on stderr when ``enabled``, else unchanged."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    try:  # a terminal that reports no size (some containers, CI pseudo-terminals) gets a fixed one
        sized = min(os.get_terminal_size(sys.stderr.fileno())) > 0
    except (OSError, ValueError):
        sized = False
    fallback = shutil.get_terminal_size((100, 24))
    shape = {"dynamic_ncols": True} if sized else {"ncols": fallback.columns, "nrows": fallback.lines}
    return tqdm(iterable, desc=desc, leave=False, file=sys.stderr, **shape)


def epoch_bar(loader, epoch: int, epochs: int, enabled: bool, log: Callable[[str], None] | None = None):
    """A training loader wrapped in a bar that shows the running loss and accuracy when
    ``enabled`` (its ``on_step`` takes the loop's running sums after each step); else, with
    ``log``, in plain :class:`Lines` (a long epoch in a log file or CI is not silent)."""
    if not enabled:
        return loader if log is None else _EpochLines(loader, f"training (epoch {epoch + 1} of {epochs})", log)
    shown = bar(loader, f"epoch {epoch + 1}/{epochs}", True)

    class _Bar:
        def __iter__(self):
            return iter(shown)

        def on_step(self, r) -> None:
            shown.set_postfix(loss=f"{r.loss:.3f}", acc=f"{r.acc:.3f}", refresh=False)

    return _Bar()


class _EpochLines:
    def __init__(self, loader, desc: str, log: Callable[[str], None]) -> None:
        self.loader, self.desc, self.log = loader, desc, log

    def __iter__(self):
        try:
            total = len(self.loader)
        except TypeError:
            total = 0
        return track(self.loader, self.desc, total, False, self.log, unit="steps")


class Lines:
    """Progress of a long loop as plain lines for a log, CI or a scheduler's output: one when
    another tenth of the work is done or :attr:`every_seconds` have passed since the last line
    (none in the first :attr:`quiet_seconds`, so short loops stay silent), each with done/total,
    the rate and the time left."""

    every_seconds = 30.0
    quiet_seconds = 5.0

    def __init__(self, desc: str, total: int, log: Callable[[str], None], unit: str = "images",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.desc, self.total, self.log, self.unit, self.clock = desc, max(int(total), 0), log, unit, clock
        self.done, self.start = 0, clock()
        self.last_time, self.last_tenth = self.start, 0

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        tenth = self.done * 10 // self.total if self.total else 0
        if now - self.start < self.quiet_seconds or self.done >= self.total:
            return
        if tenth > self.last_tenth or now - self.last_time >= self.every_seconds:
            self.last_time, self.last_tenth = now, tenth
            self.log(self.line(now))

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        return (f"{self.desc}: {self.done:,}/{self.total:,} {self.unit}{share}, {_rate(rate)} {self.unit}/s, "
                f"ETA {_duration(left)}")

    def close(self) -> None:
        """A last line with the totals when the loop ran long enough to report at all."""
        now = self.clock()
        if now - self.start >= self.quiet_seconds:
            rate = self.done / max(now - self.start, 1e-9)
            self.log(f"{self.desc}: {self.done:,} {self.unit} in {_duration(now - self.start)} "
                     f"({_rate(rate)} {self.unit}/s)")


def _rate(rate: float) -> str:
    return f"{rate:,.0f}" if rate >= 10 else f"{rate:.2g}"


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "unknown"
    s = int(round(seconds))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class _Quiet:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def counter(desc: str, total: int, show: bool, log: Callable[[str], None] | None, unit: str = "images"):
    """Something to ``update(n)`` as a loop advances and ``close()`` at its end: a bar at a
    terminal (``show``), plain :class:`Lines` through ``log`` otherwise, nothing without either."""
    if show:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit[:-1] if unit.endswith("s") else unit, leave=False,
                    file=sys.stderr, dynamic_ncols=True)
    if log is None:
        return _Quiet()
    return Lines(desc, total, log, unit)


def track(iterable: Iterable[T], desc: str, total: int, show: bool, log: Callable[[str], None] | None,
          unit: str = "images", size: Callable[[T], int] = lambda _item: 1) -> Iterator[T]:
    """``iterable`` reported by :func:`counter`, ``size(item)`` units per item (one by default)."""
    shown = counter(desc, total, show, log, unit)
    try:
        for item in iterable:
            yield item
            shown.update(size(item))
    finally:
        shown.close()
