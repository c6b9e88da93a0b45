"""``cnnft train``: fine-tune a pretrained backbone as a config says and write a run folder.

resolve config -> data -> model -> freeze plan -> optimizer, schedule -> fit -> summary.
Each builder takes its own config section and, when a run is resumed, restores its own
part of the checkpoint where it is built.
"""

from __future__ import annotations

import copy
import random
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .. import __version__, cache, checkpoint, data, engine, freeze, metrics, models, progress, runtime, strategies, transforms
from ..checkpoint import RunDir
from ..config import Config, DataConfig
from ..errors import ConfigError
from ..freeze import FreezePlan
from . import _cached, _phases, _run, _tensorboard


@dataclass(frozen=True)
class TrainSummary:
    """What a completed run reports; ``to_dict()`` is its summary.json and ``--json`` output."""

    status: str
    run_dir: str
    best_val_acc: float
    best_epoch: int
    final_val_acc: float | None
    final_val_loss: float | None
    epochs_completed: int
    wall_seconds: float
    checkpoints: dict[str, str]
    model: str
    weights: str
    strategy: str
    trainable_params: int
    total_params: int
    classes: list[str]
    train_images: int
    val_images: int
    skipped_images: int
    skipped: list[dict]
    device: str

    def to_dict(self) -> dict:
        """The summary as plain JSON-ready values, keys in summary.json's order."""
        return asdict(self)


def train(
    config_path: str | Path | None,
    overrides: list[str] | None = None,
    *,
    resume: str | Path | None = None,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
    progress_bar: bool = False,
) -> TrainSummary:
    """Fine-tune a pretrained backbone as the config says (or continue the run in ``resume``);
    write the run folder and return its summary."""
    resume = Path(resume) if resume is not None else None
    with _run.on_ctrl_c(_rerun(config_path, overrides, resume)) as disk:
        return _train(config_path, list(overrides or []), resume, log, progress_bar, disk)


def _rerun(config_path: str | Path | None, overrides: list[str] | None, resume: Path | None) -> str:
    """The command line that starts this run again."""
    head = ["--resume", str(resume)] if resume is not None else [str(config_path)] if config_path else []
    return shlex.join(["cnnft", "train", *head, *(overrides or [])])


def _train(config_path: str | Path | None, overrides: list[str], resume: Path | None,
           log: Callable[[str], None], progress_bar: bool, disk: _run.OnDisk) -> TrainSummary:
    cfg, resumed = _run.resolve(config_path, overrides, resume)
    if resume is not None:  # what a Ctrl-C from here on leaves: the run's own last checkpoint
        disk.run, disk.last = RunDir(resume), None if resumed is None else (resumed["epoch"], resumed["step"])
    cfg.data.augment, cfg.data.hflip = transforms.resolve_augment(cfg.data.augment, cfg.data.hflip, cfg.freeze.similar)
    seed_everything(cfg.seed)
    rt = runtime.make_runtime(cfg.train.device, cfg.train.amp, cfg.train.channels_last)
    writer = _tensorboard.writer(cfg.train.tensorboard)

    bundle = _setup_data(cfg.data, cfg.model.num_classes, cfg.seed, log)
    bb = models.build(cfg.model.backbone, cfg.model.weights, len(bundle.classes))
    _check_input_size(bb, cfg.data.image_size)
    bb.preprocess = bb.preprocess.with_size(cfg.data.image_size)  # checkpoints record what was used
    plan, why = _setup_plan(bb, cfg, len(bundle.train), log)
    if resumed is not None:
        _run.check_resumable(resumed, bb, bundle.classes, plan)
    model = _setup_model(bb, plan, rt, _part(resumed, "model"))

    loaders = _setup_loaders(cfg.data, bundle, bb.preprocess, cfg.seed, rt.pin_memory)
    fit = loaders.use_cache(_cached.setup(cfg, bb, plan.frozen, bundle, loaders.sampler, rt, log, progress_bar), model)
    groups = freeze.param_groups(model, bb.stages, plan, cfg.train.weight_decay)
    optimizer = engine.build_optimizer(groups, cfg.train, _part(resumed, "optimizer"))
    steps = len(loaders.train)
    start = _schedule_start(resumed, cfg.train.epochs)
    scheduler = engine.build_scheduler(optimizer, cfg.train, steps, _part(resumed, "scheduler"), start)
    scaler = _restored(rt.grad_scaler(), _part(resumed, "scaler"))
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    state = _setup_state(resumed, resume, log, cfg.train.monitor)  # last: restores the RNGs of the stop

    run = disk.run = _run.open_run_dir(cfg, resume, _plan_record(plan, bb, why), log)
    log(_describe(bb, bundle, plan, rt.device))
    saved = _Saved({**_header(bb, bundle, plan, cfg), "schedule_start": start}, model, optimizer, scheduler, scaler, disk)

    with engine.StopFlag() as stop, _run.failed_summary(run, state.history, log):
        _run_head_phase(cfg, bb, bundle, rt, state, saved, run, writer, log, progress_bar)
        while state.epoch < cfg.train.epochs and not _patience_spent(state, cfg.train.patience, log):
            epoch = state.epoch
            if state.step == 0:  # a new epoch, not the rest of a stopped one
                seed_everything(data.epoch_seed(cfg.seed, epoch))
                state.running = None
            loaders.position(epoch, state.step)
            fit.train()
            lrs = _lrs(optimizer)  # the rates this epoch starts with, as it trains with them
            loader = _progress(loaders.train, epoch, cfg.train.epochs, progress_bar)
            state.running = engine.train_one_epoch(
                fit, loader, optimizer, scheduler, criterion, rt, epoch=epoch + 1,
                running=state.running, scaler=scaler, grad_clip=cfg.train.grad_clip, stop=stop,
                on_step=getattr(loader, "on_step", None))
            state.step = state.running.steps
            if stop.stopped and state.step < steps:
                checkpoint.save(saved.checkpoint(state), run.last)
                disk.last = (state.epoch, state.step)
                raise _run.interrupted(stop.signum, run, epoch + 1, state.step, steps)
            # validation loss is plain cross-entropy: comparable across label_smoothing values and
            # equal to what `cnnft evaluate` reports
            ev = engine.evaluate(fit, loaders.val, rt, criterion=nn.CrossEntropyLoss())
            _end_epoch(state, _row(state, "train", lrs, state.running, ev), saved, run, writer, log, cfg.train.epochs)
            if stop.stopped:
                raise _run.interrupted(stop.signum, run, epoch + 1, 0, steps)

    summary = _summary(run, state, plan, bb, bundle, rt.device)
    checkpoint.atomic_write_json(run.summary, summary.to_dict())
    return summary


def _describe(bb: models.Backbone, bundle: data.DataBundle, plan: FreezePlan, device: torch.device) -> str:
    return (f"{bb.name} ({bb.weights}) -> {len(bundle.classes)} classes, strategy {plan.strategy}: "
            f"{plan.trainable_params:,} of {plan.total_params:,} parameters train; "
            f"{len(bundle.train)} train / {len(bundle.val)} val images; device {device}")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _part(resumed: dict | None, key: str):
    """One piece of a resumed run's checkpoint; None for a new run."""
    return None if resumed is None else resumed[key]


def _restored(obj, state: dict | None):
    """``obj`` with ``state`` loaded into it when both exist (a resumed run)."""
    if obj is not None and state is not None:
        obj.load_state_dict(state)
    return obj


# ------------------------------------------------------------------------------- builders

def _setup_data(cfg: DataConfig, num_classes: int | None, seed: int, log: Callable[[str], None]) -> data.DataBundle:
    """The training and validation images, checked against ``model.num_classes``."""
    bundle = data.build_data(cfg, seed, log)
    if num_classes is not None and num_classes != len(bundle.classes):
        raise ConfigError(f"model.num_classes: {num_classes} but the data has "
                          f"{len(bundle.classes)} classes ({', '.join(bundle.classes[:10])}); "
                          f"remove model.num_classes or set it to {len(bundle.classes)}")
    if bundle.skipped:
        log(f"skipping {len(bundle.skipped)} unreadable image(s):")
        for p, why in bundle.skipped:
            log(f"  {p}: {why}")
    return bundle


def _check_input_size(bb: models.Backbone, size: int | None) -> None:
    """Refuse an image size the architecture cannot run on, before the run folder exists
    (None: the weights' own size, which always fits)."""
    smallest = models.min_input(bb.model)
    if size is not None and size < smallest:
        raise ConfigError(f"data.image_size: {bb.name} needs inputs of at least {smallest} px (got {size}); "
                          f"set data.image_size={max(smallest, bb.preprocess.crop_size)}")


def _setup_plan(bb: models.Backbone, cfg: Config, n_images: int, log: Callable[[str], None]) -> tuple[FreezePlan, str | None]:
    """The freeze plan for ``bb`` (``auto`` resolved from the data's size) and why, if chosen."""
    n_classes = bb.num_classes
    size = strategies.size_class(n_images, n_classes)
    strategy, why = strategies.choose_strategy(cfg.freeze.strategy, size=size, similar=cfg.freeze.similar,
                                           pretrained=bb.pretrained, weights=cfg.model.weights,
                                           size_reason=f"{n_images} images / {n_classes} classes is '{size}'")
    if why:
        log(why)
    plan = freeze.make_plan(bb.model, bb.stages, strategy, cfg.train.lr, cfg.train.backbone_lr_scale,
                            pretrained=bb.pretrained, frozen_stages=cfg.freeze.frozen_stages,
                            trainable_stages=cfg.freeze.trainable_stages)
    return plan, why


def _setup_model(bb: models.Backbone, plan: FreezePlan, rt: runtime.Runtime, state: dict | None) -> nn.Module:
    """The model frozen as ``plan`` says, on the runtime's device, with a resumed run's weights."""
    freeze.apply_plan(bb.model, bb.stages, plan)
    rt.prepare(bb.model)
    return _restored(bb.model, state)


@dataclass
class _Loaders:
    """The training loader, positioned per epoch (and per step, when resuming), and the validation one."""

    train: torch.utils.data.DataLoader
    val: torch.utils.data.DataLoader
    dataset: data.ImageDataset  # the training images, augmented per (seed, epoch, image)
    sampler: data.EpochSampler
    generator: torch.Generator
    seed: int
    batch_size: int
    views: "cache.CachedFeatures | None" = None

    def position(self, epoch: int, step: int) -> None:
        """Serve ``epoch``'s batches from ``step`` on, as a run that never stopped saw them."""
        self.generator.manual_seed(self.seed * 7_919 + epoch * 104_729 + step)
        self.sampler.set_epoch(epoch, start=step * self.batch_size)
        self.dataset.set_epoch(epoch)
        if self.views is not None:
            self.views.set_epoch(epoch)

    def use_cache(self, cached: "_cached.Cached | None", model: nn.Module) -> nn.Module:
        """Train and validate from stored activations when ``cached``; return the module to fit."""
        if cached is None:
            return model
        self.train, self.val, self.views = cached.train, cached.val, cached.views
        return cached.rest


def _setup_loaders(cfg: DataConfig, bundle: data.DataBundle, pre: models.Preprocess, seed: int, pin: bool) -> _Loaders:
    """Training (augmented, shuffled per epoch) and validation loaders."""
    draft = pre.resize_size
    train_ds = data.ImageDataset(bundle.train, transforms.train_transform(pre, cfg.augment, cfg.hflip), draft, seed)
    val_ds = data.ImageDataset(bundle.val, transforms.eval_transform(pre), draft)
    sampler = data.EpochSampler(len(train_ds), seed, shuffle=True)
    gen = torch.Generator()
    train_loader = data.make_loader(train_ds, cfg.batch_size, cfg.num_workers, sampler=sampler, generator=gen, pin_memory=pin)
    val_loader = data.make_loader(val_ds, cfg.batch_size, cfg.num_workers, pin_memory=pin)
    return _Loaders(train_loader, val_loader, train_ds, sampler, gen, seed, cfg.batch_size)


def _setup_state(resumed: dict | None, run_dir: Path | None, log: Callable[[str], None],
                 monitor: str) -> engine.TrainState:
    """A new loop state, or a resumed run's with the RNG states it stopped with."""
    state = engine.TrainState(monitor=monitor)
    if resumed is not None:
        state.load_state_dict(resumed)
        checkpoint.set_rng_state(resumed["rng"])
        log(f"resuming {run_dir} after epoch {state.epoch}" + (f", step {state.step}" if state.step else ""))
    elif run_dir is not None:
        log(f"{run_dir} holds no finished epoch (no checkpoints/last.pt): starting it fresh from epoch 1")
    return state


# ---------------------------------------------------------------------- records of the run

def _plan_record(plan: FreezePlan, bb: models.Backbone, why: str | None) -> dict:
    """freeze_plan.json: the plan and the model it was made for."""
    return {**plan.to_dict(), "model": bb.name, "weights": bb.weights, "pretrained": bb.pretrained,
            "num_classes": bb.num_classes, "auto": why}


def _header(bb: models.Backbone, bundle: data.DataBundle, plan: FreezePlan, cfg: Config) -> dict:
    """What every checkpoint of a run says about itself: enough to use it with nothing else."""
    return {
        "format": checkpoint.FORMAT,
        "version": checkpoint.VERSION,
        "cnnft_version": __version__,
        "model_name": bb.name,
        "weights": bb.weights,
        "pretrained": bb.pretrained,
        "num_classes": bb.num_classes,
        "classes": list(bundle.classes),
        "preprocess": bb.preprocess.to_dict(),
        "freeze_plan": plan.to_dict(),
        "skipped_images": [list(s) for s in bundle.skipped],
        "config": cfg.to_dict(),
    }


@dataclass
class _Saved:
    """What a checkpoint holds: the run's header and the state of what training changes."""

    header: dict
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler | None
    disk: _run.OnDisk  # updated as last.pt is written

    def checkpoint(self, state: engine.TrainState) -> dict:
        """A resumable checkpoint at ``state``."""
        return {
            **self.header,
            **state.state_dict(),
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": checkpoint.rng_state(),
        }


def _lrs(optimizer: torch.optim.Optimizer) -> dict[str, float | None]:
    """The current rate of the head and of the trainable pretrained stages (None: none train)."""
    rates = {g["name"].removesuffix("_no_decay"): g["lr"] for g in optimizer.param_groups}
    return {"lr_head": rates.get("head"), "lr_backbone": rates.get("backbone")}


def _row(state: engine.TrainState, phase: str, lrs: dict, running: engine.Running, ev: engine.EvalResult) -> dict:
    """metrics.csv's row for an epoch just finished (the head phase is epoch 0)."""
    return {
        "epoch": state.epoch + 1 if phase == "train" else 0, "phase": phase, **lrs,
        "train_loss": running.loss, "train_acc": running.acc,
        "val_loss": ev.loss, "val_acc": ev.acc, "val_f1": _macro_f1(ev),
        "epoch_seconds": round(running.seconds + ev.seconds, 3),
        "images_per_second": round(running.seen / max(running.seconds, 1e-9), 1),
        "wall_seconds": round(state.wall_seconds, 3),
    }


def _macro_f1(ev: engine.EvalResult) -> float:
    classes = ev.probs.shape[1] if ev.probs.ndim == 2 else 0
    cm = metrics.confusion_matrix(ev.labels.numpy(), ev.probs.argmax(1).numpy(), classes)
    return metrics.per_class(cm, [str(i) for i in range(classes)])["macro"]["f1"]


def _end_epoch(state: engine.TrainState, row: dict, saved: _Saved, run: RunDir,
               writer, log: Callable[[str], None], epochs: int) -> None:
    """Record a finished epoch: metrics row, checkpoints (best too when it improved), log line."""
    # the epoch is recorded (history, metrics.csv, and so the summary of a run that fails
    # later) only once its checkpoint is on disk: a failed save leaves no false bookkeeping
    after = copy.copy(state)
    after.history = list(state.history)
    improved = after.end_epoch(row)
    ckpt = saved.checkpoint(after)
    if improved:  # the same bytes: link rather than write them twice. best first: a kill in
        checkpoint.save(ckpt, run.best)  # between leaves last.pt one epoch behind, and the
        checkpoint.atomic_link(run.best, run.last)  # resumed run redoes it (never a stale best)
    else:
        checkpoint.save(ckpt, run.last)
    saved.disk.last = (after.epoch, 0)
    state.end_epoch(row)
    metrics.write_csv(run.metrics, state.history, metrics.EPOCH_COLUMNS)
    if writer is not None:
        writer(run.tensorboard, row)
    where = "head phase" if row["phase"] == "head" else f"epoch {row['epoch']}/{epochs}"
    log(f"{where}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
        f"  |  val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}{'  *' if improved else ''}"
        f"  |  {row['epoch_seconds']:.1f}s, {row['images_per_second']:.0f} img/s")


def _run_head_phase(cfg: Config, bb: models.Backbone, bundle: data.DataBundle, rt: runtime.Runtime,
                    state: engine.TrainState, saved: _Saved, run: RunDir, writer, log, show: bool) -> None:
    """Train the new head alone first and record it as epoch 0 (a candidate for best.pt); only
    on pretrained layers (a random backbone has no features worth a probe) and only once."""
    if not (cfg.train.head_phase and bb.pretrained and not state.history and state.step == 0):
        return
    done = _phases.head_phase(cfg, bb, bundle, rt, log, show)
    if done is not None:
        running, ev, _ = done
        lrs = {"lr_head": cfg.train.lr, "lr_backbone": None}
        _end_epoch(state, _row(state, "head", lrs, running, ev), saved, run, writer, log, cfg.train.epochs)


def _patience_spent(state: engine.TrainState, patience: int | None, log: Callable[[str], None]) -> bool:
    """True (and said once) when ``train.patience`` epochs passed without a better monitor value."""
    if patience is None or state.epoch == 0 or state.epochs_since_best() < patience:
        return False
    log(f"early stop: {state.monitor} has not improved for {patience} epoch(s) since epoch {state.best_epoch}")
    return True


def _schedule_start(resumed: dict | None, epochs: int) -> int:
    """The epoch the learning-rate curve starts at: 0, or where a finished run was extended to
    more epochs (its curve had ended; the added epochs get a new one)."""
    if resumed is None:
        return 0
    before = resumed.get("schedule_start", 0)  # checkpoints older than this key started at 0
    if epochs != resumed["config"]["train"]["epochs"]:
        return resumed["epoch"]
    return before


def _summary(run: RunDir, state: engine.TrainState, plan: FreezePlan, bb: models.Backbone,
             bundle: data.DataBundle, device: torch.device) -> TrainSummary:
    last = state.history[-1] if state.history else None
    return TrainSummary(
        status="completed",
        run_dir=str(run),
        best_val_acc=state.best_val_acc,
        best_epoch=state.best_epoch,
        final_val_acc=last["val_acc"] if last else None,
        final_val_loss=last["val_loss"] if last else None,
        epochs_completed=len(state.history),
        wall_seconds=round(last["wall_seconds"] if last else state.wall_seconds, 3),
        checkpoints={"best": str(run.best), "last": str(run.last)},
        model=bb.name,
        weights=bb.weights,
        strategy=plan.strategy,
        trainable_params=plan.trainable_params,
        total_params=plan.total_params,
        classes=bundle.classes,
        train_images=len(bundle.train),
        val_images=len(bundle.val),
        skipped_images=len(bundle.skipped),
        skipped=[{"path": p, "reason": r} for p, r in bundle.skipped],
        device=str(device),
    )


# ------------------------------------------------------------------------ progress and curves

def _progress(loader, epoch: int, epochs: int, enabled: bool):
    """The loader, wrapped in a bar that shows the running loss and accuracy when ``enabled``."""
    if not enabled:
        return loader
    bar = progress.bar(loader, f"epoch {epoch + 1}/{epochs}", True)

    class _Bar:
        def __iter__(self):
            return iter(bar)

        def on_step(self, r: engine.Running) -> None:
            bar.set_postfix(loss=f"{r.loss:.3f}", acc=f"{r.acc:.3f}", refresh=False)

    return _Bar()
