"""A run's report: the page to open after a run.

Everything lands in ``RUN/report/``: the curves (loss, accuracy, learning rate per group, with
phase boundaries when metrics.csv has a ``phase`` column), the confusion matrices, a grid of
the most confidently wrong validation images and one of the most confused class pairs, the
hyperparameters, ``report.md`` (links the PNGs beside it) and ``report.html`` (one
self-contained file, pictures embedded).

Only files at their known places in the run folder are read; image paths listed in an
evaluation are opened only when they lie in the run's own data folders (so a doctored
metrics.json cannot pull other files into a report that may be shared). The evaluation comes
from ``RUN/eval/val`` when ``evaluate`` already wrote it for the best checkpoint; otherwise the
best checkpoint is evaluated. A failed or interrupted run gets a report of what exists.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Callable

from .. import config as config_mod
from ..errors import CnnftError, InputError
from ..files import atomic_write_text, check_folder_writable
from ..results import plots
from ..results import report_data as rd
from ..results import report_page as page
from ..results import tune_report
from ..results.evaluation import Evaluation
from ..results.report_data import Report
from ..results.rundir import RunDir
from ..run import lock
from ..run.evaluation import evaluate

Log = Callable[[str], None]
ERRORS_SHOWN = 16  # tiles in the confidently-wrong grid (and rows in its table)
ERRORS_PER_ROW = 4
PAIRS_SHOWN = 4  # most confused (true, predicted) pairs, one grid row each
PAIR_EXAMPLES = 5


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def write_report(run_dir: str | Path, *, device: str = "auto", log: Log = _stderr) -> Report:
    """Write ``RUN/report/``: curves, confusion matrices, image grids, report.md and report.html.

    read the run's files -> evaluate best.pt if not done -> figures -> report.md, report.html.
    """
    run_dir = Path(run_dir).expanduser()
    if tune_report.is_tune_folder(run_dir):  # a search's folder: its winner's report, with the search
        return _write_tune_report(run_dir, device, log)
    run = RunDir(run_dir)
    if not run.metrics.is_file():
        raise InputError(f"{run_dir} has no metrics.csv; is it a cnnft run folder with at least one finished epoch?",
                         hint="pass the folder `cnnft train` printed (runs/<name>)")
    with lock.hold(run_dir, "report"):  # refused while a run trains in it; read-only folders fail here
        if os.path.islink(run.report):
            raise InputError(f"{run.report} is a symbolic link; cnnft writes its report only in a folder it made",
                             hint=f"remove the link: rm {run.report}")
        check_folder_writable(run.report, "report folder")
        return _write_report(run_dir, run, device, log)


def _write_tune_report(folder: Path, device: str, log: Log) -> Report:
    """``NAME-tune/report/``: the search (trials, winner beside the default plan, its plots) and
    the winner's run report below it, in one page."""
    tune = tune_report.read(folder)
    winner = Path(tune.winner_run)
    if not RunDir(winner).metrics.is_file():
        raise InputError(f"{winner} (the winner of {folder.name}) has no metrics.csv",
                         hint=f"resume the search to train it again: cnnft tune --resume {folder}")
    out = folder / "report"
    with lock.hold(winner, "report"):
        if os.path.islink(out):
            raise InputError(f"{out} is a symbolic link; cnnft writes its report only in a folder it made",
                             hint=f"remove the link: rm {out}")
        check_folder_writable(out, "report folder")
        out.mkdir(exist_ok=True)
        for name in tune.plots:  # beside report.md, which links them
            shutil.copyfile(folder / name, out / name)
        return _write_report(winner, RunDir(winner), device, log, out=out, tune=tune)


def _write_report(run_dir: Path, run: RunDir, device: str, log: Log, *, out: Path | None = None,
                  tune: tune_report.TuneSection | None = None) -> Report:
    history = rd.read_history(run.metrics)
    if not history:
        raise InputError(f"{run_dir}/metrics.csv has no epochs yet")
    plan = rd.read_json(run.freeze_plan)
    if plan is None:
        raise InputError(f"{run_dir} has no readable freeze_plan.json; is it a cnnft run folder?")
    summary = rd.read_json(run.summary) or {}
    cfg = _read_config(run)
    best_epoch, best_acc = rd.best_of(history, summary)
    status, error = rd.run_status(summary)
    if status == "failed":
        log(f"the run failed after {rd.epochs_done(history)} epoch(s): {error}; reporting what exists")
    elif status == rd.INCOMPLETE:
        log(f"{run_dir.name} has no summary.json: interrupted after {rd.epochs_done(history)} epoch(s) (or still running); "
            f"reporting what exists")

    ev, eval_error = _evaluation(run, device, log)
    out = out or run.report
    out.mkdir(exist_ok=True)
    head = f"{run_dir.name} · {plan['model']} · best val acc {best_acc:.1%} (epoch {best_epoch})"
    titles = _curves(out, history, head, best_epoch)
    files = {f"{k}.png": str(out / f"{k}.png") for k in titles}

    hp = rd.hyperparameters(plan, cfg, summary, history)
    counts, shown, error_tiles, pairs, pair_tiles = [], 0, 0, [], 0
    if ev is not None:
        images = rd.ImageAccess(cfg, ev.classes)
        counts = rd.class_counts(cfg, summary, ev)
        shown, error_tiles, pairs, pair_tiles = _evaluation_figures(out, run, ev, images, head, titles)
        files.update({n: str(out / n) for n in ("confusion_matrices.png", "confusion_matrix.png",
                                                "confusion_matrix_normalized.png", "top_errors.png",
                                                "confused_pairs.png")})
        files.update({"reliability.png": str(out / "reliability.png")} if "reliability" in titles else {})
    files.update({n: str(out / n) for n in (*(tune.plots if tune else ()), "report.md", "report.html")})
    rep = Report(
        run=run_dir.name, status=status, error=error, model=plan["model"], weights=plan["weights"],
        strategy=plan["strategy"], trainable_params=plan["trainable_params"], total_params=plan["total_params"],
        epochs=rd.epochs_done(history), best_epoch=best_epoch, best_val_acc=best_acc, final_val_acc=history[-1]["val_acc"],
        final_val_loss=history[-1]["val_loss"], wall_seconds=rd.wall_seconds(summary, history),
        images_per_second=rd.images_per_second(history),
        eval_accuracy=ev.accuracy if ev else None, eval_loss=ev.loss if ev else None,
        macro_f1=ev.macro_avg["f1"] if ev else None, eval_error=eval_error, hyperparameters=hp,
        class_counts=counts, confident_errors_shown=shown, error_tiles=error_tiles, confused_pairs=pairs,
        pair_tiles=pair_tiles, titles=titles, out_dir=str(out), files=files, eval_dir=ev.out_dir if ev else None,
        tune=tune.to_dict() if tune else None,
    )
    top = ev.confident_errors[:shown] if ev else []
    atomic_write_text(out / "report.md", page.markdown(rep, ev, top, tune))
    atomic_write_text(out / "report.html", page.html(rep, ev, top, out, tune))
    return rep


def _read_config(run: RunDir) -> config_mod.Config | None:
    """The run's resolved config through the schema; None when it is missing or no longer valid."""
    try:
        return config_mod.load(run.config) if run.config.is_file() else None
    except CnnftError:
        return None


def _existing_eval(run: RunDir) -> Evaluation | None:
    """The evaluation of this run's best checkpoint on its validation data, if already written
    after the checkpoint (read from its known place, never from paths the file names)."""
    path = run.eval_dir("val") / "metrics.json"
    result = rd.read_json(path)
    if not result:
        return None
    try:
        same = Path(result["checkpoint"]).resolve() == run.best.resolve()
        newer = path.stat().st_mtime >= run.best.stat().st_mtime
        ev = Evaluation.from_dict(result)
    except (KeyError, OSError, TypeError):
        return None
    return ev if same and newer else None


def _evaluation(run: RunDir, device: str, log: Log) -> tuple[Evaluation | None, str | None]:
    """The best checkpoint's evaluation, or why there is none (the report then shows the rest)."""
    ev = _existing_eval(run)
    if ev is not None:
        return ev, None
    if not run.best.is_file():
        return None, f"no best checkpoint ({run.best}): the run stopped before finishing an epoch's save"
    log("evaluating the best checkpoint on the run's validation data")
    try:
        return evaluate(run.root, device=device, log=log), None
    except CnnftError as exc:
        log(f"no evaluation in the report: {exc.message}")
        return None, exc.message


def _curves(out: Path, history: list[dict], head: str, best_epoch: int) -> dict[str, str]:
    """loss.png, accuracy.png (axis fixed at 0-1) and learning_rate.png (one line per group)."""
    epochs = [int(r["epoch"]) for r in history]
    phases = rd.phase_starts(history)
    lrs = {k[3:]: [r[k] for r in history] for k in history[0] if k.startswith("lr_")}
    specs = {
        "loss": ({"train": [r["train_loss"] for r in history], "val": [r["val_loss"] for r in history]},
                 "cross-entropy loss", None),
        "accuracy": ({"train": [r["train_acc"] for r in history], "val": [r["val_acc"] for r in history]},
                     "accuracy", (0.0, 1.0)),
        "learning_rate": (lrs, "learning rate (end of epoch)", None),
    }
    titles = {}
    for name, (series, ylabel, ylim) in specs.items():
        titles[name] = f"{head}\n{name.replace('_', ' ')}"
        plots.curve(out / f"{name}.png", epochs, series, ylabel=ylabel, title=titles[name],
                    best_epoch=best_epoch, ylim=ylim, phases=phases)
    return titles


def _evaluation_figures(out: Path, run: RunDir, ev: Evaluation, images: "rd.ImageAccess", head: str,
                        titles: dict[str, str]) -> tuple[int, int, list[dict], int]:
    """Confusion matrices and the two image grids; returns (errors listed, their tiles,
    confused pairs, their tiles). The matrices are drawn again from the numbers, not copied."""
    cm, classes = ev.confusion_matrix, ev.classes
    titles["confusion_matrices"] = f"{head}\nconfusion matrix: row-normalised and counts"
    plots.confusion_pair(out / "confusion_matrices.png", cm, classes, title=titles["confusion_matrices"])
    for name, norm in (("confusion_matrix", False), ("confusion_matrix_normalized", True)):
        titles[name] = f"{head}\nconfusion matrix ({'row-normalised' if norm else 'counts'})"
        plots.confusion(out / f"{name}.png", cm, classes, normalize=norm, title=titles[name])

    if ev.calibration and ev.calibration.get("reliability_after"):
        titles["reliability"] = f"{head}\nreliability (temperature {ev.calibration['temperature']:.3f})"
        plots.reliability(out / "reliability.png", ev.calibration["reliability_before"],
                          ev.calibration["reliability_after"], title=titles["reliability"])
    top = ev.confident_errors[:ERRORS_SHOWN]
    tiles = [plots.Tile(images.thumbnail(e["path"]), f"true: {e['true']}\npred: {e['pred']} ({e['prob']:.2f})",
                        "tab:red") for e in top]
    titles["top_errors"] = f"{head}\nmost confidently wrong ({len(top)} of {ev.images} images)"
    error_tiles = plots.image_grid(out / "top_errors.png",
                                   [tiles[i:i + ERRORS_PER_ROW] for i in range(0, len(tiles), ERRORS_PER_ROW)],
                                   title=titles["top_errors"])

    pairs = rd.confused_pairs(cm, classes, PAIRS_SHOWN)
    wrong = rd.wrong_predictions(run, ev)
    rows, labels = [], []
    for p in pairs:
        ex = [w for w in wrong if w["true"] == p["true"] and w["pred"] == p["pred"]][:PAIR_EXAMPLES]
        rows.append([plots.Tile(images.thumbnail(w["path"]), f"{Path(w['path']).name[:18]}\np={w['prob']:.2f}",
                                "tab:red") for w in ex])
        labels.append(f"{p['true']}\n→ {p['pred']}\n({p['count']}×)")
        p["examples"] = len(ex)
    titles["confused_pairs"] = f"{head}\nmost confused pairs (true → predicted)"
    pair_tiles = plots.image_grid(out / "confused_pairs.png", rows, title=titles["confused_pairs"],
                                  row_labels=labels)
    return len(top), error_tiles, pairs, pair_tiles
