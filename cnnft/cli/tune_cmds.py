"""The search command: tune."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from ..results import tables
from .. import ranges as R
from .base import _config_and_overrides, _log, _print_json, app, err, number, out
from .helpformat import Command as _Command

STORAGE_ENV = "CNNFT_TUNE_STORAGE"  # hands the database URL (and its password) to worker processes


@app.command(cls=_Command)
def tune(
    config: Optional[str] = typer.Argument(None, help="Experiment YAML file (its tune: section shapes the search)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides, e.g. tune.lr=0.001"),
    budget: Optional[str] = typer.Option(None, "--budget", help="Wall-clock budget of the whole search, final "
                                         "model included: 90s, 30m, 2h (with --resume: a new total)."),
    trials: Optional[int] = number(R.TRIALS, None, "--trials", help="Stop after this many trials (default: "
                                         "as many as the budget allows)."),
    workers: int = number(R.TUNE_WORKERS, 1, "--workers", help="Trial processes on this machine."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Study database for many machines: "
                                          "postgresql://USER:PASSWORD@HOST:PORT/DB (default: a journal file "
                                          "in the tune folder)."),
    study: Optional[str] = typer.Option(None, "--study", help="Study name (default: the tune folder's name); "
                                        "every machine of one search gives the same."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the search in this tune folder "
                                          "with the budget it has left."),
    keep_all: bool = typer.Option(False, "--keep-all", help="Keep every trial's checkpoints (default: the "
                                  "winner's only)."),
    json_out: bool = typer.Option(False, "--json", help="Print tune_summary.json on stdout."),
    join: Optional[Path] = typer.Option(None, "--join", hidden=True, help="Run as a worker of this search."),
) -> None:
    """Search fine-tuning plans within a time budget and hand back the best model.

    Trial 0 is the plan `cnnft train` would run; the others vary how many stages train, the
    learning rates, augmentation, mixup, label smoothing and the input size (the tune: section).
    Trials that trail are stopped early over epochs; every trial's epochs are fitted to the
    time left. The tune folder holds trials.jsonl, best.yaml (`cnnft train best.yaml` trains the
    winner again), the winner's run folder, tune_summary.json and the plots.
    """
    started = time.monotonic()  # the budget counts the imports below (seconds on a busy machine)
    from ..recipes import train as train_recipe
    from ..recipes import tune as tune_recipe

    storage = storage or (os.environ.get(STORAGE_ENV) if join is not None else None)
    if join is not None:
        tune_recipe.join(join, train=train_recipe.train, storage=storage, log=_log)
        return
    config, overrides = _config_and_overrides(config, overrides)
    if resume is not None and config is not None:
        raise typer.BadParameter("give either CONFIG or --resume TUNE_DIR (the search keeps its own config)")
    if resume is None and config is None and not overrides:
        raise typer.BadParameter("give a CONFIG file (or key.sub=value overrides), or --resume TUNE_DIR",
                                 param_hint="CONFIG")
    summary = tune_recipe.tune(config, overrides, budget=budget, train=train_recipe.train, trials=trials,
                               workers=workers, storage=storage, study_name=study, resume=resume,
                               keep_all=keep_all, start_worker=_start_worker, started=started, log=_log)
    if json_out:
        _print_json(summary)
        return
    _show(summary)


def _start_worker(folder: Path, storage: str | None) -> subprocess.Popen:
    """One more trial process of the search in ``folder`` on this machine."""
    env = dict(os.environ)
    if storage:
        env[STORAGE_ENV] = storage
    return subprocess.Popen([sys.executable, "-m", "cnnft", "tune", "--join", str(folder)], env=env,
                            stdout=subprocess.DEVNULL)


def _show(s: dict) -> None:
    best = s["best"]
    out.print(f"[bold]tune[/bold]: {s['trials_run']} trial(s) ({s['trials_pruned']} pruned, {s['trials_failed']} "
              f"failed) in {s['used_seconds']:.0f}s of {s['budget_seconds']:.0f}s", highlight=False)
    if best is None:
        out.print("no trial finished within the budget; give it more time (--resume DIR --budget LONGER)")
        return
    default = s["default_plan"]
    out.print(f"best: trial {best['number']}{' (the default plan)' if best['default_plan'] else ''}, "
              f"{s['objective']} {best['value']:.4f} (selected on validation: optimistic)"
              + (f"; default plan {default['value']:.4f}" if default else ""), highlight=False)
    if s["test"]:
        out.print(f"test accuracy {s['test']['accuracy']:.4f} on {s['test']['images']} images (never used to "
                  "choose)", highlight=False)
    run = tables.shown_path(best["run_dir"])
    err.print(f"next: cnnft train {tables.shown_path(best['best_yaml'])} | cnnft evaluate {run} | "
              f"cnnft predict {run} IMAGES...", highlight=False, markup=False)
