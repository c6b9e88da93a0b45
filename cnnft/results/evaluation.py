"""A checkpoint's results on one data set (:class:`Evaluation`, read back from metrics.json) and
the files of an evaluation folder (``RUN/eval/NAME/``): predictions, per-class table,
confusion matrices and the most confidently wrong images."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from .. import files
from . import metrics, plots

PER_CLASS_COLUMNS = ("class", "precision", "recall", "F1", "support")


# the files of an evaluation folder (RUN/eval/NAME/), by their key in ``Evaluation.files``
EVAL_FILES = {
    "metrics": "metrics.json",
    "predictions": "predictions.csv",
    "per_class": "per_class.csv",
    "confusion_csv": "confusion_matrix.csv",
    "confusion_normalized_csv": "confusion_matrix_normalized.csv",
    "confusion_png": "confusion_matrix.png",
    "confusion_normalized_png": "confusion_matrix_normalized.png",
    "confident_errors": "confident_errors.csv",
}


@dataclass(frozen=True)
class Evaluation:
    """A checkpoint's results on one data set; ``to_dict()`` is ``metrics.json`` and ``--json``.

    ``predictions`` (one row per image) goes to ``predictions.csv`` only; ``out_dir`` and
    ``files`` are set once the files are written.
    """

    checkpoint: str
    model: str
    epoch: int
    data: str
    data_name: str
    images: int
    skipped: list[dict]
    accuracy: float
    top5_accuracy: float | None
    loss: float
    classes: list[str]
    per_class: list[dict]
    macro_avg: dict
    weighted_avg: dict
    confusion_matrix: list[list[int]]
    confusion_matrix_normalized: list[list[float]]
    confident_errors: list[dict]
    seconds: float
    device: str
    out_dir: str | None = None
    files: dict[str, str] | None = None
    split: str | None = None  # val, test, or None for a --data folder
    note: str | None = None  # what the figures are of, when it is not what one would assume
    calibration: dict | None = None  # temperature, ECE/NLL before and after, reliability tables
    predictions: list[dict] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "predictions"}

    @classmethod
    def from_dict(cls, d: dict) -> "Evaluation":
        """Read back ``metrics.json`` (without the per-image predictions)."""
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name != "predictions" and f.name in d})

    PER_CLASS_COLUMNS: ClassVar[tuple[str, ...]] = PER_CLASS_COLUMNS

    def per_class_table(self) -> tuple[list[list[str]], list[list[str]]]:
        """The per-class table as text cells (:data:`PER_CLASS_COLUMNS`): one row per class,
        and the macro and weighted averages; one rendering for the terminal and report.md."""
        def cells(name: str, r: dict) -> list[str]:
            return [name, f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1']:.4f}", str(r["support"])]

        averages = [cells(key.replace("_", " "), getattr(self, key)) for key in ("macro_avg", "weighted_avg")]
        return [cells(r["class"], r) for r in self.per_class], averages


def write_evaluation(ev: Evaluation, out: Path) -> Evaluation:
    """Write an evaluation's files into ``out``: metrics.json, predictions.csv, per_class.csv,
    the confusion matrices (CSV and PNG, counts and row-normalised) and confident_errors.csv.
    Returns the evaluation with ``out_dir`` and ``files`` set."""
    paths = {key: out / name for key, name in EVAL_FILES.items()}
    classes = ev.classes
    cm = np.asarray(ev.confusion_matrix, dtype=np.int64).reshape(len(classes), len(classes))
    metrics.write_csv(paths["predictions"], ev.predictions, ("path", "true", "pred", "prob", "prob_true", "correct"))
    averages = [{"class": f"{k} avg", **getattr(ev, f"{k}_avg")} for k in ("macro", "weighted")]
    metrics.write_csv(paths["per_class"], ev.per_class + averages, ("class", "precision", "recall", "f1", "support"))
    metrics.write_matrix_csv(paths["confusion_csv"], cm, classes)
    metrics.write_matrix_csv(paths["confusion_normalized_csv"], row_normalise(cm), classes, fmt="{:.6f}")
    plots.confusion(paths["confusion_png"], cm, classes, normalize=False)
    plots.confusion(paths["confusion_normalized_png"], cm, classes, normalize=True)
    metrics.write_csv(paths["confident_errors"], ev.confident_errors, ("path", "true", "pred", "prob", "prob_true"))
    ev = dataclasses.replace(ev, out_dir=str(out), files={k: str(v) for k, v in paths.items()})
    files.atomic_write_json(paths["metrics"], ev.to_dict())
    return ev


def row_normalise(cm: np.ndarray) -> np.ndarray:
    rows = cm.sum(1, keepdims=True).astype(float)
    return np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
