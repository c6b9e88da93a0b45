"""What the report reads from a run folder: history, status, hyperparameters, class counts,
confused pairs, and thumbnails of the run's own images (and of nothing else)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import Config
from ..data import folders as data
from ..errors import CnnftError
from . import metrics
from .evaluation import Evaluation
from .rundir import RunDir

THUMBNAIL = 160  # pixels, longest side
INCOMPLETE = "interrupted"  # no summary.json: stopped (Ctrl-C, SIGTERM, a kill), or still running


def read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _value(v: str | None) -> float | str | None:
    """A metrics.csv cell: a number, empty (None), or text (the ``phase`` column)."""
    if v in ("", None):
        return None
    try:
        return float(v)
    except ValueError:
        return v


def read_history(path: Path) -> list[dict]:
    return [{k: _value(v) for k, v in row.items()} for row in metrics.read_csv(path)]


def best_of(history: list[dict], summary: dict) -> tuple[int, float]:
    """(best epoch, best val accuracy): the summary's, or for a run without one (interrupted,
    or failed before an epoch) the first epoch with the highest val accuracy, as training picks it."""
    if isinstance(summary.get("best_epoch"), int) and isinstance(summary.get("best_val_acc"), (int, float)):
        return summary["best_epoch"], float(summary["best_val_acc"])
    scored = [(r["val_acc"], int(r["epoch"])) for r in history if isinstance(r["val_acc"], float)]
    if not scored:
        return int(history[-1]["epoch"]), 0.0
    best = max(v for v, _ in scored)
    return next(e for v, e in scored if v == best), best


def epochs_done(history: list[dict]) -> int:
    """The strategy's epochs in metrics.csv (the head phase, when there is one, is epoch 0)."""
    return int(history[-1]["epoch"]) if history else 0


def run_status(summary: dict) -> tuple[str, str | None]:
    """(status, error): completed, failed (with the error summary.json gives) or interrupted."""
    if not summary:
        return INCOMPLETE, None
    return str(summary.get("status", INCOMPLETE)), summary.get("error")


def phase_starts(history: list[dict]) -> list[tuple[int, str]]:
    """(first epoch, name) of every phase after the first, from metrics.csv's ``phase`` column."""
    if not history or "phase" not in history[0]:
        return []
    starts, prev = [], history[0]["phase"]
    for r in history[1:]:
        if r["phase"] != prev and r["phase"] is not None:
            starts.append((int(r["epoch"]), str(r["phase"])))
        prev = r["phase"]
    return starts


def wall_seconds(summary: dict, history: list[dict]) -> float | None:
    """Training time: the summary's, else the sum of the finished epochs' times."""
    if isinstance(summary.get("wall_seconds"), (int, float)):
        return float(summary["wall_seconds"])
    times = [r.get("epoch_seconds") for r in history]
    return float(sum(times)) if times and all(isinstance(t, float) for t in times) else None


def images_per_second(history: list[dict]) -> float | None:
    """Mean training throughput over the epochs."""
    speeds = [r.get("images_per_second") for r in history]
    speeds = [s for s in speeds if isinstance(s, float)]
    return round(sum(speeds) / len(speeds), 1) if speeds else None


def _stages(plan: dict) -> str:
    stages = plan.get("stages") or []
    trained = [s["name"] for s in stages if not s.get("frozen")]
    frozen = [s["name"] for s in stages if s.get("frozen")]
    text = f"trained: {', '.join(trained) or 'none'}"
    return text + (f"; frozen: {', '.join(frozen)}" if frozen else "")


def hyperparameters(plan: dict, cfg: Config | None, summary: dict, history: list[dict]) -> dict[str, str]:
    """The settings and figures that explain a run, as label -> text, from freeze_plan.json,
    config.yaml, summary.json and metrics.csv (what a file does not give is left out)."""
    hp = {
        "model": f"{plan['model']}, weights: {plan['weights']}",
        "strategy": f"{plan['strategy']}: {_stages(plan)}",
        "trainable parameters": f"{plan['trainable_params']:,} of {plan['total_params']:,} "
                                f"({plan['trainable_params'] / max(plan['total_params'], 1):.2%})",
        "lr / backbone lr": f"{plan.get('lr')} / {plan.get('backbone_lr')}",
    }
    if cfg is not None:
        t, d = cfg.train, cfg.data
        hp["optimizer"] = (f"{t.optimizer}, weight decay {t.weight_decay}"
                           + (f", momentum {t.momentum}" if t.optimizer == "sgd" else ""))
        hp["schedule"] = f"{t.scheduler}, warm-up {t.warmup_epochs} epochs, label smoothing {t.label_smoothing}"
        hp["augmentation"] = str(d.augment)
        hp["image size"] = f"{d.image_size} px" if d.image_size else "the weights' own"
        hp["batch size"] = str(d.batch_size)
        hp["epochs"] = f"{epochs_done(history)} of {t.epochs}"
        hp["seed"] = str(cfg.seed)
    else:
        hp["epochs"] = str(epochs_done(history))
    if isinstance(summary.get("train_images"), int):
        hp["images"] = f"{summary['train_images']:,} train / {summary.get('val_images', 0):,} val"
    secs, speed = wall_seconds(summary, history), images_per_second(history)
    if secs is not None:
        hp["wall time"] = f"{secs:.0f} s" if secs < 120 else f"{secs / 60:.1f} min"
    if speed is not None:
        hp["images/s (training)"] = f"{speed:.0f}"
    if summary.get("device"):
        hp["device"] = str(summary["device"])
    return hp


def class_counts(cfg: Config | None, summary: dict, ev: Evaluation) -> list[dict]:
    """Images per class: val from the evaluation, train from the run's data (None when unknown)."""
    val = {r["class"]: int(r["support"]) for r in ev.per_class}
    train = None
    if cfg is not None:
        try:
            train = _train_counts(cfg, summary, ev.classes, val)
        except (CnnftError, OSError):
            train = None
    return [{"class": c, "train": train[c] if train else None, "val": val.get(c)} for c in ev.classes]


def _train_counts(cfg: Config, summary: dict, classes: list[str], val: dict[str, int]) -> dict[str, int] | None:
    d = cfg.data
    if d.dataset is not None:
        bundle = data.build_data(d, cfg.seed)  # packaged sets: arrays, no decoding pass
        got = Counter(bundle.train.labels)
        return {c: got[i] for i, c in enumerate(bundle.classes)}
    if d.train is None:
        return None
    found, _, labels = data.scan_folder(d.train, "data.train")  # a listing, no decoding
    if found != classes:
        return None
    got = Counter(labels)
    counts = {c: min(got[i], d.limit_per_class or got[i]) for i, c in enumerate(classes)}
    root = os.path.normpath(os.path.abspath(os.path.expanduser(str(d.train))))
    for item in summary.get("skipped") or []:  # unreadable files the run left out
        if isinstance(item, dict) and isinstance(item.get("path"), str):
            rel = Path(os.path.relpath(os.path.normpath(os.path.abspath(item["path"])), root)).parts
            if rel and rel[0] in counts:
                counts[rel[0]] -= 1
    if d.val is None:  # the validation images were split off the train folder
        counts = {c: n - val.get(c, 0) for c, n in counts.items()}
    return counts


def confused_pairs(cm: list[list[int]], classes: list[str], n: int) -> list[dict]:
    """The ``n`` largest off-diagonal cells of the confusion matrix: (true, predicted, count)."""
    m = np.asarray(cm, dtype=np.int64).copy()
    np.fill_diagonal(m, 0)
    order = np.argsort(-m, axis=None, kind="stable")[:n]
    cells = [np.unravel_index(k, m.shape) for k in order]
    return [{"true": classes[i], "pred": classes[j], "count": int(m[i, j])} for i, j in cells if m[i, j] > 0]


def wrong_predictions(run: RunDir, ev: Evaluation) -> list[dict]:
    """Every wrong prediction, most confident first: from the evaluation just made, else from
    predictions.csv at its place beside metrics.json, else the listed confident errors."""
    rows = ev.predictions
    if not rows:
        try:
            rows = metrics.read_csv(run.eval_dir("val") / "predictions.csv")
        except OSError:
            rows = []
    wrong = []
    for r in rows:
        try:
            if int(r["correct"]) == 0:
                wrong.append({"path": str(r["path"]), "true": r["true"], "pred": r["pred"], "prob": float(r["prob"])})
        except (KeyError, TypeError, ValueError):
            continue
    if not wrong:
        wrong = list(ev.confident_errors)
    return sorted(wrong, key=lambda w: -w["prob"])


class ImageAccess:
    """Thumbnails of the run's validation images, and only of those: a listed path is opened
    when it lies in a class folder of the run's data folders (by its normalised path, so '..'
    cannot climb out), and a packaged set's id is looked up in that set."""

    def __init__(self, cfg: Config | None, classes: list[str]) -> None:
        self.classes = set(classes)
        self.roots = []
        self._packaged: dict[str, int] | None = None
        self._val = None
        if cfg is None:
            return
        d = cfg.data
        self.roots = [os.path.normpath(os.path.abspath(os.path.expanduser(str(r)))) for r in (d.train, d.val) if r]
        if d.dataset is not None:
            try:
                self._val = data.build_data(d, cfg.seed).val
                self._packaged = {sid: i for i, sid in enumerate(self._val.ids)}
            except (CnnftError, OSError):
                self._val = None

    def allowed(self, path: str) -> bool:
        p = os.path.normpath(os.path.abspath(path))
        if Path(p).suffix.lower() not in data.IMAGE_EXTENSIONS:
            return False
        for root in self.roots:
            rel = Path(os.path.relpath(p, root)).parts
            if len(rel) >= 2 and rel[0] in self.classes and not any(x in ("..", "") or x.startswith(".") for x in rel):
                return True
        return False

    def thumbnail(self, sample: str) -> np.ndarray | None:
        """The image as an RGB array at most THUMBNAIL pixels a side, or None (not the run's, unreadable)."""
        try:
            if self._packaged is not None and sample in self._packaged:
                img = self._val.load(self._packaged[sample], None)
            elif self.allowed(sample):
                img = data.open_image(sample, THUMBNAIL)
            else:
                return None
            img.thumbnail((THUMBNAIL, THUMBNAIL))
            return np.asarray(img.convert("RGB"))
        except Exception:  # noqa: BLE001 - a picture that cannot be shown is a grey tile, not a failed report
            return None


@dataclass(frozen=True)
class Report:
    """A run's key figures, what the report shows, and the files written for it."""

    run: str
    status: str
    error: str | None
    model: str
    weights: str
    strategy: str
    trainable_params: int
    total_params: int
    epochs: int
    best_epoch: int
    best_val_acc: float
    final_val_acc: float | None
    final_val_loss: float | None
    wall_seconds: float | None
    images_per_second: float | None
    eval_accuracy: float | None
    eval_loss: float | None
    macro_f1: float | None
    eval_error: str | None
    hyperparameters: dict[str, str]
    class_counts: list[dict]
    confident_errors_shown: int
    error_tiles: int
    confused_pairs: list[dict]
    pair_tiles: int
    titles: dict[str, str]
    out_dir: str
    files: dict[str, str]
    eval_dir: str | None
    tune: dict | None = None  # the search's section, when the report is of a tune folder

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
