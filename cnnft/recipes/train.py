"""``cnnft train``: fine-tune a pretrained backbone as a config says and write a run folder.

resolve config -> build the run (:mod:`cnnft.run.build`) -> fit -> summary. The builders are
shared with ``lr-find`` and ``tune``; this module keeps the fit loop and its records.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .. import files, models, progress
from ..config import Config
from ..data import folders as data
from ..data import duplicates, mixing, transforms
from ..results import mlflow as _mlflow
from ..results import tensorboard as _tensorboard
from ..results.rundir import RunDir
from ..run import build, calibrate, checkpoint, checks
from ..run import folder as _run
from ..run import phases as _phases
from ..run import records as _records
from ..run.evaluation import evaluate
from ..run.records import TrainSummary
from ..training import budget, distributed, engine, freeze, runtime
from ..training.ema import WeightEma

# Called with each epoch's metrics.csv row (the head phase's too) once it is recorded; returning
# False ends the run there, as a finished one (checkpoints and summary.json written, status
# "stopped"). Time budgets and tuning trials (pruners, deadlines) drive a run through this.
EpochHook = Callable[[dict], bool]


def train(
    config_path: str | Path | None,
    overrides: list[str] | None = None,
    *,
    resume: str | Path | None = None,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
    progress_bar: bool = False,
    on_epoch_end: EpochHook | None = None,
    epoch_lines: bool = False,
) -> TrainSummary:
    """Fine-tune a pretrained backbone as the config says (or continue the run in ``resume``);
    write the run folder and return its summary. ``on_epoch_end`` sees each epoch's record
    and may end the run there (see :data:`EpochHook`). ``epoch_lines``: without a bar, a long
    epoch still logs plain progress lines (a log file, CI)."""
    resume = Path(resume) if resume is not None else None
    with _run.on_ctrl_c(_rerun(config_path, overrides, resume)) as disk:
        return _train(config_path, list(overrides or []), resume, log, progress_bar, disk, on_epoch_end,
                      epoch_lines and not progress_bar)


def _rerun(config_path: str | Path | None, overrides: list[str] | None, resume: Path | None) -> str:
    """The command line that starts this run again."""
    head = ["--resume", str(resume)] if resume is not None else [str(config_path)] if config_path else []
    return shlex.join(["cnnft", "train", *head, *(overrides or [])])


def _train(config_path: str | Path | None, overrides: list[str], resume: Path | None,
           log: Callable[[str], None], progress_bar: bool, disk: _run.OnDisk,
           on_epoch_end: EpochHook | None, epoch_lines: bool = False) -> TrainSummary:
    cfg, resumed = _run.resolve(config_path, overrides, resume)
    if resume is not None:  # what a Ctrl-C from here on leaves: the run's own last checkpoint
        disk.run, disk.last = RunDir(resume), None if resumed is None else (resumed["epoch"], resumed["step"])
    dd, log, progress_bar = _setup_process(cfg.train.device, resumed, log, progress_bar)
    clock = build.setup_budget(cfg.train.time_budget, resumed, dd, log)
    build.seed_everything(cfg.seed)
    rt = runtime.make_runtime(dd.device(cfg.train.device), cfg.train.amp, cfg.train.channels_last)
    writer = _tensorboard.writer((cfg.train.tensorboard or "tensorboard" in cfg.train.log_to) and dd.is_main)
    track = _mlflow.RunTracking(cfg, dd.is_main, log)

    bundle = build.setup_data(cfg.data, cfg.model.num_classes, cfg.seed, log)
    duplicates.check_before_training(cfg.data.check, bundle, log)  # exact copies across splits: one line
    bb = build.setup_backbone(cfg, len(bundle.classes))
    checks.refuse(checks.before_training(cfg, bundle.classes, [s.name for s in bb.stages]))  # as validate does
    measured = build.measure_similarity(cfg, bb, bundle, rt.device, resume, log, progress_bar)
    similar = build.is_similar(cfg.freeze.similar, bb.pretrained, measured)
    # the augmentation follows what the data is like (auto: flips and wider crops for photos)
    cfg.data.augment, cfg.data.hflip = transforms.resolve_augment(cfg.data.augment, cfg.data.hflip, similar)
    cfg.train.lr = build.resolve_lr(cfg, bundle, rt, dd, log, measured)  # before anything reads it
    plan, why = build.setup_plan(bb, cfg, len(bundle.train), measured, log)
    if resumed is not None:
        _run.check_resumable(resumed, bb, bundle, plan)
    model = build.setup_model(bb, plan, rt, build.trained_weights(resumed, cfg.train.ema is not None))
    averaged = build.setup_ema(model, cfg.train.ema, resumed)

    loaders = build.setup_loaders(cfg.data, bundle, bb.preprocess, cfg.seed, rt.pin_memory, dd)
    cached = build.train_cache(cfg, bb, plan, bundle, loaders.sampler, rt, log, progress_bar, dd)
    fit = loaders.use_cache(cached, model)
    fit = build.maybe_compiled(dd.wrap(fit, rt.device, cfg.train.sync_bn, log), cfg.train.compile)
    groups = freeze.param_groups(model, bb.stages, plan, cfg.train.weight_decay)
    optimizer = engine.build_optimizer(groups, cfg.train, build.checkpoint_part(resumed, "optimizer"))
    steps = len(loaders.train)
    start = build.schedule_start(resumed, cfg.train.epochs)
    scheduler = engine.build_scheduler(optimizer, cfg.train, steps, build.checkpoint_part(resumed, "scheduler"), start)
    scaler = build.restore(rt.grad_scaler(), build.checkpoint_part(resumed, "scaler"))
    criterion = build.setup_criterion(cfg, bundle, log)
    mix, unfreeze = build.setup_mixer(cfg, len(bundle.classes)), build.setup_unfreezing(cfg, bb, plan, dd, log)
    state = dd.own_share(build.setup_state(resumed, resume, log, cfg.train.monitor))  # last: restores the RNGs of the stop

    run = disk.run = dd.run_dir(_run.open_run_dir, cfg, resume, _records.plan_record(plan, bb, why, measured), log)
    log(_records.describe(bb, bundle, plan, rt.device))
    saved = _records.Saved({**_records.header(bb, bundle, plan, cfg), "schedule_start": start, **dd.header()},
                           model, optimizer, scheduler, scaler, disk, averaged)

    if clock is not None:
        clock.drive(scheduler, steps, cfg.train.epochs)
    # a tracker that is down never stops the run
    hook = _Hook(budget.chained(track.start(run).hook(on_epoch_end), clock, state.history), state, dd)
    with track, dd.stop_flag(engine.StopFlag(clock and clock.deadline)) as stop, \
            _run.failed_summary(run, state.history, log, write=dd.is_main):
        _run_head_phase(cfg, bb, bundle, rt, state, saved, run, writer, log, progress_bar, criterion,
                        loaders.sampler.weights, dd, cached)
        while (not stop.expired and not hook.stopped() and state.epoch < cfg.train.epochs
               and not _records.patience_spent(state, cfg.train.patience, log)):
            _Epoch(fit, loaders, optimizer, scheduler, scaler, criterion, rt, dd, saved, run, writer, log,
                   mix, averaged, unfreeze).run(state, stop, cfg, progress_bar, epoch_lines)

    bundle.skipped += loaders.lost(log)  # images deleted while it trained count as the unreadable ones
    status = "stopped" if hook.stop or stop.expired else "completed"
    by = "train.time_budget" if clock is not None and (clock.ended or stop.expired) else None
    return track.finished(_finish(replace(_records.summary(run, state, plan, bb, bundle, rt.device, status), stopped_by=by),
                                  run, bundle, cfg.train.device, dd, log))


class _Hook:
    """Hands each newly recorded epoch to ``on_epoch_end``; rank 0's answer holds for every process."""

    def __init__(self, fn: EpochHook | None, state: engine.TrainState, dd: distributed.Dist) -> None:
        self.fn, self.state, self.dd, self.seen, self.stop = fn, state, dd, len(state.history), False

    def stopped(self) -> bool:
        new, self.seen = self.state.history[self.seen:], len(self.state.history)
        if self.fn is not None and not self.stop and new:
            wants = any(self.fn(dict(row)) is False for row in new) if self.dd.is_main else None
            self.stop = bool(self.dd.from_main(wants))
        return self.stop


def _setup_process(device: str, resumed: dict | None, log: Callable[[str], None], progress_bar: bool):
    """This process's place in a torchrun job (one process otherwise); only rank 0 logs."""
    dd = distributed.setup(device)
    dd.check_resumable(resumed)
    return dd, dd.quiet(log), progress_bar and dd.is_main


@dataclass
class _Epoch:
    """What one training epoch uses; ``run`` trains it, validates it and records it."""

    fit: nn.Module
    loaders: "build.Loaders"
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler | None
    criterion: nn.Module
    rt: runtime.Runtime
    dd: distributed.Dist
    saved: "_records.Saved"
    run_dir: RunDir
    writer: Callable | None
    log: Callable[[str], None]
    mix: mixing.Mixer | None
    ema: WeightEma | None
    trainable: Callable[[int], list[str]]  # sets, and names, the stages that learn in an epoch

    def run(self, state: engine.TrainState, stop, cfg: Config, progress_bar: bool, lines: bool = False) -> None:
        """Train epoch ``state.epoch + 1`` (or the rest of it), validate, save; a stop request
        saves a resumable checkpoint and raises Interrupted."""
        epoch, steps = state.epoch, len(self.loaders.train)
        if state.step == 0:  # a new epoch, not the rest of a stopped one
            build.seed_everything(data.epoch_seed(cfg.seed, epoch))
            state.running = None
        self.loaders.position(epoch, state.step)
        trainable = self.trainable(epoch)
        self.fit.train()
        lrs = _records.lrs(self.optimizer)  # the rates this epoch starts with, as it trains with them
        loader = progress.epoch_bar(self.loaders.train, epoch, cfg.train.epochs, progress_bar,
                                    self.log if lines else None)
        state.running = self.dd.sum_running(engine.train_one_epoch(
            self.fit, loader, self.optimizer, self.scheduler, self.criterion, self.rt, epoch=epoch + 1,
            running=state.running, scaler=self.scaler, grad_clip=cfg.train.grad_clip, stop=stop,
            on_step=_after_step(getattr(loader, "on_step", None), self.ema), mix=self.mix))
        state.step = state.running.steps
        if stop.stopped and state.step < steps:
            if self.dd.is_main:
                checkpoint.save(self.saved.checkpoint(state), self.run_dir.last)
                self.saved.disk.last = (state.epoch, state.step)
            if stop.signum is None:  # train.time_budget's deadline: the run ends here, resumable
                return self.log(f"train.time_budget: deadline reached at epoch {epoch + 1}, step {state.step}/{steps}; "
                                f"resumable checkpoint saved in {self.run_dir.last}")
            raise _run.interrupted(stop.signum, self.run_dir, epoch + 1, state.step, steps)
        # validation loss is plain cross-entropy: comparable across label_smoothing values and
        # equal to what `cnnft evaluate` reports
        with self.ema.applied() if self.ema is not None else contextlib.nullcontext():  # validate the average
            ev = self.dd.evaluate(self.fit, self.loaders.val, self.rt, criterion=nn.CrossEntropyLoss())
        _records.end_epoch(state, _records.row(state, "train", lrs, state.running, ev, trainable), self.saved, self.run_dir, self.writer,
                   self.log, cfg.train.epochs, write=self.dd.is_main)
        if stop.signum is not None:
            raise _run.interrupted(stop.signum, self.run_dir, epoch + 1, 0, steps)


def _after_step(show: Callable[[engine.Running], None] | None,
                averaged: WeightEma | None) -> Callable[[engine.Running], None] | None:
    """What runs after each optimizer step: the EMA update, then the progress bar."""
    if averaged is None:
        return show

    def step(r: engine.Running) -> None:
        averaged.update()
        if show is not None:
            show(r)

    return step


def _finish(summary: TrainSummary, run: RunDir, bundle: data.DataBundle, device: str, dd: distributed.Dist,
            log: Callable[[str], None]) -> TrainSummary:
    """Calibrate the checkpoints; evaluate best.pt on data.test when there is one; write summary.json (rank 0)."""
    fit = calibrate.calibrate_run(run, bundle.val, device, log) if dd.is_main else None
    if dd.is_main and bundle.test is not None:  # best.pt was picked on val; the test set is its unbiased figure
        ev = evaluate(run.best, split="test", device=device, log=log)
        log(f"test accuracy {ev.accuracy:.4f} (best.pt, epoch {ev.epoch}) on {ev.images} images: {ev.out_dir}")
        fit = fit and {**fit, "test": ev.calibration}
        summary = replace(summary, test_acc=ev.accuracy, test_images=ev.images)
    if dd.is_main:
        files.atomic_write_json(run.summary, (summary := replace(summary, calibration=fit)).to_dict())
    return summary


def _run_head_phase(cfg: Config, bb: models.Backbone, bundle: data.DataBundle, rt: runtime.Runtime,
                    state: engine.TrainState, saved: _records.Saved, run: RunDir, writer, log, show: bool,
                    criterion: nn.Module, sample_weights: torch.Tensor | None, dd: distributed.Dist,
                    cached=None) -> None:
    """Train the new head alone first and record it as epoch 0 (a candidate for best.pt); only
    on pretrained layers (a random backbone has no features worth a probe) and only once."""
    if not (cfg.train.head_phase and bb.pretrained and not state.history and state.step == 0):
        return
    if dd.active:  # its cached features are not sharded across processes
        log("head phase: skipped under torchrun (train.head_phase runs in a single process)")
        return
    done = _phases.head_phase(cfg, bb, bundle, rt, log, show, criterion, sample_weights, cached)
    if done is not None:
        running, ev, _ = done
        lrs = {"lr_head": cfg.train.lr, "lr_backbone": None}
        _records.end_epoch(state, _records.row(state, "head", lrs, running, ev, ["head"]), saved, run, writer, log, cfg.train.epochs)


