"""What a search hands back: the winner (its run folder, kept whole), ``best.yaml`` that trains it
again, the winner on ``data.test`` beside its selection score, ``tune_summary.json``, the plots,
and the other trials' checkpoints deleted (unless ``--keep-all``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import yaml

from .. import config as config_mod
from .. import files
from ..config import Config
from ..results.rundir import RunDir
from .search import Search

SUMMARY, BEST = "tune_summary.json", "best.yaml"


def finish(search: Search, study, base: Config, status: str, keep_all: bool, settings: dict,
           evaluate: Callable | None) -> dict:
    """Write the outcome of the search so far into its folder; return tune_summary.json's content."""
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state.name == "COMPLETE"]
    best, selection = winner(done, search.monitor, search.direction)
    if selection.get("kept_default"):
        search.log(f"tune: {selection['note']}")
    test = _test_score(best, base, evaluate, search.log) if best is not None and status == "completed" else None
    if best is not None:
        files.atomic_write_text(search.folder / BEST, _best_yaml(best, base))
    if not keep_all:
        _delete_checkpoints(trials, best, search.log)
    summary = {**_summary(search, trials, best, status, settings, test), "selection": selection}
    files.atomic_write_json(search.folder / SUMMARY, summary)
    _plots(study, search.folder, search.log)
    return summary


def winner(done: list, monitor: str, direction: str) -> tuple[object | None, dict]:
    """The trial the search hands back, and how it was chosen. The best value wins, except that
    on an accuracy the default plan (trial 0) is kept unless the best beats it by more than one
    standard error of the default's accuracy on the validation images (sqrt(p(1-p)/n)): with a
    small validation set the top of many trials is partly luck, and a lead within that noise
    does not carry over to new images (the README's Tuning section has the figures)."""
    if not done:
        return None, {}
    best = min(done, key=lambda t: t.value) if direction == "minimize" else max(done, key=lambda t: t.value)
    default = next((t for t in done if t.user_attrs.get("default_plan")), None)
    n = default.user_attrs.get("val_images") if default is not None else None
    if default is None or default is best or not monitor.endswith("acc") or not n:
        return best, {"rule": "best value"}
    p = min(max(float(default.value), 0.0), 1.0)
    margin = math.sqrt(p * (1 - p) / int(n))
    lead = float(best.value) - p
    selection = {"rule": "the default plan unless beaten by more than one standard error", "margin": round(margin, 6),
                 "lead": round(lead, 6), "best_by_value": best.number}
    if lead > margin:
        return best, {**selection, "kept_default": False}
    note = (f"trial {best.number}'s {monitor} {best.value:.4f} leads the default plan's {p:.4f} by {lead:.4f}, within "
            f"one standard error ({margin:.4f} on {n} validation images): the default plan (trial {default.number}) "
            "is kept")
    return default, {**selection, "kept_default": True, "note": note}


def _test_score(best, base: Config, evaluate: Callable | None, log) -> dict | None:
    """The winner's best.pt on data.test (the trials never saw it): its unbiased figure."""
    if base.data.test is None or evaluate is None:
        return None
    ev = evaluate(RunDir(best.user_attrs["run_dir"]).best, data_dir=base.data.test, device=base.train.device,
                  log=log)
    return {"accuracy": ev.accuracy, "images": ev.images, "results": str(ev.out_dir)}


def _best_yaml(best, base: Config) -> str:
    """The winner's config as a file ``cnnft train`` takes: its own plan, the base's name, output
    folder and test set, no time budget (the epochs it trained, if the budget cut them)."""
    run = RunDir(best.user_attrs["run_dir"])
    raw = yaml.safe_load(run.config.read_text(encoding="utf-8"))
    raw["name"], raw["output_dir"] = base.name, base.output_dir
    raw["data"]["test"] = base.data.test
    raw["train"]["time_budget"] = None
    if best.user_attrs.get("stopped_by"):
        raw["train"]["epochs"] = max(1, int(best.user_attrs.get("epochs") or 1))
    raw.pop("tune", None)
    cfg = config_mod.validate(raw, source=str(run.config))
    head = (f"# cnnft tune: trial {best.number}, {best.value:.4f} on validation (selected on it: optimistic)\n"
            f"# train it again: cnnft train best.yaml\n")
    return head + yaml.safe_dump({k: v for k, v in cfg.to_dict().items() if k != "tune"}, sort_keys=False)


def _delete_checkpoints(trials, best, log) -> None:
    """Only the winner keeps its checkpoints; trials still running elsewhere are left alone."""
    freed = 0
    for t in trials:
        run_dir = t.user_attrs.get("run_dir")
        if t.state.name == "RUNNING" or run_dir is None or (best is not None and t.number == best.number):
            continue
        for p in RunDir(run_dir).checkpoints.glob("*.pt") if Path(run_dir).is_dir() else []:
            freed += p.stat().st_size
            p.unlink(missing_ok=True)
    if freed:
        log(f"tune: deleted the other trials' checkpoints ({files.human_size(freed)}; --keep-all keeps them)")


def _summary(search: Search, trials, best, status: str, settings: dict, test: dict | None) -> dict:
    rows = [_trial_row(t) for t in trials]
    default = next((t for t in trials if t.user_attrs.get("default_plan") and t.state.name == "COMPLETE"), None)
    return {
        "status": status,
        "objective": search.monitor,
        "direction": search.direction,
        **settings,
        "used_seconds": round(search.clock.used(), 2),
        "trials_run": sum(1 for t in trials if t.state.name in ("COMPLETE", "PRUNED")),
        "trials_completed": sum(1 for t in trials if t.state.name == "COMPLETE"),
        "trials_pruned": sum(1 for t in trials if t.state.name == "PRUNED"),
        "trials_failed": sum(1 for t in trials if t.state.name == "FAIL"),
        "best": None if best is None else {
            "number": best.number, "value": best.value, "params": best.params,
            "default_plan": bool(best.user_attrs.get("default_plan")), "run_dir": best.user_attrs.get("run_dir"),
            "epochs": best.user_attrs.get("epochs"), "best_yaml": str(search.folder / BEST)},
        "default_plan": None if default is None else {"number": default.number, "value": default.value},
        # selected on val, so its val score is optimistic; the test score is not
        "selection_value": None if best is None else best.value,
        "test": test,
        "space": [a.describe() for a in search.space.axes],
        "trials": rows,
    }


def _trial_row(t) -> dict:
    a = t.user_attrs
    return {"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params,
            "default_plan": bool(a.get("default_plan")), "epochs": a.get("epochs"), "seconds": a.get("seconds"),
            "pruned_at": a.get("pruned_at"), "stopped_by": a.get("stopped_by"), "worker": a.get("worker")}


def _plots(study, folder: Path, log) -> None:
    """Optimization history and parameter importances (Optuna's matplotlib plots), when there
    are enough finished trials to draw them."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    for name, draw, need in (("optimization_history.png", vis.plot_optimization_history, 1),
                             ("param_importances.png", vis.plot_param_importances, 2)):
        if len(done) < need:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                ax = draw(study)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.savefig(folder / f".{name}.tmp.png", dpi=100, bbox_inches="tight")
            (folder / f".{name}.tmp.png").replace(folder / name)
            plt.close(fig)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # e.g. every trial the same params
            log(f"tune: {name} not drawn: {exc}")
