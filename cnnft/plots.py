"""Figures as PNG files: training curves and confusion matrices.

Drawn on matplotlib's Agg canvas through ``matplotlib.figure.Figure`` (never ``pyplot``), so
nothing needs a display and no global backend is switched under the caller. Each file is
written atomically.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np

from .checkpoint import atomic_write_bytes

DPI = 110


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
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
) -> Path:
    """Line plot of per-epoch values (e.g. train and val loss) with the best epoch marked."""
    fig = _figure(6.4, 4.0)
    ax = fig.subplots()
    for label, values in series.items():
        pts = [(e, v) for e, v in zip(epochs, values) if v is not None]
        if pts:
            ax.plot([e for e, _ in pts], [v for _, v in pts], marker="o", markersize=4, label=label)
    if best_epoch:
        ax.axvline(best_epoch, color="tab:red", linestyle="--", linewidth=1, label=f"best epoch ({best_epoch})")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(epochs) <= 20:
        ax.set_xticks(list(epochs))
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


def confusion(path: str | Path, cm: np.ndarray, classes: Sequence[str], *, normalize: bool) -> Path:
    """Heat map of a confusion matrix [true, predicted]: counts, or rows normalised to sum to 1."""
    cm = np.asarray(cm, dtype=float)
    if normalize:
        rows = cm.sum(1, keepdims=True)
        cm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = len(classes)
    side = min(max(4.0, 0.45 * n + 2.5), 30.0)
    fig = _figure(side + 1.0, side)
    ax = fig.subplots()
    im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1 if normalize else max(cm.max(), 1))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
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
    ax.set_title("Confusion matrix (row-normalised)" if normalize else "Confusion matrix (counts)")
    return _save(fig, path)
