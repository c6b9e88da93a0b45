"""Progress bars for long loops, drawn only at a terminal: logs and pipes get plain lines from
the caller instead of a bar that floods them."""

from __future__ import annotations

import os
import shutil
import sys
from typing import Iterable, TypeVar

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


def epoch_bar(loader, epoch: int, epochs: int, enabled: bool):
    """A training loader wrapped in a bar that shows the running loss and accuracy when
    ``enabled`` (its ``on_step`` takes the loop's running sums after each step)."""
    if not enabled:
        return loader
    shown = bar(loader, f"epoch {epoch + 1}/{epochs}", True)

    class _Bar:
        def __iter__(self):
            return iter(shown)

        def on_step(self, r) -> None:
            shown.set_postfix(loss=f"{r.loss:.3f}", acc=f"{r.acc:.3f}", refresh=False)

    return _Bar()
