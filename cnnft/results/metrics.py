"""Metric tables: per-epoch history, per-class results, CSV/JSON writers."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from ..files import atomic_write_text

EPOCH_COLUMNS = ("epoch", "phase", "lr_head", "lr_backbone", "train_loss", "train_acc", "val_loss", "val_acc", "val_f1",
                 "epoch_seconds", "images_per_second", "data_wait", "trainable_stages")


def write_csv(path: str | Path, rows: list[dict], columns: tuple[str, ...] | None = None) -> None:
    """Write rows as CSV atomically (the whole file is replaced, never half-written)."""
    cols = list(columns or (rows[0].keys() if rows else []))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    atomic_write_text(path, buf.getvalue())


def read_csv(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts [true, predicted]."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def per_class(cm: np.ndarray, classes: list[str]) -> dict:
    """Precision, recall, F1 and support per class, with macro and weighted averages."""
    tp = np.diag(cm).astype(float)
    support = cm.sum(1).astype(float)
    predicted = cm.sum(0).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    rows = [
        {"class": c, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for c, p, r, f, s in zip(classes, precision, recall, f1, support)
    ]
    total = support.sum()
    avg = {}
    for name, w in (("macro", np.ones_like(support) / len(support)), ("weighted", support / max(total, 1))):
        avg[name] = {"precision": float((precision * w).sum()), "recall": float((recall * w).sum()),
                     "f1": float((f1 * w).sum()), "support": int(total)}
    return {"per_class": rows, **avg}


def topk_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of samples whose true label is among the ``k`` highest scores."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    if len(labels) == 0:
        return 0.0
    top = np.argpartition(-probs, kth=min(k, probs.shape[1]) - 1, axis=1)[:, :k]
    return float((top == labels[:, None]).any(1).mean())


def write_matrix_csv(path: str | Path, matrix: np.ndarray, classes: list[str], *, fmt: str = "{}") -> None:
    """Write a square [true, predicted] matrix with class names as the header row and first column."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["true\\predicted", *classes])
    for name, row in zip(classes, np.asarray(matrix)):
        w.writerow([name, *(fmt.format(v) for v in row)])
    atomic_write_text(path, buf.getvalue())
