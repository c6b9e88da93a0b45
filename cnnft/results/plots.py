"""Figures as PNG files: training curves, learning-rate range tests, confusion matrices and image grids.

Drawn on matplotlib's Agg canvas through ``matplotlib.figure.Figure`` (never ``pyplot``), so
nothing needs a display and no global backend is switched under the caller. Each file is
written atomically, with its title in the PNG's ``Title`` text chunk so that tools (and tests)
can tell which run a picture belongs to without looking at pixels.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..files import atomic_write_bytes

DPI = 110


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path, title: str | None = None) -> Path:
    import matplotlib
    from matplotlib.text import Text

    # class names and paths are text, never markup: a folder named `$x$` or `a_$b` must not
    # go through mathtext (which fails on it, or draws it as a formula)
    for t in fig.findobj(Text):
        t.set_parse_math(False)
    buf = io.BytesIO()
    with matplotlib.rc_context({"text.parse_math": False}):  # tick labels made while drawing
        fig.savefig(buf, format="png", dpi=DPI, metadata={"Title": title} if title else None)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def curve(
    path: str | Path,
    epochs: Sequence[int],
    series: dict[str, Sequence[float | None]],
    *,
    ylabel: str,
    title: str,
    best_epoch: int | None = None,
    ylim: tuple[float, float] | None = None,
    phases: Sequence[tuple[int, str]] = (),
) -> Path:
    """Line plot of per-epoch values (e.g. train and val loss) with the best epoch marked.

    ``ylim`` fixes the value axis (accuracy: 0-1, so runs compare at a glance); ``phases``
    lists (first epoch, name) of each training phase after the first, drawn as boundaries.
    """
    fig = _figure(6.4, 4.0)
    ax = fig.subplots()
    for label, values in series.items():
        pts = [(e, v) for e, v in zip(epochs, values) if v is not None]
        if pts:
            ax.plot([e for e, _ in pts], [v for _, v in pts], marker="o", markersize=4, label=label)
    if best_epoch:
        ax.axvline(best_epoch, color="tab:red", linestyle="--", linewidth=1, label=f"best epoch ({best_epoch})")
    for i, (start, name) in enumerate(phases):
        ax.axvline(start - 0.5, color="0.35", linestyle=":", linewidth=1.2,
                   label="phase boundary" if i == 0 else None)
        ax.annotate(name, (start - 0.5, 1), xycoords=("data", "axes fraction"), xytext=(3, -3),
                    textcoords="offset points", va="top", fontsize=8, color="0.25")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if len(epochs) <= 20:
        ax.set_xticks(list(epochs))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path, title)


def lr_curve(path: str | Path, lrs: Sequence[float], losses: Sequence[float], *, suggested: float,
             title: str) -> Path:
    """A learning-rate range test: smoothed loss against the rate on a log axis, with the
    suggested rate marked."""
    fig = _figure(6.4, 4.0)
    ax = fig.subplots()
    ax.plot(lrs, losses, color="tab:blue", label="smoothed training loss")
    ax.axvline(suggested, color="tab:red", linestyle="--", linewidth=1, label=f"suggested lr {suggested:.2g}")
    if len(lrs):
        at = int(np.argmin(np.abs(np.log(np.asarray(lrs)) - np.log(suggested))))
        ax.plot([lrs[at]], [losses[at]], marker="o", color="tab:red")
    if len(losses):  # the explosion at the end would flatten the rest of the curve
        low, top = min(losses), min(max(losses), 2 * losses[0] - min(losses))
        pad = 0.05 * (top - low) or 0.05 * abs(top) or 0.05
        ax.set_ylim(low - pad, top + pad)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (head)")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path, title)


def _draw_confusion(fig, ax, cm: np.ndarray, classes: Sequence[str], normalize: bool):
    """One confusion matrix on ``ax`` with a colour bar exactly the matrix's height; returns its axes."""
    cm = np.asarray(cm, dtype=float)
    if normalize:
        rows = cm.sum(1, keepdims=True)
        cm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = len(classes)
    im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1 if normalize else max(cm.max(), 1))
    # a colour bar in the matrix's own axes coordinates follows its box, so it is exactly as
    # tall as the matrix whatever the figure's aspect (fig.colorbar(ax=...) sizes to the figure)
    cax = ax.inset_axes([1.03, 0.0, 0.045, 1.0])
    fig.colorbar(im, cax=cax)
    if n <= 60:
        ax.set_xticks(range(n), labels=list(classes), rotation=45, ha="right", fontsize=8 if n > 15 else 10)
        ax.set_yticks(range(n), labels=list(classes), fontsize=8 if n > 15 else 10)
    if n <= 25:
        threshold = cm.max() / 2 if cm.size else 0
        for i in range(n):
            for j in range(n):
                text = f"{cm[i, j]:.2f}" if normalize else f"{int(cm[i, j])}"
                ax.text(j, i, text, ha="center", va="center", fontsize=8 if n > 10 else 10,
                        color="white" if cm[i, j] > threshold else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("row-normalised" if normalize else "counts", fontsize=10)
    return cax


def _matrix_side(n: int) -> float:
    return min(max(4.0, 0.45 * n + 2.5), 30.0)


def confusion(path: str | Path, cm: np.ndarray, classes: Sequence[str], *, normalize: bool,
              title: str | None = None) -> Path:
    """Heat map of a confusion matrix [true, predicted]: counts, or rows normalised to sum to 1."""
    side = _matrix_side(len(classes))
    fig = _figure(side + 1.0, side)
    ax = fig.subplots()
    _draw_confusion(fig, ax, cm, classes, normalize)
    title = title or ("Confusion matrix (row-normalised)" if normalize else "Confusion matrix (counts)")
    fig.suptitle(title, fontsize=11)
    return _save(fig, path, title)


def confusion_pair(path: str | Path, cm: np.ndarray, classes: Sequence[str], *, title: str) -> Path:
    """The row-normalised and the raw confusion matrix side by side, each with its colour bar."""
    side = _matrix_side(len(classes))
    fig = _figure(2 * side + 2.0, side + 0.4)
    ax_norm, ax_raw = fig.subplots(1, 2)
    _draw_confusion(fig, ax_norm, cm, classes, normalize=True)
    _draw_confusion(fig, ax_raw, cm, classes, normalize=False)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path, title)


@dataclass(frozen=True)
class Tile:
    """One picture of an image grid: the pixels (None when the file cannot be read) and a caption."""

    image: np.ndarray | None
    caption: str
    color: str = "black"


def image_grid(path: str | Path, rows: Sequence[Sequence[Tile]], *, title: str,
               row_labels: Sequence[str] | None = None) -> int:
    """Thumbnails in rows (fastai's ``plot_top_losses``), a caption under each; an image that
    cannot be read is a grey tile saying so. Returns the number of tiles drawn."""
    rows = [list(r) for r in rows]
    ncols = max([len(r) for r in rows] + [1])
    fig = _figure(max(2.0 * ncols, 4.0) + (1.2 if row_labels else 0.0), 2.6 * max(len(rows), 1) + 0.9)
    grid = fig.subplots(max(len(rows), 1), ncols, squeeze=False)
    drawn = 0
    for r, row in enumerate(rows):
        for c in range(ncols):
            ax = grid[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(row):
                ax.axis("off")
                if c == 0:
                    ax.text(0.5, 0.5, "no images listed", ha="center", va="center", fontsize=8, color="0.3")
                continue
            tile = row[c]
            if tile.image is None:
                ax.imshow(np.full((8, 8, 3), 0.85))
                ax.text(3.5, 3.5, "image\nunavailable", ha="center", va="center", fontsize=8, color="0.3")
            else:
                ax.imshow(tile.image)
            ax.set_xlabel(tile.caption, fontsize=8, color=tile.color)
            for spine in ax.spines.values():
                spine.set_edgecolor(tile.color)
                spine.set_linewidth(2)
            drawn += 1
        if row_labels:
            grid[r][0].axis("on")  # an empty row keeps its label
            grid[r][0].set_ylabel(row_labels[r], fontsize=9, rotation=0, ha="right", va="center")
    if not rows:
        grid[0][0].axis("off")
        grid[0][0].text(0.5, 0.5, "nothing to show", ha="center", va="center")
    fig.suptitle(title, fontsize=11)
    _save(fig, path, title)
    return drawn


def reliability(path: str | Path, before: Sequence[dict], after: Sequence[dict], *, title: str,
                labels: tuple[str, str] = ("uncalibrated", "calibrated")) -> Path:
    """Reliability diagram: accuracy against mean confidence per confidence bin (tables from
    :func:`cnnft.results.calibration.reliability`), before and after calibration, with the diagonal
    a perfectly calibrated model lies on; the bars' widths follow the bins."""
    fig = _figure(6.4, 4.4)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect calibration")
    for table, label, colour in ((before, labels[0], "tab:orange"), (after, labels[1], "tab:blue")):
        pts = [(r["confidence"], r["accuracy"], r["count"]) for r in table if r["count"]]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=4, color=colour, label=label)
    total = sum(r["count"] for r in after) or 1
    ax.bar([(r["low"] + r["high"]) / 2 for r in after], [r["count"] / total for r in after],
           width=[r["high"] - r["low"] for r in after], color="tab:blue", alpha=0.15, label="share of images")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top class)", ylabel="accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    out = _save(fig, path, title)
    return out
