"""One worker of a search: trials until the budget, the trial count or a stop ends it.

Each trial is a ``cnnft train`` run (the fit is handed in: the caller's ``train``) in the tune
folder's ``trials/``, with the trial's plan as overrides of the base config, the time the search
has left as its ``train.time_budget``, and an epoch hook that reports the monitored value to
Optuna's pruner and stops the run when the pruner says so. Trial 0 is the base config itself:
the plan ``cnnft train`` would run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import Interrupted, TrainingFailed
from ..results import tune_report
from ..training import engine
from . import study as _study
from .clock import Clock
from .space import Space

TRIALS = "trials"
RECORDS = "trials.jsonl"


@dataclass
class Search:
    """What every trial of a search needs."""

    folder: Path
    base: Path  # the resolved base config (base.yaml)
    space: Space
    monitor: str
    direction: str
    grace: int
    n_trials: int | None
    clock: Clock
    train: Callable  # cnnft train's recipe: train(config, overrides, *, log, on_epoch_end) -> summary
    log: Callable[[str], None]
    stop: engine.StopFlag = field(default_factory=engine.StopFlag)
    ran: list[int] = field(default_factory=list)  # trials this process finished
    shortest: float = 0.0  # seconds of the shortest trial this process finished

    def better(self, a: float, b: float) -> bool:
        return a < b if self.direction == "minimize" else a > b


def work(search: Search, study) -> None:
    """Run trials in this process while the budget and ``--trials`` allow; a signal (Ctrl-C,
    SIGTERM) ends the trial under way at its next step, resumable, and then the loop."""
    with search.stop:
        while not search.stop.stopped:
            if not search.clock.can_start(_study.deadline(study), search.shortest):
                search.log(f"tune: {max(search.clock.left(_study.deadline(study)), 0):.0f}s left, too little for "
                           "another trial; the search ends")
                break
            running_elsewhere = _study.fail_stale(study)
            if search.n_trials is not None and _study.counted(study) >= search.n_trials:
                if not running_elsewhere:
                    break
                time.sleep(1.0)  # a trial under way elsewhere may yet fail and come back to be retried
                continue
            # a trial whose loss diverged fails alone; anything else ends the search
            study.optimize(lambda t: _objective(search, t), n_trials=1, catch=(TrainingFailed,),
                           callbacks=[lambda s, t: _record(search, t)], gc_after_trial=True)


def _objective(search: Search, trial) -> float:
    opt = _study.optuna()
    t0 = time.monotonic()
    params = search.space.suggest(trial)
    default = bool(trial.user_attrs.get("default_plan"))
    seconds = max(search.clock.for_trial(_study.deadline(trial.study)), 1.0)
    trial.set_user_attr("worker", _study.worker_id())
    overrides = ([] if default else search.space.overrides(params)) + [
        f"output_dir={search.folder / TRIALS}", f"name=trial-{trial.number:04d}",
        f"train.time_budget={seconds:.1f}s", "data.test=null", "train.tensorboard=false"]
    plan = "the default plan (cnnft train's)" if default else tune_report.plan_text(params)
    search.log(f"trial {trial.number}: {plan}; {seconds:.0f}s left")
    rows: list[dict] = []
    pruned: list[int] = []

    def on_epoch_end(row: dict) -> bool:
        rows.append(row)
        if search.stop.stopped:
            return False
        trial.report(float(row[search.monitor]), int(row["epoch"]))
        if row["epoch"] >= search.grace and trial.should_prune():
            pruned.append(int(row["epoch"]))
            return False
        return True

    try:
        summary = search.train(search.base, overrides, log=lambda m: search.log(f"  [{trial.number}] {m}"),
                               on_epoch_end=on_epoch_end)
    except Interrupted:
        trial.set_user_attr("interrupted", True)
        raise
    trial.set_user_attr("run_dir", summary.run_dir)
    trial.set_user_attr("epochs", summary.epochs_completed)
    trial.set_user_attr("val_images", summary.val_images)
    trial.set_user_attr("seconds", round(time.monotonic() - t0, 2))
    trial.set_user_attr("stopped_by", summary.stopped_by)
    if search.stop.stopped:
        trial.set_user_attr("interrupted", True)
        raise Interrupted(f"tune stopped during trial {trial.number}", signum=search.stop.signum or 2)
    if pruned:
        trial.set_user_attr("pruned_at", pruned[0])
        raise opt.TrialPruned(f"pruned after epoch {pruned[0]}")
    values = [float(r[search.monitor]) for r in rows]
    if not values:
        raise opt.TrialPruned("no epoch finished within the time left")
    return min(values) if search.direction == "minimize" else max(values)


def _record(search: Search, frozen) -> None:
    """trials.jsonl: one line per finished or pruned trial, as it ends."""
    if frozen.state.name not in ("COMPLETE", "PRUNED"):
        return
    a = frozen.user_attrs
    line = {"number": frozen.number, "state": frozen.state.name.lower(), "value": frozen.value,
            "objective": search.monitor, "params": frozen.params, "default_plan": bool(a.get("default_plan")),
            "epochs": a.get("epochs"), "pruned_at": a.get("pruned_at"), "seconds": a.get("seconds"),
            "stopped_by": a.get("stopped_by"), "run_dir": a.get("run_dir"), "worker": a.get("worker"),
            "retry_of": a.get("retry_of") if a.get("retry_of") is not None else _retried(frozen)}
    _study.append_line(search.folder / RECORDS, line)
    search.ran.append(frozen.number)
    seconds = float(a.get("seconds") or 0.0)
    search.shortest = seconds if not search.shortest else min(search.shortest, seconds)
    value = "pruned" if frozen.state.name == "PRUNED" else f"{search.monitor} {frozen.value:.4f}"
    search.log(f"trial {frozen.number} {frozen.state.name.lower()}: {value}, {a.get('epochs')} epoch(s) in "
               f"{a.get('seconds', 0):.0f}s" + (f", pruned after epoch {a['pruned_at']}" if a.get("pruned_at") else ""))


def _retried(frozen) -> int | None:
    history = frozen.system_attrs.get("retry_history") or []
    return history[-1] if history else None
