"""A run's report: loss and accuracy curves, the confusion matrix, and ``report.md``.

Everything lands in ``RUN/report/`` (self-contained: the markdown links files beside it).
The confusion matrix comes from ``RUN/eval/val`` when ``evaluate`` already wrote it for
the best checkpoint; otherwise the best checkpoint is evaluated on the run's validation data.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import checkpoint, metrics, plots
from ..checkpoint import RunDir
from ..errors import InputError
from .evaluate import EVAL_FILES, PER_CLASS_COLUMNS, Evaluation, evaluate

Log = Callable[[str], None]
TOP_ERRORS_SHOWN = 5
FIGURES = {"confusion_png": "confusion_matrix.png", "confusion_normalized_png": "confusion_matrix_normalized.png"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


@dataclass(frozen=True)
class Report:
    """A run's key figures and the report files written for it."""

    run: str
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
    eval_accuracy: float
    eval_loss: float
    macro_f1: float
    out_dir: str
    files: dict[str, str]
    eval_dir: str
    status: str  # completed, failed or interrupted
    error: str | None  # why a failed run stopped

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _float(v: str) -> float | str | None:
    """A metrics.csv cell: a number, None when empty, the text itself otherwise (the phase)."""
    if v in ("", None):
        return None
    try:
        return float(v)
    except ValueError:
        return v


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _existing_eval(run: RunDir) -> Evaluation | None:
    """The evaluation of this run's best checkpoint on its validation data, if already written.

    Only the files at their known places in ``RUN/eval/val/`` are used, never paths read from
    metrics.json: a doctored run folder must not make the report copy files from elsewhere."""
    folder = run.eval_dir("val")
    metrics_json = folder / EVAL_FILES["metrics"]
    result = _read_json(metrics_json)
    if not result:
        return None
    try:
        same = Path(result["checkpoint"]).resolve() == run.best.resolve()
        newer = metrics_json.stat().st_mtime >= run.best.stat().st_mtime
        pngs = all(_is_png(folder / EVAL_FILES[k]) for k in FIGURES)
        ev = Evaluation.from_dict(result)
    except (KeyError, OSError, TypeError, ValueError):
        return None
    return ev if same and newer and pngs else None


def _is_png(path: Path) -> bool:
    """A regular file (not a link to one elsewhere) that starts as a PNG does."""
    try:
        if path.is_symlink() or not path.is_file():
            return False
        with open(path, "rb") as f:
            return f.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
    except OSError:
        return False


def _status(summary: dict | None, epochs: int) -> tuple[str, str | None]:
    """How the run ended: completed, failed (with its error) or interrupted (no summary of
    these epochs: stopped, killed, or still running)."""
    if summary and summary.get("epochs_completed") == epochs and summary.get("status") in ("completed", "failed"):
        return summary["status"], summary.get("error") if summary["status"] == "failed" else None
    return "interrupted", None


def write_report(run_dir: str | Path, *, device: str = "auto", log: Log = _stderr) -> Report:
    """Write ``RUN/report/``: loss.png, accuracy.png, the confusion matrices and report.md.

    read metrics.csv -> plot curves -> evaluate best.pt if not done -> write report.md.
    """
    run_dir = Path(run_dir).expanduser()
    run = RunDir(run_dir)
    if not run.metrics.is_file():
        raise InputError(f"{run_dir} has no metrics.csv; is it a cnnft run folder with at least one finished epoch?",
                         hint="pass the folder `cnnft train` printed (runs/<name>)")
    history = [{k: _float(v) for k, v in row.items()} for row in metrics.read_csv(run.metrics)]
    if not history:
        raise InputError(f"{run_dir}/metrics.csv has no epochs yet")
    plan = _read_json(run.freeze_plan)
    if plan is None:
        raise InputError(f"{run_dir} has no readable freeze_plan.json; is it a cnnft run folder?")
    epochs = [int(r["epoch"]) for r in history]
    val_acc = [r["val_acc"] for r in history]
    # from metrics.csv whatever the run's fate: the first epoch with the highest val accuracy,
    # as training picks it (a failed or stopped run has no summary of its epochs)
    best_acc = max(v for v in val_acc if v is not None)
    best_epoch = epochs[val_acc.index(best_acc)]
    summary = _read_json(run.summary)
    status, error = _status(summary, len(history))
    summary = summary if status != "interrupted" else None  # an earlier process's, not these epochs'
    if status != "completed":
        log(f"the run {status} after {len(history)} epoch(s); reporting the epochs it finished")

    out = run.report
    out.mkdir(exist_ok=True)
    plots.curve(out / "loss.png", epochs, {"train": [r["train_loss"] for r in history],
                                           "val": [r["val_loss"] for r in history]},
                ylabel="cross-entropy loss", title="Loss", best_epoch=best_epoch)
    plots.curve(out / "accuracy.png", epochs, {"train": [r["train_acc"] for r in history], "val": val_acc},
                ylabel="accuracy", title="Accuracy", best_epoch=best_epoch)

    ev, folder = _existing_eval(run), run.eval_dir("val")
    if ev is None:
        log("evaluating the best checkpoint on the run's validation data")
        ev = evaluate(run_dir, device=device, log=log)
        folder = Path(ev.out_dir)
    for key, name in FIGURES.items():  # from their known place: ev.files may come from a doctored metrics.json
        checkpoint.atomic_write_bytes(out / name, (folder / EVAL_FILES[key]).read_bytes())

    files = {n: str(out / n) for n in ("report.md", "loss.png", "accuracy.png", "confusion_matrix.png",
                                      "confusion_matrix_normalized.png")}
    rep = Report(
        run=run_dir.name, model=plan["model"], weights=plan["weights"], strategy=plan["strategy"],
        trainable_params=plan["trainable_params"], total_params=plan["total_params"], epochs=len(history),
        best_epoch=best_epoch, best_val_acc=best_acc, final_val_acc=val_acc[-1],
        final_val_loss=history[-1]["val_loss"], wall_seconds=(summary or {}).get("wall_seconds"),
        eval_accuracy=ev.accuracy, eval_loss=ev.loss, macro_f1=ev.macro_avg["f1"],
        out_dir=str(out), files=files, eval_dir=str(folder), status=status, error=error,
    )
    checkpoint.atomic_write_text(out / "report.md", _markdown(rep, ev, summary))
    return rep


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2%}"


def _markdown(f: Report, ev: Evaluation, summary: dict | None) -> str:
    trainable = (f"{f.trainable_params:,} of {f.total_params:,} "
                 f"({f.trainable_params / max(f.total_params, 1):.2%})")
    lines = [
        f"# Run report: {f.run}",
        "",
        "| | |",
        "|---|---|",
        f"| status | {f.status}{f': {f.error}' if f.error else ''} |",
        f"| model | {f.model} ({f.weights}) |",
        f"| strategy | {f.strategy} |",
        f"| trainable parameters | {trainable} |",
        f"| epochs | {f.epochs} |",
        f"| best val accuracy | {_pct(f.best_val_acc)} (epoch {f.best_epoch}) |",
        f"| final val accuracy | {_pct(f.final_val_acc)} |",
        f"| classes | {len(ev.classes)}: {', '.join(ev.classes[:20])}{' ...' if len(ev.classes) > 20 else ''} |",
    ]
    if summary and "train_images" in summary:  # a failed run's summary does not count them
        lines.append(f"| images | {summary['train_images']} train / {summary['val_images']} val |")
    if f.wall_seconds is not None:
        lines.append(f"| training time | {f.wall_seconds:.0f} s |")
    lines += [
        "",
        "## Training curves",
        "",
        "![loss](loss.png)",
        "",
        "![accuracy](accuracy.png)",
        "",
        f"## Validation: {Path(ev.checkpoint).name} (epoch {ev.epoch}) on {ev.data}",
        "",
        f"Accuracy **{_pct(ev.accuracy)}**"
        + (f", top-5 {_pct(ev.top5_accuracy)}" if ev.top5_accuracy is not None else "")
        + f", loss {ev.loss:.4f}, macro F1 {ev.macro_avg['f1']:.4f} over {ev.images} images.",
        "",
        "| " + " | ".join(PER_CLASS_COLUMNS) + " |",
        "|---|---:|---:|---:|---:|",
    ]
    per_class, averages = ev.per_class_table()
    lines += ["| " + " | ".join(cells) + " |" for cells in per_class]
    lines += ["| " + " | ".join([f"*{name}*", *rest]) + " |" for name, *rest in averages]
    lines += ["", "![confusion matrix](confusion_matrix.png)", "",
              "![confusion matrix, row-normalised](confusion_matrix_normalized.png)", ""]
    if ev.confident_errors:
        lines += ["### Most confidently wrong", "", "| image | true | predicted | probability |", "|---|---|---|---:|"]
        for e in ev.confident_errors[:TOP_ERRORS_SHOWN]:
            lines.append(f"| {e['path']} | {e['true']} | {e['pred']} | {e['prob']:.3f} |")
        lines.append("")
    lines.append(f"Full results: `{f.eval_dir}` (metrics.json, predictions.csv, per_class.csv).")
    return "\n".join(lines) + "\n"
