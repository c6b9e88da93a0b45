"""``cnnft tune``: the best model a time budget buys, by a measured search over fine-tuning plans.

resolve -> tune folder -> the default plan and the search space -> the study on its storage
-> trials (this process and ``--workers - 1`` more, or other machines on the same database)
-> the winner, best.yaml, the test score, the summary. Every trial is a ``cnnft train`` run;
the fit is handed in by the caller (recipes do not import each other).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

from .. import config as config_mod
from .. import files, models
from ..config import Config
from ..data import transforms
from ..errors import InputError, Interrupted
from ..run import build
from ..training import runtime
from ..tuning import outcome, search, space
from ..tuning import study as _study
from ..tuning.clock import Clock, used_before

BASE, SETTINGS = "base.yaml", "tune.json"
Log = Callable[[str], None]


def tune(config_path: str | Path | None, overrides: list[str] | None, *, budget: str | None,
         train: Callable, trials: int | None = None, workers: int = 1, storage: str | None = None,
         study_name: str | None = None, resume: str | Path | None = None, keep_all: bool = False,
         start_worker: Callable[[Path, str | None], object] | None = None, started: float | None = None,
         log: Log = lambda m: print(m, file=sys.stderr)) -> dict:
    """Search fine-tuning plans of the config within ``budget`` (``20m``; with ``resume``, the
    budget left is used unless a new total is given); return tune_summary.json's content. The
    search's time runs from ``started`` (``time.monotonic()``; default: now): the command's imports,
    setup and the default plan's measurement count."""
    started = time.monotonic() if started is None else started
    seconds = _seconds(budget)
    _study.check_storage(storage, workers)
    _study.optuna()
    if resume is not None:
        folder, base, settings = _reopen(Path(resume), seconds, trials, storage)
        used = settings["used_before"]
    else:
        base = config_mod.load(config_path, overrides)
        files.check_writable(base.output_dir)
        if seconds is None:
            raise InputError("--budget: the search needs a time budget, e.g. --budget 30m (90s, 20m, 2h)")
        folder = _tune_folder(base, storage is not None)
        settings, used = _new_settings(folder, base, seconds, trials, storage, study_name, workers, log), 0.0
    clock = Clock(settings["budget_seconds"], used, started)
    if clock.left() <= 0:
        raise InputError(f"{folder}: the search has used its whole budget ({settings['budget_seconds']:.0f}s)",
                         hint=f"give it more: cnnft tune --resume {folder} --budget LONGER")
    s, st = _open(folder, base, settings, storage, clock, train, log, joined=storage is not None)
    if resume is None and not st.get_trials(deepcopy=False):  # (a second machine starting at once: deduplicated)
        st.enqueue_trial(settings["default_params"], user_attrs={"default_plan": True}, skip_if_exists=True)
    if resume is not None or storage is None:
        _study.set_deadline(st, clock.deadline_unix)  # joiners on other machines keep the first one's
    elif _study.deadline(st) is None:
        _study.set_deadline(st, clock.deadline_unix)
    if resume is not None:
        _study.requeue_unfinished(st, log)
    log(f"tune: {folder}; objective {s.monitor} ({s.direction}); budget {clock.budget:.0f}s, "
        f"{max(clock.left(_study.deadline(st)), 0):.0f}s left; searching {', '.join(a.describe() for a in s.space.searched())}")
    helpers = [start_worker(folder, storage) for _ in range(workers - 1)] if start_worker else []
    return _run(s, st, base, settings, folder, helpers, keep_all)


def join(folder: str | Path, *, train: Callable, storage: str | None = None,
         log: Log = lambda m: print(m, file=sys.stderr)) -> None:
    """One more worker process of the search in ``folder`` (``--workers``): trials until the
    search's deadline or trial count; the process that started the search writes its outcome."""
    folder = Path(folder)
    base, settings = _load(folder)
    clock = Clock(settings["budget_seconds"])
    s, st = _open(folder, base, settings, storage, clock, train, log, joined=True)
    search.work(s, st)


def _run(s: search.Search, st, base: Config, settings: dict, folder: Path, helpers: list, keep_all: bool) -> dict:
    summary_settings = {k: settings[k] for k in ("budget_seconds", "study", "storage", "trials", "grace_epochs",
                                                 "pruner")}
    try:
        search.work(s, st)
    except Interrupted as exc:
        _stop(helpers)
        s.clock.save(folder)
        outcome.finish(s, st, base, "interrupted", True, summary_settings, None)
        exc.hint = f"resume the search with the budget left: cnnft tune --resume {folder}"
        raise
    for p in helpers:
        if p.wait() != 0:
            s.log(f"tune: a worker process ended with exit code {p.returncode}; a trial it left running "
                  "runs again on --resume")
    from ..run.evaluation import evaluate

    summary = outcome.finish(s, st, base, "completed", keep_all, summary_settings, evaluate)
    s.clock.save(folder)
    summary = {**summary, "used_seconds": round(s.clock.used(), 2), "tune_dir": str(folder)}
    files.atomic_write_json(folder / outcome.SUMMARY, summary)
    return summary


def _stop(helpers: list) -> None:
    import signal

    for p in helpers:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in helpers:
        p.wait()  # each stops its trial at the next step, resumable, and leaves the study consistent


def _seconds(budget: str | None) -> float | None:
    if budget is None:
        return None
    try:
        return config_mod.duration_seconds(budget)
    except ValueError as exc:
        raise InputError(f"--budget: {exc}") from None


def _tune_folder(base: Config, shared: bool) -> Path:
    """NAME-tune in the output folder: a new one (NAME-tune-2...) for a search of its own; the
    same one for every machine of a search on a shared database."""
    parent = Path(base.output_dir).expanduser()
    parent.mkdir(parents=True, exist_ok=True)
    if shared:
        folder = parent / f"{base.name}-tune"
        folder.mkdir(exist_ok=True)
        return folder
    for i in range(1, 10_000):
        folder = parent / (f"{base.name}-tune" if i == 1 else f"{base.name}-tune-{i}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise InputError(f"output_dir: too many searches named {base.name} in {parent}; choose another name")


def _new_settings(folder: Path, base: Config, seconds: float, trials: int | None, storage: str | None,
                  study_name: str | None, workers: int, log: Log) -> dict:
    """Resolve the default plan and the space's inputs once; save base.yaml and tune.json."""
    if (folder / SETTINGS).is_file():  # another machine of the same search made it first
        return json.loads((folder / SETTINGS).read_text(encoding="utf-8"))
    body, native, smallest, default = _default_plan(base, log)
    sp = space.build(base, body, native, smallest, include=default)
    settings = {
        "study": study_name or folder.name, "storage": _study.masked(storage) if storage else "journal",
        "budget_seconds": seconds, "trials": trials, "workers": workers,
        "grace_epochs": base.tune.grace_epochs, "pruner": base.tune.pruner,
        "space_inputs": {"body_stages": body, "native_size": native, "smallest_size": smallest},
        "default_params": {a.name: default[a.name] for a in sp.searched()},
    }
    files.atomic_write_text(folder / BASE, _yaml(base.to_dict()))
    files.atomic_write_json(folder / SETTINGS, settings)
    return settings


def _default_plan(cfg: Config, log: Log) -> tuple[int, int, int, dict]:
    """What ``cnnft train`` would run on this config, as a point of the space (the same builders)."""
    bundle = build.setup_data(cfg.data, cfg.model.num_classes, cfg.seed, log)
    bb = models.build(cfg.model.backbone, cfg.model.weights, len(bundle.classes))
    native = bb.preprocess.crop_size  # the weights' own size, before data.image_size (setup_backbone's steps)
    build.check_input_size(bb, cfg.data.image_size)
    bb.preprocess = bb.preprocess.with_size(cfg.data.image_size)
    device = runtime.make_runtime(cfg.train.device, cfg.train.amp, cfg.train.channels_last).device
    measured = build.measure_similarity(cfg, bb, bundle, device, None, log, False)
    similar = build.is_similar(cfg.freeze.similar, bb.pretrained, measured)
    augment, _ = transforms.resolve_augment(cfg.data.augment, cfg.data.hflip, similar)
    plan, _ = build.setup_plan(bb, cfg, len(bundle.train), measured, lambda m: None)
    body = len([s for s in bb.stages if s.name not in ("stem", "head")])
    depth = space.depth_of(plan.strategy, [s.frozen for s in plan.stages if s.name != "head"], body)
    lr = cfg.train.lr if cfg.train.lr != "auto" else build.default_lr()
    default = {"trainable_stages": depth, "lr": lr, "backbone_lr_scale": cfg.train.backbone_lr_scale,
               "layer_decay": cfg.train.layer_decay, "augment": augment, "mixup": cfg.train.mixup,
               "label_smoothing": cfg.train.label_smoothing, "image_size": cfg.data.image_size or native}
    log(f"tune: cnnft train's plan here is {plan.strategy} ({depth} of {body + 1} stages train); it runs first")
    return body, native, models.min_input(bb.model), default


def _open(folder: Path, base: Config, settings: dict, storage: str | None, clock: Clock, train: Callable,
          log: Log, joined: bool = False):
    inputs = settings["space_inputs"]
    sp = space.build(base, inputs["body_stages"], inputs["native_size"], inputs["smallest_size"],
                     include=settings["default_params"])
    monitor = base.train.monitor
    direction = "minimize" if monitor == "val_loss" else "maximize"
    prune = _study.pruner(base.tune.pruner, base.tune.grace_epochs, base.train.epochs, base.tune.reduction_factor)
    store = _study.storage(folder, storage, base.tune.heartbeat)
    st = _study.open_study(settings["study"], store, direction, prune, base.seed, joined)
    s = search.Search(folder, folder / BASE, sp, monitor, direction, base.tune.grace_epochs, settings["trials"],
                      clock, train, log)
    return s, st


def _load(folder: Path) -> tuple[Config, dict]:
    if not (folder / SETTINGS).is_file() or not (folder / BASE).is_file():
        raise InputError(f"{folder}: not a cnnft tune folder (no {SETTINGS} / {BASE})",
                         hint="pass the folder cnnft tune printed (OUTPUT_DIR/NAME-tune)")
    base = config_mod.load(folder / BASE)
    return base, json.loads((folder / SETTINGS).read_text(encoding="utf-8"))


def _reopen(folder: Path, seconds: float | None, trials: int | None, storage: str | None) -> tuple[Path, Config, dict]:
    """A stopped search's folder, config and settings, with the budget it has left (or a new total)."""
    if not folder.is_dir():
        raise InputError(f"--resume: tune folder not found: {folder}")
    base, settings = _load(folder)
    if settings["storage"] != "journal" and storage is None:
        raise InputError(f"--resume: the search in {folder} uses the database {settings['storage']}",
                          hint="pass its --storage URL again")
    total, used = used_before(folder)
    settings["budget_seconds"] = seconds if seconds is not None else (total or settings["budget_seconds"])
    settings["used_before"] = used
    if trials is not None:
        settings["trials"] = trials
    return folder, base, settings


def _yaml(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)
